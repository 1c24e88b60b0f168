"""Benchmarks of diffuser.py: decisions per second, full replanning vs warm start, and the
plans of all environments denoised in one batch vs one environment at a time."""
import numpy as np
import torch

import diffuser as D
from bench import median_time

CPU = torch.device("cpu")


def _planner(dim, n_plans, warm, obs_dim=11, act_dim=3):
    """Hopper-sized planner with random weights (the decision cost does not depend on them)."""
    torch.manual_seed(0)
    args = D.resolve_defaults(D.Args(env="hopper", dim=dim, n_plans=n_plans, warm_start_steps=warm))
    model, value, diff = D.build(args, obs_dim, act_dim, CPU)
    n = obs_dim + act_dim
    return D.Planner(model.eval(), value.eval(), diff, np.zeros(n, np.float32), np.ones(n, np.float32), args, CPU), args


def _decision_rates(dim, n_envs, n_plans, k, repeats):
    planner, args = _planner(dim, n_plans, k)
    obs = torch.randn(n_envs, 11)
    prev, _ = planner.plan(obs)                       # a previous plan to warm-start from
    full = median_time(lambda: planner.plan(obs, None), repeats=repeats, warmup=1)
    warm = median_time(lambda: planner.plan(obs, prev), repeats=repeats, warmup=1)
    return full, warm, args


def warm_start(quick: bool):
    """Decisions/s of full replanning (T = 20 denoising steps, 36 value gradients) vs warm start
    (k = 5 steps, 6 value gradients), same planner, same process."""
    k = 5
    settings = [(16, 1, 8, 1)] if quick else [(32, 1, 64, 3), (16, 5, 8, 3)]
    out = []
    for dim, n_envs, n_plans, repeats in settings:
        full, warm, args = _decision_rates(dim, n_envs, n_plans, k, repeats)
        n = sum(p.numel() for p in D.TemporalUnet(14, dim, args.dim_mults).parameters())
        setting = (f"hopper H={args.horizon}, dim {dim} ({n / 1e6:.1f}M U-Net), {n_envs} env x {n_plans} plans, "
                   f"guided (n_guide_steps 2), torch threads {torch.get_num_threads()}")
        out += [dict(row="diffuser_warm_start", metric="full replanning", value=1 / full, unit="decisions/s",
                     setting=setting, notes=f"{full:.3f} s per decision (one decision = all envs)"),
                dict(row="diffuser_warm_start", metric=f"warm start k={k}", value=1 / warm, unit="decisions/s",
                     setting=setting, notes=f"{warm:.3f} s per decision"),
                dict(row="diffuser_warm_start", metric="speedup", value=full / warm, unit="x", setting=setting,
                     notes="target >= 3x")]
    return out


def batched_envs(quick: bool):
    """Planning for N environments: one batch of N x n_plans plans vs N separate calls."""
    n_envs, n_plans, dim = (2, 4, 16) if quick else (5, 8, 16)
    planner, args = _planner(dim, n_plans, 0)
    obs = torch.randn(n_envs, 11)
    batched = median_time(lambda: planner.plan(obs), repeats=1 if quick else 3, warmup=1)
    single = median_time(lambda: [planner.plan(obs[i:i + 1]) for i in range(n_envs)], repeats=1 if quick else 3,
                         warmup=0)
    setting = f"hopper H={args.horizon}, dim {dim}, {n_envs} envs x {n_plans} plans, full replanning"
    return [dict(row="diffuser_batched_envs", metric="one batch", value=n_envs / batched, unit="env decisions/s",
                 setting=setting),
            dict(row="diffuser_batched_envs", metric="one env at a time", value=n_envs / single, unit="env decisions/s",
                 setting=setting, notes=f"batching is {single / batched:.1f}x faster")]


ROWS = {"diffuser_warm_start": warm_start, "diffuser_batched_envs": batched_envs}
