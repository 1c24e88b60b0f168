"""Benchmarks of ad.py: the key-value cached in-context rollout vs recomputing the window, and
training updates per second at the paper's setting and at the CPU run's, with and without
attention dropout (SDPA takes a slower path when dropout_p > 0)."""
import numpy as np
import torch

import ad
from bench import median_time


def kv_cache(quick: bool):
    """In-context evaluation, one model call per env step for every task at once: with the cache
    each step feeds one token (plus one prefill per episode once the window slides); without it
    every step recomputes the whole window. The same actions either way (tests/test_ad.py)."""
    args = ad.Args()
    n_tasks, episodes = (8, 6) if quick else (64, 12)   # the final evaluation: 16 tasks x 4 runs
    torch.manual_seed(0)
    model = ad.make_model(args).eval()
    tasks = np.repeat(ad.all_tasks("darkroom")[::5][:16], max(1, n_tasks // 16), 0)[:n_tasks]

    def run(cache):
        policy = ad.InContextPolicy(model, args.context_episodes, use_cache=cache)
        ad.in_context_returns(policy, "darkroom", tasks, episodes)
    t_cache = median_time(lambda: run(True), repeats=3 if quick else 5, warmup=1)
    t_full = median_time(lambda: run(False), repeats=3 if quick else 5, warmup=1)
    steps = episodes * 20
    setting = (f"darkroom, {len(tasks)} tasks, {episodes} episodes x 20 steps, window "
               f"{args.context_episodes} episodes, paper model (FF {args.ff_dim}), "
               f"{torch.get_num_threads()} threads")
    return [dict(row="ad_kv_cache", metric="cached step", value=1e3 * t_cache / steps,
                 unit="ms/env step", setting=setting),
            dict(row="ad_kv_cache", metric="recompute window", value=1e3 * t_full / steps,
                 unit="ms/env step", setting=setting),
            dict(row="ad_kv_cache", metric="speedup", value=t_full / t_cache, unit="x",
                 setting=setting, notes="identical actions (tests/test_ad.py)")]


def train_step(quick: bool):
    """AD updates per second (one model) at the paper's setting (batch 128, FF 2048) and at the
    CPU run's (batch 64, FF 256), each with the table's attention dropout 0.5 and without it."""
    goals = ad.all_tasks("darkroom")[:16]
    h = ad.q_learning(ad.BatchDarkRoom("darkroom", goals), 16, np.random.default_rng(0))
    gen, rows, speed = torch.Generator().manual_seed(0), [], {}
    for name, batch, ff in (("paper", 128, 2048), ("CPU run", 64, 256)):
        for p in (0.5, 0.0):
            args = ad.Args(batch_size=batch, ff_dim=ff, attn_dropout=p, total_steps=100)
            sampler = ad.WindowSampler(h, args.context_episodes, torch.device("cpu"))
            torch.manual_seed(0)
            model = ad.make_model(args).train()
            opt, _ = ad.make_optimizer(model, args)

            def step():
                loss = ad.ad_loss(model, sampler.sample(args.batch_size, gen))
                opt.zero_grad()
                loss.backward()
                opt.step()
            speed[name, p] = 1.0 / median_time(step, repeats=3 if quick else 10, warmup=1)
            rows.append(dict(row="ad_train_step", metric=f"{name}, attention dropout {p}",
                             value=speed[name, p], unit="updates/s",
                             setting=f"batch {batch} x 80 tokens, d 64, FF {ff}, 4 layers, "
                                     f"{torch.get_num_threads()} threads"))
    for name in ("paper", "CPU run"):
        rows.append(dict(row="ad_train_step", metric=f"{name}: dropout 0 / dropout 0.5",
                         value=speed[name, 0.0] / speed[name, 0.5], unit="x"))
    rows.append(dict(row="ad_train_step", metric="CPU run / paper (dropout 0.5)",
                     value=speed["CPU run", 0.5] / speed["paper", 0.5], unit="x"))
    return rows


ROWS = {"ad_kv_cache": kv_cache, "ad_train_step": train_step}
