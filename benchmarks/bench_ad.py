"""Benchmarks of ad.py: the key-value cached in-context rollout vs recomputing the context, and training speed."""
import numpy as np
import torch

import ad
from bench import median_time


def kv_cache(quick: bool):
    """In-context evaluation (one model call per env step for every task at once): with the cache
    each step feeds one token (plus one prefill per episode once the window slides); without it
    every step recomputes the whole window."""
    args = ad.Args()
    n_tasks, episodes = (8, 6) if quick else (64, 12)   # default eval: 16 held-out tasks x 4 runs
    torch.manual_seed(0)
    model = ad.make_model(args, torch.device("cpu")).eval()
    tasks = np.repeat(ad.all_tasks("darkroom", 9)[::5][:16], n_tasks // 16 or 1, 0)[:n_tasks]
    run = lambda cache: ad.in_context_returns(model, "darkroom", tasks, episodes, args.context_episodes,
                                              seed=0, use_cache=cache)
    steps = episodes * 20
    t_cache = median_time(lambda: run(True), repeats=3 if quick else 5, warmup=1)
    t_full = median_time(lambda: run(False), repeats=3 if quick else 5, warmup=1)
    setting = (f"darkroom, {len(tasks)} tasks, {episodes} episodes x 20 steps, context {args.context_episodes} "
               f"episodes, d={args.d_model}, {args.n_layers} layers, {torch.get_num_threads()} threads")
    return [dict(row="ad_kv_cache", metric="cached step", value=1e3 * t_cache / steps, unit="ms/env step",
                 setting=setting),
            dict(row="ad_kv_cache", metric="recompute context", value=1e3 * t_full / steps, unit="ms/env step",
                 setting=setting),
            dict(row="ad_kv_cache", metric="speedup", value=t_full / t_cache, unit="x", setting=setting,
                 notes="identical actions (tests/test_ad.py)")]


def train_step(quick: bool):
    """AD gradient steps per second at the paper's batch size (128 windows of 4 episodes)."""
    args = ad.Args()
    goals = ad.all_tasks("darkroom", 9)[:16]
    h = ad.q_learning(ad.BatchDarkRoom("darkroom", goals), 16, np.random.default_rng(0))
    sampler = ad.WindowSampler(h, args.context_episodes, torch.device("cpu"))
    model = ad.make_model(args, torch.device("cpu")).train()
    opt, _ = ad.make_optim(model, args, 100)
    rng = np.random.default_rng(0)
    rows = []
    for bf16 in (False, True):
        def step():
            obs, pa, pr, act, _ = sampler.sample(args.batch_size, rng)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(obs, pa, pr)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, ad.N_ACTIONS), act.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        t = median_time(step, repeats=3 if quick else 10, warmup=1)
        rows.append(dict(row="ad_train_step", metric="bf16 autocast" if bf16 else "fp32", value=1.0 / t,
                         unit="steps/s", setting=f"batch {args.batch_size} x 80 tokens, d=64, 4 layers, "
                                                 f"{torch.get_num_threads()} threads"))
    return rows


ROWS = {"ad_kv_cache": kv_cache, "ad_train_step": train_step}
