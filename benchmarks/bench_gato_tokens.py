"""Benchmarks of gato_tokens.py: tokenizing a dataset (tokens / s) and action-generation latency
per environment step (batched over N envs, KV cache vs recomputing the context per action token)."""
import time

import numpy as np
import torch

import common
import gato_tokens as g
from bench import median_time

CPU_MODEL = dict(n_layer=2, n_embd=128, n_head=4, dropout=0.0, seq_len=48, vocab="action")


def _dataset(quick: bool) -> tuple[dict, str]:
    """The hopper expert dataset (1M transitions) when cached, else a generated random one."""
    if not quick and common.dataset_path("hopper", "expert", None, 0).exists():
        return common.load_dataset("hopper", "expert", verbose=False), "hopper expert, 1M transitions"
    n = 20_000 if quick else 200_000
    rng = np.random.default_rng(0)
    data = dict(observations=rng.normal(0, 2, (n, 11)).astype(np.float32),
                actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                rewards=np.ones(n, np.float32), terminals=np.zeros(n, bool),
                timeouts=(np.arange(n) % 1000 == 999))
    return data, f"synthetic hopper-shaped, {n} transitions"


def tokenize(quick: bool):
    """Vectorized dataset tokenization (Task) vs one layout_timestep call per transition."""
    data, what = _dataset(quick)
    args = g.Args()
    n = len(data["rewards"])
    n_tok = n * (data["observations"].shape[1] + 1 + data["actions"].shape[1])
    vec = median_time(lambda: g.Task("hopper", data, args), repeats=3 if quick else 5, warmup=1)
    m = 2000 if quick else 10_000
    obs, act = data["observations"][:m], data["actions"][:m]
    loop = median_time(lambda: [g.layout_timestep(o, a) for o, a in zip(obs, act)], repeats=3, warmup=0)
    tok_per_step = n_tok / n
    return [dict(row="gato_tokenize", metric="vectorized (Task)", value=n_tok / vec, unit="tokens/s",
                 setting=what, notes=f"{n_tok / 1e6:.1f}M tokens incl. episode split + 80% filter"),
            dict(row="gato_tokenize", metric="layout_timestep per transition", value=m * tok_per_step / loop,
                 unit="tokens/s", setting=f"{m} transitions", notes="the general nested-dict layout, one call each")]


def action_latency(quick: bool):
    """Time per env step (prefill of the context + one forward per action token), batched over N envs."""
    args = g.Args(**CPU_MODEL, temperature=0.0)
    torch.manual_seed(0)
    model = g.GatoModel(args).eval()
    gen = torch.Generator().manual_seed(0)
    out = []
    rng = np.random.default_rng(0)
    for env, n_obs, n_act in (("hopper", 11, 3), ("halfcheetah", 17, 6)):
        n_t = n_obs + 1 + n_act
        meta = dict(n_obs=n_obs, n_act=n_act, n_t=n_t,
                    prompt=g.tokenize_continuous(rng.normal(size=(8, n_t))).reshape(-1))
        for n_envs in ((1, 10) if quick else (1, 10, 50)):
            obs = rng.normal(size=(n_envs, n_obs)).astype(np.float32)
            res = {}
            for cache in (True, False):
                pol = g.GatoPolicy(model, meta, args, torch.device("cpu"), gen, kv_cache=cache)
                pol.reset(n_envs)
                for _ in range(3):                            # fill the context window first
                    pol(obs)
                res[cache] = median_time(lambda: pol(obs), repeats=5 if quick else 20, warmup=1)
            for cache in (True, False):
                out.append(dict(row="gato_action_latency", metric=f"{env} N={n_envs} {'KV cache' if cache else 'no cache'}",
                                value=res[cache] * 1e3, unit="ms/step",
                                setting=f"L=2 d=128 seq_len 48 ({args.seq_len // n_t} timesteps), {n_act} action tokens",
                                notes=f"{res[False] / res[True]:.2f}x speed-up of the cache" if cache else ""))
    return out


ROWS = {"gato_tokenize": tokenize, "gato_action_latency": action_latency}
