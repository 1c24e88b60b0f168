"""Benchmarks of tap.py: decision latency of TAP vs tt.py's cached planner, side by side.

One decision for one state at H = 15 with random weights (latency does not depend on them), on
hopper sizes (obs 11, act 3) and 3x larger ones (obs 33, act 9), in fp32 and with --bf16. TAP at
its official widths (VQ-VAE and prior 4 layers x 512, beam 64 x expand 4, 5 codes). TT through
tt.load_policy at tt.py's defaults (width 128, beam 128 x expand 2, context 5, key-value cache),
timed at replanning steps with a full context (plan_freq 15: it plans at t = 15, 30, ...).
TAP and TT are timed alternately, so the machine's load hits both alike.

    python benchmarks/bench.py --only tap_decision_latency
"""
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tap

SIZES = ((11, 3), (33, 9))
H = 15
PRIOR_NATS = 4.5  # prior NLL per code at the end of the CPU run in README (6000 + 4000 steps)


def tap_policy(obs_dim: int, act_dim: int, **overrides):
    """A TAP planner with random weights at the official sizes (override any Args field)."""
    args = tap.Args(horizon=H, **overrides)
    torch.manual_seed(0)
    vq, pr = tap.VQVAE(obs_dim, act_dim, args), tap.Prior(obs_dim, args)
    vq.codebook.embedding.normal_()
    d = obs_dim + act_dim + 2
    return tap.Planner(vq, pr, dict(mean=torch.zeros(d), std=torch.ones(d)), args)


def sharpen_prior(policy, nats: float) -> float:
    """Scale the prior's output so that its first-code entropy is `nats` (as a trained prior's
    NLL): sampling then draws duplicates, which the beam decodes once. Returns the scale."""
    head, s = policy.prior.head.weight.data, torch.randn(64, policy.vqvae.obs_dim)
    base, lo, hi = head.clone(), 1.0, 1e4
    for _ in range(40):  # bisection on a log scale: entropy falls as the scale grows
        mid = (lo * hi) ** 0.5
        head.copy_(base * mid)
        with torch.no_grad():
            logp = torch.log_softmax(tap.prior_next(policy.prior, None, s)[0], -1)
        lo, hi = (mid, hi) if -(logp.exp() * logp).sum(1).mean() > nats else (lo, mid)
    return lo


def tap_decision(policy, obs_dim: int):
    obs = np.random.default_rng(0).normal(size=(1, obs_dim)).astype(np.float32)
    return lambda: policy(obs)


