"""Benchmarks of diffuser.py, side by side in one process: decision time of full replanning (the
pre-rewrite fp32 planner from git, this file in fp32 and in bf16) and of warm starts, bf16 plan
quality against fp32 on the same noise, and all envs in one batch vs one env at a time.

    python benchmarks/bench.py --only diffuser
    DIFFUSER_BENCH_CKPT=runs/<run>/checkpoint.pt python benchmarks/bench.py --only diffuser_bf16

Timings interleave the variants (A B C A B C ...) and report the minimum and the median, so that
a noisy shared machine slows every variant alike."""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import diffuser as D

CPU = torch.device("cpu")
BEFORE = "818f814"   # the last commit with the pre-rewrite diffuser.py


def _planner(dim=32, n_plans=64, warm=0, bf16=False, ckpt=None):
    """Hopper planner: a checkpoint's EMA nets, or random weights (the cost does not depend
    on them); nets frozen (requires_grad off) as in evaluation."""
    if ckpt:
        return D.load_policy(ckpt, n_plans=n_plans, warm_start_steps=warm, bf16=bf16)
    torch.manual_seed(0)
    args = D.resolve(D.Args(env="hopper", dim=dim, n_plans=n_plans, warm_start_steps=warm,
                            bf16=bf16))
    model, value, diff = D.build(args, 11, 3, CPU)
    nets = [m.eval().requires_grad_(False) for m in (model, value)]
    return D.Planner(*nets, diff, torch.zeros(14), torch.ones(14), args, CPU)


