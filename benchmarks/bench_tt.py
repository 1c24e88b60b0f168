"""Benchmarks of tt.py: decision latency of the beam-search planner with and without the key-value
cache (same process, same random weights), batching over evaluation episodes, training speed.

`plan_latency(...)` is importable by other benchmarks (e.g. TAP's) to time TT's cached planner
at a given horizon / beam and observation / action size with random weights:

    from bench_tt import plan_latency
    seconds = plan_latency(obs_dim=11, act_dim=3, horizon=15, beam=128, expand=2, device="cpu")
"""
import time

import numpy as np
import torch

import tt
from bench import median_time

PUBLISHED_GPU_S = 0.4  # official code, ~0.4 s per decision on one RTX 2080 Ti (PAPERS.md)


def make_planner_inputs(obs_dim, act_dim, context=5, n_envs=1, device="cpu", seed=0):
    """The official GPT (4 layers, 4 heads, 128 wide, windows of 10 transitions) with random
    weights, random bin edges, and a full context (`context` transitions + the current obs)."""
    torch.manual_seed(seed)
    D = obs_dim + act_dim + 2
    model = tt.GPT(obs_dim, act_dim, 100, 10 * D - 1).to(device).eval()
    th = np.sort(np.random.default_rng(seed).normal(size=(101, D)), 0).astype(np.float32)
    disc = tt.Discretizer(th).to(device)
    prefix = torch.randint(0, 100, (n_envs, context * D + obs_dim), device=device)
    return model, disc, prefix


def plan_latency(obs_dim, act_dim, horizon, beam, expand=2, device="cpu", context=5, n_envs=1,
                 use_cache=True, bf16=False, repeats=3, warmup=1, seed=0):
    """Median seconds of one planner call (one decision for `n_envs` episodes at once)."""
    device = torch.device(device)
    model, disc, prefix = make_planner_inputs(obs_dim, act_dim, context, n_envs, device, seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def once():
        tt.beam_plan(model, disc, prefix, horizon, beam, expand, context=context, use_cache=use_cache,
                     gen=gen, amp=bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return median_time(once, repeats=repeats, warmup=warmup)


def decision_latency(quick: bool):
    """Cached vs uncached decision latency at the hopper planning config, plus smaller configs."""
    obs, act = 11, 3
    rows = []
    configs = [(3, 8, 1)] if quick else [(15, 128, 1), (5, 32, 2)]
    for H, B, uncached_repeats in configs:
        setting = f"hopper dims (obs 11, act 3), H={H}, beam {B}, expand 2, context 5, 1 env, random weights"
        c = plan_latency(obs, act, H, B, repeats=1 if quick else 3, warmup=1)
        u = plan_latency(obs, act, H, B, use_cache=False, repeats=uncached_repeats if not quick else 1, warmup=0)
        rows += [dict(row="tt_decision_latency", metric="cached", value=c, unit="s/decision", setting=setting,
                      notes=f"official code on a GPU: ~{PUBLISHED_GPU_S} s (RTX 2080 Ti, H=10)"),
                 dict(row="tt_decision_latency", metric="uncached (--no-kv-cache)", value=u, unit="s/decision",
                      setting=setting, notes="full-window forward per token, as the official planner"),
                 dict(row="tt_decision_latency", metric="speed-up", value=u / c, unit="x", setting=setting)]
    # batching over evaluation episodes: one planner call for 5 envs vs 5 calls of one env
    H, B, E = (3, 8, 2) if quick else (5, 32, 5)
    setting = f"hopper dims, H={H}, beam {B}, cached, {E} episodes"
    batched = plan_latency(obs, act, H, B, n_envs=E, repeats=1 if quick else 3)
    single = plan_latency(obs, act, H, B, n_envs=1, repeats=1 if quick else 3)
    rows += [dict(row="tt_decision_latency", metric=f"{E} envs in one call", value=batched, unit="s/step",
                  setting=setting),
             dict(row="tt_decision_latency", metric=f"{E} envs one at a time", value=E * single, unit="s/step",
                  setting=setting, notes=f"{E} x the 1-env latency")]
    return rows


def train_speed(quick: bool):
    """Training steps per second, official model, windows of 10 transitions (hopper dims)."""
    obs, act, D = 11, 3, 16
    torch.manual_seed(0)
    model = tt.GPT(obs, act, 100, 10 * D - 1)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95))
    w = model.token_weights(10, 5, 1, 1, "cpu")
    rows = []
    for bs in ([8] if quick else [64, 256]):
        x = torch.randint(0, 100, (bs, 10 * D - 1))
        y = torch.randint(0, 101, (bs, 10 * D - 1))
        mask = torch.ones(bs, 10 * D - 1)
        for bf16 in (False, True):
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model.loss(x, y, mask, w)
                opt.zero_grad()
                loss.backward()
                opt.step()
            s = median_time(step, repeats=1 if quick else 3, warmup=1)
            rows.append(dict(row="tt_train_speed", metric=f"batch {bs}, {'bf16' if bf16 else 'fp32'}",
                             value=1.0 / s, unit="steps/s", setting="4 layers, 4 heads, 128 wide, 159 tokens"))
    return rows


ROWS = {"tt_decision_latency": decision_latency, "tt_train_speed": train_speed}