def tt_decision(obs_dim: int, act_dim: int, folder: Path, bf16: bool):
    """One TT replanning step with a full context, through tt.load_policy; (fn, "") or (None,
    why) when tt.py's API does not fit (it is another file, rewritten on its own)."""
    try:
        import tt
        args = tt.Args()
        model = tt.GPT(obs_dim, act_dim, args.n_layer, args.n_embd)
        D = obs_dim + act_dim + 2
        edges = torch.linspace(-1, 1, tt.N_BINS + 1, dtype=torch.float64)[:, None].repeat(1, D)
        path = folder / f"tt_{obs_dim}.pt"
        torch.save(dict(algo="tt", args=dataclasses.asdict(args), obs_dim=obs_dim,
                        act_dim=act_dim, model=model.state_dict(), thresholds=edges), path)
        policy = tt.load_policy(path, plan_freq=H, bf16=bf16)
        policy.reset(1)
    except Exception as e:  # noqa: BLE001 - report, don't crash the harness
        return None, f"tt.py not usable here ({type(e).__name__}: {e})"[:160]
    rng = np.random.default_rng(0)

    def step():
        act = policy(rng.uniform(-1, 1, (1, obs_dim)).astype(np.float32))
        policy.observe(np.zeros(1, np.float32), np.zeros(1, bool))
        return act

    def decision():  # 14 steps follow the plan (cheap); the next one, t = 15 k, replans
        for _ in range(H - 1):
            step()
        t = time.perf_counter()
        step()
        return time.perf_counter() - t

    step()  # t = 0 plans with an empty context; by t = 15 the context holds 5 transitions
    return decision, ""


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decision_latency(quick: bool):
    """TAP vs TT decision latency at H = 15: hopper sizes and 3x obs / act, fp32 and bf16."""
    rows, repeats, folder = [], 1 if quick else 3, Path(tempfile.mkdtemp())
    small = dict(n_embd=32, code_dim=16, n_layer=1, beam_width=4) if quick else {}
    tap_s, tt_s = {}, {}
    for bf16 in (False, True):
        kind = "bf16 autocast" if bf16 else "fp32"
        for obs_dim, act_dim in SIZES:
            setting = f"H={H}, obs {obs_dim}, act {act_dim}, 1 state, CPU {kind}"
            t_fn = tap_decision(tap_policy(obs_dim, act_dim, bf16=bf16, **small), obs_dim)
            tt_fn, why = (None, "skipped in --quick") if quick else tt_decision(
                obs_dim, act_dim, folder, bf16)
            t_fn()  # warm-up
            tap_t, tt_t = [], []
            for _ in range(repeats):  # alternate, so the load hits both alike
                tap_t.append(timed(t_fn))
                tt_t += [tt_fn()] if tt_fn else []
            a = tap_s[(obs_dim, bf16)] = statistics.median(tap_t)
            rows.append(dict(row="tap_decision_latency", metric="TAP latent beam search",
                             value=1000 * a, unit="ms", setting=setting,
                             notes="quick: tiny model" if quick else
                             "official widths: VQ-VAE 4x512, prior 4x512, beam 64x4"))
            if tt_t:
                b = tt_s[(obs_dim, bf16)] = statistics.median(tt_t)
                rows += [dict(row="tap_decision_latency", metric="TT cached beam search",
                              value=1000 * b, unit="ms", setting=setting,
                              notes="tt.load_policy: width 128, beam 128x2, context 5, KV cache"),
                         dict(row="tap_decision_latency", metric="TT / TAP latency", value=b / a,
                              unit="x", setting=setting, notes="target >= 10x")]
            else:
                rows.append(dict(row="tap_decision_latency", metric="TT cached beam search",
                                 value="n/a", unit="ms", setting=setting, notes=why))
        growth = tap_s[(SIZES[1][0], bf16)] / tap_s[(SIZES[0][0], bf16)]
        rows.append(dict(row="tap_decision_latency", metric="TAP latency growth, 3x obs/act",
                         value=growth, unit="x", setting=f"CPU {kind}", notes="target: flat"))
        for dedupe in (True, False):  # a trained-like prior draws duplicates: decoded once
            policy = tap_policy(SIZES[0][0], SIZES[0][1], bf16=bf16, **small)
            policy.dedupe = dedupe
            scale = sharpen_prior(policy, PRIOR_NATS)
            fn = tap_decision(policy, SIZES[0][0])
            fn()
            a = statistics.median([timed(fn) for _ in range(repeats)])
            rows.append(dict(row="tap_decision_latency", value=1000 * a, unit="ms",
                             metric=f"TAP, prior entropy {PRIOR_NATS} nats"
                                    + ("" if dedupe else ", every candidate decoded"),
                             setting=f"H={H}, obs 11, act 3, 1 state, CPU {kind}",
                             notes=f"prior logits x{scale:.3g}; TT / this: "
                                   + (f"{tt_s[(11, bf16)] / a:.2f}x" if (11, bf16) in tt_s
                                      else "n/a")))
        if (SIZES[1][0], bf16) in tt_s:
            rows.append(dict(row="tap_decision_latency", metric="TT latency growth, 3x obs/act",
                             value=tt_s[(SIZES[1][0], bf16)] / tt_s[(SIZES[0][0], bf16)],
                             unit="x", setting=f"CPU {kind}", notes="H (obs+act+2) tokens"))
    return rows


ROWS = {"tap_decision_latency": decision_latency}
