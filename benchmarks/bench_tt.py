"""Benchmarks of tt.py: decision latency of the beam-search planner (key-value cache vs the plain
path, fp32 vs bf16, episodes batched), where a decision's time goes, training speed and MFU.

    python benchmarks/bench.py --only tt_            # all rows (the uncached H=15 run: minutes)
    OMP_NUM_THREADS=2 python benchmarks/bench_tt.py  # the issue's row: H=15 / beam 128, profile

`plan_latency(...)` is importable by other benchmarks (e.g. TAP's) to time TT's planner with
random weights at a given horizon / beam and observation / action size:

    from bench_tt import plan_latency
    seconds = plan_latency(obs_dim=11, act_dim=3, horizon=15, beam=128)
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too
import tt  # noqa: E402
from bench import median_time  # noqa: E402

PUBLISHED_GPU_S = 0.4  # official code, ~0.4 s per decision on one RTX 2080 Ti (PAPERS.md)


def make_planner_inputs(obs_dim, act_dim, context=5, n_envs=1, device="cpu", seed=0):
    """The official GPT (4 layers, 4 heads, 128 wide, windows of 10 transitions) with its own
    random initial weights, random bin edges, a full context (`context` transitions + obs)."""
    torch.manual_seed(seed)
    D = obs_dim + act_dim + 2
    model = tt.GPT(obs_dim, act_dim).to(device).eval()
    th = np.sort(np.random.default_rng(seed).normal(size=(101, D)), 0)
    prefix = torch.randint(0, 100, (n_envs, context * D + obs_dim), device=device)
    return model, tt.Discretizer(th, device), prefix


def plan_once(obs_dim, act_dim, horizon, beam, expand=2, device="cpu", context=5, n_envs=1,
              use_cache=True, bf16=False, seed=0):
    """A function running one planner call (one decision for `n_envs` episodes at once)."""
    device = torch.device(device)
    model, disc, prefix = make_planner_inputs(obs_dim, act_dim, context, n_envs, device, seed)

    def once():
        gen = torch.Generator(device=device).manual_seed(seed)
        out = tt.beam_plan(model, disc, prefix, horizon, beam, expand, None, 0.6, tt.DISCOUNT,
                           context, gen, use_cache, bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out
    return once


def plan_latency(obs_dim, act_dim, horizon, beam=128, expand=2, device="cpu", context=5,
                 n_envs=1, use_cache=True, bf16=False, repeats=3, warmup=1, seed=0):
    """Median seconds of one planner call."""
    once = plan_once(obs_dim, act_dim, horizon, beam, expand, device, context, n_envs,
                     use_cache, bf16, seed)
    return median_time(once, repeats=repeats, warmup=warmup)


def matmul_peak(dtype=torch.float32) -> float:
    """FLOP/s of a large-ish GEMM of the planner's width (the machine's practical peak now)."""
    a, b = torch.randn(4096, 128, dtype=dtype), torch.randn(128, 512, dtype=dtype)
    return 2 * 4096 * 128 * 512 / median_time(lambda: a @ b, repeats=20, warmup=3)


def decision_latency(quick: bool):
    """Cached vs plain planner at the official hopper setting (H=15, beam 128) and at H=5 /
    beam 32, fp32 and bf16, the arithmetic floor, and episodes batched in one call."""
    obs, act, rows = 11, 3, []
    configs = [(3, 8, 1)] if quick else [(15, 128, 1), (5, 32, 3)]
    for H, B, plain_repeats in configs:
        setting = f"hopper sizes (obs 11, act 3), H={H}, beam {B} x 2, context 5, random init"
        once = plan_once(obs, act, H, B)
        with FlopCounterMode(display=False) as counter:
            plan32 = once()[0]
        floor = counter.get_total_flops() / matmul_peak()
        c = median_time(once, repeats=1 if quick else 3, warmup=1)
        bf = plan_once(obs, act, H, B, bf16=True)
        same = torch.equal(bf()[0], plan32)
        b = median_time(bf, repeats=1 if quick else 3, warmup=0)
        u = plan_latency(obs, act, H, B, use_cache=False, repeats=plain_repeats, warmup=0)
        rows += [dict(row="tt_decision_latency", metric="cached fp32", value=c, unit="s/decision",
                      setting=setting, notes=f"official code on a GPU: ~{PUBLISHED_GPU_S} s "
                      "(RTX 2080 Ti, H=10)"),
                 dict(row="tt_decision_latency", metric="cached bf16", value=b, unit="s/decision",
                      setting=setting, notes=f"plan {'==' if same else '!='} fp32 plan"),
                 dict(row="tt_decision_latency", metric="plain (--no-kv-cache)", value=u,
                      unit="s/decision", setting=setting,
                      notes="full-window forward per token, as the official planner"),
                 dict(row="tt_decision_latency", metric="cache speed-up", value=u / c, unit="x",
                      setting=setting),
                 dict(row="tt_decision_latency", metric="fp32 matmul floor", value=floor,
                      unit="s/decision", setting=setting,
                      notes=f"{counter.get_total_flops() / 1e9:.0f} GFLOP at this machine's "
                      "GEMM peak")]
    H, B, E = (3, 8, 2) if quick else (5, 32, 5)
    setting = f"hopper sizes, H={H}, beam {B}, cached, {E} episodes"
    batched = plan_latency(obs, act, H, B, n_envs=E, repeats=1 if quick else 3)
    single = plan_latency(obs, act, H, B, n_envs=1, repeats=1 if quick else 3)
    rows += [dict(row="tt_decision_latency", metric=f"{E} envs in one call", value=batched,
                  unit="s/step", setting=setting),
             dict(row="tt_decision_latency", metric=f"{E} envs one at a time", value=E * single,
                  unit="s/step", setting=setting, notes=f"{E} x the 1-env latency")]
    return rows


def decision_profile(quick: bool, top: int = 6):
    """Where one cached decision's time goes (torch.profiler, self CPU time by op)."""
    from torch.profiler import ProfilerActivity, profile
    H, B = (3, 8) if quick else (15, 128)
    once = plan_once(11, 3, H, B)
    once()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        once()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return [dict(row="tt_decision_profile", metric=e.key, value=100 * e.self_cpu_time_total / total,
                 unit="% self CPU", setting=f"hopper sizes, H={H}, beam {B}, cached fp32",
                 notes=f"{e.count} calls") for e in ops[:top]]


