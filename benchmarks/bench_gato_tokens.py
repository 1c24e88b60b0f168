"""Benchmarks of gato_tokens.py, side by side in one process: tokenizing a dataset (tokens / s,
one batched layout_timestep call vs one call per transition) and the time per environment step
of the batched policy (Sec. 2.4), key-value cache vs recomputing the context per action token."""
import numpy as np
import torch

import common
import gato_tokens as g
from bench import median_time

CPU_MODEL = dict(n_layer=2, n_embd=128, n_head=4, dropout=0.0, seq_len=48, vocab="action",
                 action_positions="index", temperature=0.0)


def _dataset(quick: bool) -> tuple[dict, str]:
    """The hopper expert dataset (1M transitions) when cached, else a synthetic hopper-like one."""
    if not quick and common.dataset_path("hopper", "expert", None, 0).exists():
        return common.load_dataset("hopper", "expert", verbose=False), "hopper expert, 1M rows"
    n = 20_000 if quick else 200_000
    rng = np.random.default_rng(0)
    data = dict(observations=rng.normal(0, 2, (n, 11)).astype(np.float32),
                actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                rewards=np.ones(n, np.float32), terminals=np.zeros(n, bool),
                timeouts=(np.arange(n) % 1000 == 999))
    return data, f"synthetic hopper-shaped, {n} transitions"


def tokenize(quick: bool):
    """A whole dataset in one batched layout_timestep (Task) vs one call per transition."""
    data, what = _dataset(quick)
    args = g.Args(filter_frac=0.0)
    n, n_t = len(data["rewards"]), data["observations"].shape[1] + 1 + data["actions"].shape[1]
    vec = median_time(lambda: g.Task("hopper", data, args), repeats=3 if quick else 5, warmup=1)
    m = 2000 if quick else 10_000
    obs, act = data["observations"][:m], data["actions"][:m]
    squash = {"observation": True, "action": False}
    loop = median_time(lambda: [g.layout_timestep(obs[i:i + 1], act[i:i + 1], squash)
                                for i in range(m)], repeats=3, warmup=0)
    return [dict(row="gato_tokenize", metric="batched (Task)", value=n * n_t / vec,
                 unit="tokens/s", setting=what, notes=f"{n * loop / (m * vec):.0f}x the loop "
                 "below, with the episode split and filter"),
            dict(row="gato_tokenize", metric="layout_timestep per transition",
                 value=m * n_t / loop, unit="tokens/s", setting=f"{m} transitions")]


def action_latency(quick: bool):
    """Time per env step (context prefill + one forward per action token), N envs batched."""
    args = g.Args(**CPU_MODEL)
    torch.manual_seed(0)
    model = g.GatoModel(args).eval()
    rng = np.random.default_rng(0)
    out = []
    for env, n_obs, n_act in (("hopper", 11, 3), ("halfcheetah", 17, 6)):
        n_t = n_obs + 1 + n_act
        meta = dict(n_obs=n_obs, n_act=n_act, n_t=n_t, squash_obs=True, squash_act=False,
                    prompt=g.tokenize_continuous(rng.normal(size=(8, n_t))))
        for n_envs in ((1, 10) if quick else (1, 10, 50)):
            obs = rng.normal(size=(n_envs, n_obs)).astype(np.float32)
            res = {}
            for cache in (True, False):
                pol = g.GatoPolicy(model, meta, args, kv_cache=cache)
                pol.reset(n_envs)
                for _ in range(3):                            # fill the context window first
                    pol(obs)
                res[cache] = median_time(lambda: pol(obs), repeats=5 if quick else 20, warmup=1)
            for cache in (True, False):
                out.append(dict(row="gato_action_latency", value=res[cache] * 1e3,
                                metric=f"{env} N={n_envs} {'KV cache' if cache else 'no cache'}",
                                unit="ms/step", setting=f"L=2 d=128 seq_len 48, {n_act} actions",
                                notes=f"{res[False] / res[True]:.2f}x faster" if cache else ""))
    return out


ROWS = {"gato_tokenize": tokenize, "gato_action_latency": action_latency}
