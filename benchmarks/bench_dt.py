"""Benchmarks of dt.py: vectorized vs one-episode-at-a-time evaluation, training throughput, memory.

    python benchmarks/bench.py --only dt --quick     # smoke
    python benchmarks/bench.py --only dt             # the numbers
"""
import resource
import time

import torch

import common
import dt
from bench import median_time


def _peak_memory(device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "MiB (torch.cuda.max_memory_allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB (process peak RSS, ru_maxrss)"


def dt_eval(quick: bool):
    """10 halfcheetah episodes (never terminate early) with one DT at the default config:
    vectorized (one batched forward per step) vs one episode at a time (batch 1), same policy class."""
    n, steps = (2, 30) if quick else (10, 200)
    device = common.get_device(True)
    rows = []
    for bf16 in (False, True):
        args = dt.check_args(dt.Args(env="halfcheetah", eval_episodes=n, eval_max_steps=steps, bf16=bf16,
                                     target_returns=(6000.0,)))
        torch.manual_seed(0)
        model = dt.DecisionTransformer(*common.env_dims("halfcheetah"), args).to(device).eval()
        mean, std = torch.zeros(model.embed_state.in_features), torch.ones(model.embed_state.in_features)

        def run(n_envs, seed):
            pol = dt.DTPolicy(model, args, mean, std, device, target=6000.0)
            return common.evaluate(pol, "halfcheetah", n_episodes=n_envs, seed=seed, max_steps=steps)

        vec = median_time(lambda: run(n, 0), repeats=1 if quick else 2, warmup=1)
        seq = median_time(lambda: [run(1, i) for i in range(n)], repeats=1 if quick else 2, warmup=0)
        setting = f"{n} episodes x {steps} steps, K=20 d=128 3 layers, {'bf16' if bf16 else 'fp32'}, {device}"
        rows += [dict(row="dt_eval", metric=f"vectorized ({'bf16' if bf16 else 'fp32'})", value=n * steps / vec,
                      unit="env steps/s", setting=setting),
                 dict(row="dt_eval", metric=f"one at a time ({'bf16' if bf16 else 'fp32'})", value=n * steps / seq,
                      unit="env steps/s", setting=setting),
                 dict(row="dt_eval", metric=f"speed-up ({'bf16' if bf16 else 'fp32'})", value=seq / vec, unit="x",
                      setting=setting, notes="target >= 5x")]
    return rows


def dt_train(quick: bool):
    """Updates per second at the default config (batch 64, K=20, d=128, 3 layers), fp32 and bf16,
    on hopper/medium, plus peak memory."""
    device = common.get_device(True)
    data_np = common.load_dataset("hopper", "medium", verbose=False)
    if quick:
        data_np = {k: v[:20_000] for k, v in data_np.items()}
    rows = []
    for bf16 in (False, True):
        args = dt.check_args(dt.Args(bf16=bf16))
        data = dt.TrajectoryData(data_np, args, device)
        torch.manual_seed(0)
        model = dt.DecisionTransformer(data.obs_dim, data.act_dim, args).to(device).train()
        opt, sched = dt.make_optimizer(model, args)
        gen = torch.Generator(device=device).manual_seed(0)
        n = 3 if quick else 10

        def updates():
            for _ in range(n):
                dt.train_step(model, model, opt, sched, data.sample(64, 20, gen), args)
            if device.type == "cuda":
                torch.cuda.synchronize()

        sec = median_time(updates, repeats=1 if quick else 3, warmup=1)
        prec = "bf16 autocast" if bf16 else "fp32"
        rows.append(dict(row="dt_train", metric=f"updates/s ({prec})", value=n / sec, unit="updates/s",
                         setting=f"batch 64, K=20, d=128, 3 layers, {device}, {torch.get_num_threads()} threads",
                         notes=f"{sum(p.numel() for p in model.parameters())} parameters"))
    mem, unit = _peak_memory(device)
    rows.append(dict(row="dt_train", metric="peak memory", value=mem, unit=unit,
                     setting="after both runs, includes the 1M-transition dataset" if not quick else "quick"))
    return rows


ROWS = {"dt_eval": dt_eval, "dt_train": dt_train}