def train_speed(quick: bool):
    """Updates per second and MFU of the official model (hopper sizes, windows of 159 tokens)."""
    obs, act, D = 11, 3, 16
    torch.manual_seed(0)
    model = tt.GPT(obs, act)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95))
    rows, peak = [], {False: matmul_peak(), True: matmul_peak(torch.bfloat16)}
    for bs in ([8] if quick else [64, 256]):
        x = torch.randint(0, 100, (bs, 10 * D - 1))
        y = torch.randint(0, 101, (bs, 10 * D - 1))
        mask = torch.ones(bs, 10 * D - 1)
        for bf16 in (False, True):
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model.loss(x, y, mask)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with FlopCounterMode(display=False) as counter:
                step()
            s = median_time(step, repeats=1 if quick else 3, warmup=1)
            kind = "bf16" if bf16 else "fp32"
            rows.append(dict(row="tt_train_speed", metric=f"batch {bs}, {kind}", value=1.0 / s,
                             unit="updates/s", setting="4 layers, 4 heads, 128 wide",
                             notes=f"MFU {counter.get_total_flops() / s / peak[bf16]:.0%} of "
                             "this run's GEMM peak"))
    return rows


def decision_bound(quick: bool):
    """A lower bound on the exact fp32 cached decision (H=15, beam 128) on this machine: its
    Linear FLOPs at the best GEMM rate measured here plus its key-value cache reads at this
    machine's copy bandwidth (separate PyTorch ops cannot overlap the two), against the
    measured latency. Counts come from the run itself (FlopCounterMode, a wrapped forward)."""
    H, B = (3, 8) if quick else (15, 128)
    once, kv = plan_once(11, 3, H, B), [0]
    forward = tt.CachedStream.forward

    def counted(self, idx, pos0):  # every layer reads K and V of positions < pos0 + T, per row
        n, blk = pos0 + idx.shape[1], self.model.blocks
        kv[0] += idx.shape[0] * n * 2 * len(blk) * blk[0].proj.in_features * 4   # fp32 bytes
        return forward(self, idx, pos0)
    tt.CachedStream.forward = counted
    try:
        with FlopCounterMode(display=False) as counter:
            once()
    finally:
        tt.CachedStream.forward = forward
    linear = counter.get_flop_counts()["Global"].get(torch.ops.aten.addmm, 0)
    peak = max(matmul_peak(), 2 * 2048 ** 3 / median_time(
        lambda a=torch.randn(2048, 2048): a @ a, repeats=5, warmup=1))
    x = torch.randn(16 * 2 ** 20)   # 64 MB, beyond the caches
    y = torch.empty_like(x)
    bandwidth = 2 * x.nbytes / median_time(lambda: y.copy_(x), repeats=10, warmup=2)
    bound = linear / peak + kv[0] / bandwidth
    took = median_time(once, repeats=1 if quick else 3, warmup=1)
    setting = f"hopper sizes, H={H}, beam {B} x 2, cached fp32, random init"
    return [dict(row="tt_decision_bound", metric="Linear layers", value=linear / 1e9,
                 unit="GFLOP", setting=setting, notes=f"best GEMM rate here {peak / 1e9:.0f} "
                 f"GFLOP/s: {linear / peak:.2f} s"),
            dict(row="tt_decision_bound", metric="key-value cache reads", value=kv[0] / 1e9,
                 unit="GB", setting=setting, notes=f"copy bandwidth here {bandwidth / 1e9:.1f} "
                 f"GB/s: {kv[0] / bandwidth:.2f} s"),
            dict(row="tt_decision_bound", metric="lower bound (sum)", value=bound,
                 unit="s/decision", setting=setting, notes=f"measured {took:.2f} s")]


ROWS = {"tt_decision_latency": decision_latency, "tt_decision_profile": decision_profile,
        "tt_decision_bound": decision_bound, "tt_train_speed": train_speed}

if __name__ == "__main__":  # the measurement: H=15 / beam 128, cached, and its profile
    t = time.perf_counter()
    once = plan_once(11, 3, 15, 128)
    print(f"threads {torch.get_num_threads()}: cached fp32 "
          f"{median_time(once, repeats=3, warmup=1):.2f} s per decision (H=15, beam 128)")
    for r in decision_profile(False):
        print(f"  {r['metric']:<24} {r['value']:5.1f}%  ({r['notes']})")
