"""Benchmarks of qvpo.py, side by side in one process: update throughput with MFU (paper and
CPU settings, fp32 and bf16), peak memory of an update, the batched sampler vs a per-state loop."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import qvpo
from bench import median_time

# (env, flags) of the measured settings; the CPU setting is the README quick-run one
PAPER = ("hopper", [])  # hidden 256, T 20, 64 samples, batch 256 (the Args defaults)
CPU = ("Pendulum-v1", ["--hidden", "64", "--n-timesteps", "5", "--n-train-samples", "16",
                       "--batch-size", "64"])
QUICK = ["--hidden", "32", "--critic-hidden", "32", "--n-timesteps", "4",
         "--n-train-samples", "8", "--batch-size", "16"]


def _setup(env, flags, device="cpu"):
    args = common.parse_args(qvpo.Args, ["--env", env, "--no-cuda"] + flags)
    obs_dim, act_dim = common.env_dims(env)
    torch.manual_seed(0)
    agent = qvpo.Agent(obs_dim, act_dim, args, torch.device(device))
    buf = qvpo.ReplayBuffer(obs_dim, act_dim, torch.device(device), capacity=4096)
    rng = np.random.default_rng(0)
    for _ in range(4096):
        buf.add(rng.normal(size=obs_dim), rng.uniform(-1, 1, act_dim), rng.normal(),
                rng.normal(size=obs_dim), False, False)
    return args, agent, buf, torch.Generator(device).manual_seed(0)


def _setting(args, env):
    return (f"{env}, hidden {args.hidden}, critic {args.critic_hidden}, T {args.n_timesteps}, "
            f"{args.n_train_samples} samples/state, batch {args.batch_size}")


def _matmul_peak(dtype) -> float:
    """FLOP/s of a 1024^3 matmul in this process (the MFU denominator)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    return 2 * 1024**3 / median_time(lambda: a @ b, repeats=5, warmup=2)


def update_speed(quick: bool):
    """Updates per second (critic step + policy step on a fresh batch, Algorithm 1) and MFU."""
    rows = []
    settings = [("quick", "hopper", QUICK)] if quick else [
        ("paper", *PAPER), ("paper bf16", PAPER[0], PAPER[1] + ["--bf16"]), ("cpu quick-run", *CPU)]
    peaks = {dt: _matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    for name, env, flags in settings:
        args, agent, buf, gen = _setup(env, flags)
        with FlopCounterMode(display=False) as fc:
            agent.update(buf, 0.01, gen)
        t = median_time(lambda: agent.update(buf, 0.01, gen), repeats=1 if quick else 3)
        peak = peaks[torch.bfloat16 if args.bf16 else torch.float32]
        mfu = fc.get_total_flops() / t / peak
        rows.append(dict(row="qvpo_update_speed", metric=f"{name} setting", value=1.0 / t,
                         unit="updates/s", setting=_setting(args, env),
                         notes=f"{t * 1000:.0f} ms/update, {fc.get_total_flops() / 1e9:.1f} "
                               f"GFLOP/update, MFU {100 * mfu:.0f}% of {peak / 1e9:.0f} "
                               f"GFLOP/s; {torch.get_num_threads()} thread(s)"))
    return rows


def _rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(env, flags):
    """In a fresh process: resident memory before an update and its peak over 3 updates (MB);
    the peak (VmHWM) is reset first, so imports and set-up do not count (Linux only)."""
    args, agent, buf, gen = _setup(env, flags)
    agent.update(buf, 0.01, gen)  # optimizer state allocated
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_mb("VmRSS")
    for _ in range(3):
        agent.update(buf, 0.01, gen)
    print(json.dumps(dict(before=before, peak=_rss_mb("VmHWM"))))


def peak_memory(quick: bool):
    """Peak resident memory an update adds on CPU (fresh process)."""
    rows = []
    settings = [("quick", "hopper", QUICK)]
    if not quick:
        settings = [("paper", *PAPER), ("cpu quick-run", *CPU)]
    here = os.path.dirname(os.path.abspath(__file__))
    for name, env, flags in settings:
        code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
                f"import bench_qvpo; bench_qvpo._peak_rss_child({env!r}, {flags!r})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        args = common.parse_args(qvpo.Args, ["--env", env] + flags)
        rows.append(dict(row="qvpo_peak_memory", metric=f"{name} setting",
                         value=m["peak"] - m["before"], unit="MB", setting=_setting(args, env),
                         notes=f"peak RSS {m['peak']:.0f} MB over {m['before']:.0f} MB before"))
    return rows


def batched_sampler(quick: bool):
    """N candidates for B states: one batched pass per diffusion step vs a per-state loop."""
    rows = []
    settings = [("hopper", QUICK, 16, 8)] if quick else [(*PAPER, 256, 64), (*CPU, 64, 16)]
    for env, flags, B, N in settings:
        args, agent, _, gen = _setup(env, flags)
        states = torch.randn(B, common.env_dims(env)[0])
        noise = torch.randn(agent.actor.noise_shape(B, N), generator=gen)
        with torch.no_grad():
            t_batch = median_time(lambda: agent.actor.denoise(states, noise), repeats=3)
            t_loop = median_time(
                lambda: [agent.actor.denoise(states[i:i + 1], noise[i:i + 1]) for i in range(B)],
                repeats=3 if quick or B * N < 4096 else 1)
        setting = f"{env}, {B} states x {N} samples, hidden {args.hidden}, T {args.n_timesteps}"
        rows += [dict(row="qvpo_batched_sampler", metric="batched (one pass per step)",
                      value=t_batch * 1000, unit="ms", setting=setting),
                 dict(row="qvpo_batched_sampler", metric="per-state loop", value=t_loop * 1000,
                      unit="ms", setting=setting,
                      notes=f"loop / batched = {t_loop / t_batch:.1f}; same outputs (tests)")]
    return rows


ROWS = {"qvpo_update_speed": update_speed, "qvpo_peak_memory": peak_memory,
        "qvpo_batched_sampler": batched_sampler}