def _before_planner(new: D.Planner, frozen=True):
    """The pre-rewrite planner (git show BEFORE:diffuser.py) on the same weights, or None;
    frozen=False as its own benchmark ran it (weight gradients computed in every guide step)."""
    root = Path(D.__file__).parent
    try:
        src = subprocess.run(["git", "-C", str(root), "show", f"{BEFORE}:diffuser.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "diffuser_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("diffuser_before", path)
    old = sys.modules["diffuser_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    a = new.args
    args = old.resolve_defaults(old.Args(env="hopper", dim=a.dim, n_plans=a.n_plans))
    model, value, diff = old.build(args, 11, 3, CPU)
    model.load_state_dict(new.model.state_dict())
    value.load_state_dict(new.value.state_dict())
    nets = [m.eval().requires_grad_(not frozen) for m in (model, value)]
    return old.Planner(*nets, diff, np.zeros(14, np.float32), np.ones(14, np.float32), args, CPU)


def _interleaved(fns: dict, repeats: int) -> dict:
    """{name: (min s, median s)} over `repeats` rounds that call every fn once, in turn."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()                                                      # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def full_replanning(quick: bool):
    """Seconds per decision: hopper, 1 env x 64 plans, T = 20, 2 guide steps (36 value
    gradients + 20 U-Net passes), versus warm start k = 5 (6 value gradients + 5 U-Net passes)."""
    dim, plans, repeats = (16, 8, 1) if quick else (32, 64, 5)
    fp32, bf16 = _planner(dim, plans, warm=5), _planner(dim, plans, warm=5, bf16=True)
    obs = torch.randn(1, 11)
    prev = fp32.plan(obs)[0]
    fns = {"fp32 (this file)": lambda: fp32.plan(obs), "bf16 (this file)": lambda: bf16.plan(obs),
           "warm start k=5, fp32": lambda: fp32.plan(obs, prev),
           "warm start k=5, bf16": lambda: bf16.plan(obs, prev)}
    if (old := _before_planner(fp32)) is not None:
        grads = _before_planner(fp32, frozen=False)
        fns = {"fp32 before the rewrite": lambda: old.plan(obs),
               "fp32 before, as its benchmark (weight grads on)": lambda: grads.plan(obs), **fns}
    res = _interleaved(fns, repeats)
    base = res.get("fp32 before the rewrite", res["fp32 (this file)"])[0]
    full = res["fp32 (this file)"][0]
    setting = (f"hopper H=32, dim {dim}, 1 env x {plans} plans, T=20, 2 guide steps, "
               f"{torch.get_num_threads()} threads, min of {repeats} interleaved")
    out = []
    for k, (best, med) in res.items():
        ref = "vs fp32 before" if k.startswith(("fp32", "bf16")) else "vs full fp32 (this file)"
        ratio = (base if ref == "vs fp32 before" else full) / best
        out.append(dict(row="diffuser_full_replanning", metric=k, value=best, unit="s/decision",
                        setting=setting, notes=f"median {med:.3f} s; {ratio:.2f}x {ref}"))
    return out


@torch.no_grad()
def bf16_quality(quick: bool):
    """Same noise, fp32 vs bf16 autocast: first actions of every candidate plan (unranked), the
    executed action, how often both pick the same plan and what the bf16 pick loses in value.
    DIFFUSER_BENCH_CKPT: a trained checkpoint (else random weights: values nearly tied)."""
    ckpt = os.environ.get("DIFFUSER_BENCH_CKPT")
    n_obs, plans = (2, 8) if quick else (16, 64)
    fp32 = _planner(16 if quick else 32, plans, ckpt=ckpt)
    bf16 = _planner(16 if quick else 32, plans, bf16=True, ckpt=ckpt)
    env = D.common.make_env("hopper")
    cand, executed, same, regret = [], [], [], []
    for i in range(n_obs):
        obs, _ = env.reset(seed=i)
        env.action_space.seed(i)
        for _ in range(i % 4 * 5):                            # some states off the reset
            obs = env.step(env.action_space.sample())[0]
        o = torch.as_tensor(obs, dtype=torch.float32)[None]
        out = []
        for p in (fp32, bf16):
            p.gen.manual_seed(i)
            state = ((o - p.mean[3:]) / p.std[3:]).repeat_interleave(plans, 0)
            x = torch.randn((plans, *p.diff.loss_weights.shape), generator=p.gen)
            x, y = p.denoise(x, state, p.diff.T)
            out.append((x[:, 0, :3] * p.std[:3] + p.mean[:3], y.argmax(), y))
        (a32, b32, y32), (a16, b16, _) = out
        regret.append(((y32.max() - y32[b16]) / (y32.max() - y32.median())).item())
        cand.append((a32 - a16).abs().max(1).values)
        executed.append((a32[b32] - a16[b16]).abs().max().item())
        same.append(bool(b32 == b16))
    cand = torch.cat(cand)
    setting = (f"hopper, {'checkpoint ' + Path(ckpt).parent.name if ckpt else 'random weights'}"
               f", {n_obs} states x {plans} plans, same noise")
    row = "diffuser_bf16_quality"
    return [dict(row=row, metric="candidate first action |bf16 - fp32| (max over dims), median",
                 value=cand.median().item(), unit="action units", setting=setting),
            dict(row=row, metric="candidate first action |bf16 - fp32|, 95th percentile",
                 value=cand.quantile(0.95).item(), unit="action units", setting=setting),
            dict(row=row, metric="same plan chosen", value=float(np.mean(same)), unit="fraction",
                 setting=setting),
            dict(row=row, metric="executed action |bf16 - fp32|, median",
                 value=float(np.median(executed)), unit="action units", setting=setting,
                 notes="actions lie in [-1, 1]"),
            dict(row=row, metric="fp32 value lost by the bf16 choice / (max - median), mean",
                 value=float(np.mean(regret)), unit="fraction", setting=setting,
                 notes="0: bf16 picks a plan as good as fp32's; 1: a median plan")]


def batched_envs(quick: bool):
    """Planning for N environments: one batch of N x n_plans plans vs N separate calls."""
    n_envs, n_plans, dim = (2, 4, 16) if quick else (5, 8, 16)
    planner = _planner(dim, n_plans)
    obs = torch.randn(n_envs, 11)
    res = _interleaved({"one batch": lambda: planner.plan(obs),
                        "one env at a time": lambda: [planner.plan(obs[i:i + 1])
                                                      for i in range(n_envs)]},
                       1 if quick else 3)
    setting = f"hopper H=32, dim {dim}, {n_envs} envs x {n_plans} plans, full replanning"
    ratio = res["one env at a time"][0] / res["one batch"][0]
    return [dict(row="diffuser_batched_envs", metric=k, value=n_envs / best,
                 unit="env decisions/s", setting=setting, notes=f"batching {ratio:.1f}x faster")
            for k, (best, _) in res.items()]


def profile_ops(quick: bool, top: int = 8):
    """Where one full-replanning decision's time goes, fp32 and bf16 (torch.profiler, self CPU
    time by op, % of the total), hopper, 64 plans."""
    from torch.profiler import ProfilerActivity, profile
    dim, plans = (16, 8) if quick else (32, 64)
    obs, rows = torch.randn(1, 11), []
    for bf16 in (False, True):
        planner = _planner(dim, plans, bf16=bf16)
        planner.plan(obs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            planner.plan(obs)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        setting = f"hopper H=32, dim {dim}, 1 env x {plans} plans, {'bf16' if bf16 else 'fp32'}"
        rows += [dict(row="diffuser_profile", metric=e.key, value=100 * e.self_cpu_time_total
                      / total, unit="% self CPU", setting=setting,
                      notes=f"{e.self_cpu_time_total / 1e6:.3f} s, {e.count} calls")
                 for e in ops[:top]]
    return rows


ROWS = {"diffuser_full_replanning": full_replanning, "diffuser_bf16_quality": bf16_quality,
        "diffuser_batched_envs": batched_envs, "diffuser_profile": profile_ops}
