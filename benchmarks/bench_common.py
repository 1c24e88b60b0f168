"""Benchmarks of make_datasets.py (offline generation) and common.py (vectorized evaluation)."""
import time

import numpy as np

import common
import make_datasets
from bench import median_time


def dataset_generation(quick: bool):
    """ARS training + dataset rollout throughput (env steps per second, all workers)."""
    budget, size = (20_000, 5_000) if quick else (300_000, 200_000)
    pool = make_datasets._Pool(None)
    try:
        t = time.perf_counter()
        run = make_datasets.run_ars("hopper", seed=123, budget=budget, verbose=False, pool=pool)
        ars_s = time.perf_counter() - t
        snap = run["snapshots"][-1]
        t = time.perf_counter()
        make_datasets._roll_policy("hopper", snap, make_datasets.MEDIUM_NOISE, size, 0, pool)
        roll_s = time.perf_counter() - t
    finally:
        pool.close()
    setting = f"hopper, {pool.workers} worker processes"
    return [dict(row="dataset_generation", metric="ARS training", value=run["steps"] / ars_s,
                 unit="env steps/s", setting=setting,
                 notes=f"{run['steps']} steps, last eval return {snap['eval_return']:.0f}"),
            dict(row="dataset_generation", metric="dataset rollout", value=size / roll_s,
                 unit="env steps/s", setting=setting, notes=f"{size} transitions")]


class _Linear:
    """A deterministic batched linear policy (fixed random weights)."""
    def __init__(self, obs_dim, act_dim):
        self.W = np.random.default_rng(0).normal(0, 0.3, (obs_dim, act_dim))

    def __call__(self, obs):
        return np.tanh(obs @ self.W)


def evaluation(quick: bool):
    """10 episodes vectorized (one policy call per step on a batch) vs one episode at a time."""
    n = 4 if quick else 10
    pol = _Linear(*common.env_dims("halfcheetah"))  # halfcheetah never terminates: 1000 steps
    vec = median_time(lambda: common.evaluate(pol, "halfcheetah", n, seed=0, progress=False),
                      repeats=3, warmup=0)
    seq = median_time(lambda: [common.evaluate(pol, "halfcheetah", 1, seed=i, progress=False)
                               for i in range(n)], repeats=3, warmup=0)
    setting = f"halfcheetah, {n} episodes, numpy policy"
    return [dict(row="evaluation", metric="vectorized", value=n * 1000 / vec, unit="env steps/s",
                 setting=setting),
            dict(row="evaluation", metric="one episode at a time", value=n * 1000 / seq,
                 unit="env steps/s", setting=setting,
                 notes="the env step dominates for a numpy policy; batching pays off for networks")]


ROWS = {"dataset_generation": dataset_generation, "evaluation": evaluation}
