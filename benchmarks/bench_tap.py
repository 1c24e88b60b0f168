"""Benchmarks of tap.py: decision latency of TAP's latent beam search vs TT's cached beam search.

TAP plans over H / L = 5 latent codes whatever the observation / action size (~10 small forward
passes per decision); TT generates H * (obs + act + 2) tokens. Both at horizon 15 with random
weights (latency does not depend on the weights), one decision for one state, on hopper-sized
inputs (obs 11, act 3) and on 3x larger ones (obs 33, act 9).
"""
import inspect

import numpy as np
import torch

import tap
from bench import median_time

SIZES = ((11, 3), (33, 9))


def tap_planner(obs_dim: int, act_dim: int, horizon: int = 15, **overrides):
    """A TAP planner with random weights and the paper's default sizes (override any Args field)."""
    a = tap.Args(horizon=horizon, **overrides)
    torch.manual_seed(0)
    vq, pr = tap.VQVAE(obs_dim, act_dim, a), tap.Prior(obs_dim, a)
    vq.codebook.embedding.normal_()
    d = obs_dim + act_dim + 2
    stats = dict(mean=np.zeros(d, np.float32), std=np.ones(d, np.float32))
    return tap.Planner(vq, pr, stats, a, -np.ones(act_dim), np.ones(act_dim), torch.device("cpu"))


def tap_latency(obs_dim: int, act_dim: int, horizon: int = 15, repeats: int = 5, **overrides) -> float:
    """Median seconds of one TAP decision (beam 64 x expand 4 by default) for one state."""
    planner = tap_planner(obs_dim, act_dim, horizon, **overrides)
    obs = np.random.default_rng(0).normal(size=(1, obs_dim)).astype(np.float32)
    return median_time(lambda: planner(obs), repeats=repeats, warmup=1)


def tt_latency(obs_dim: int, act_dim: int, horizon: int, quick: bool):
    """tt.py's cached planner latency through its `plan_latency` helper; None when unavailable."""
    try:
        import tt
    except Exception as e:  # noqa: BLE001 - tt.py is another file; report, don't crash
        return None, f"tt.py not importable ({type(e).__name__})"
    fn = getattr(tt, "plan_latency", None)
    if fn is None:
        try:
            return _tt_beam_plan_latency(tt, obs_dim, act_dim, horizon, quick), "timed tt.beam_plan (no plan_latency)"
        except Exception as e:  # noqa: BLE001
            return None, f"tt.py has no plan_latency() and tt.beam_plan failed ({type(e).__name__}: {e})"
    params = inspect.signature(fn).parameters
    kw = {}
    for name, val in (("obs_dim", obs_dim), ("act_dim", act_dim), ("horizon", horizon)):
        if name in params:
            kw[name] = val
    if "repeats" in params:
        kw["repeats"] = 1 if quick else 3
    out = fn(**kw) if kw else fn(obs_dim, act_dim, horizon)
    if isinstance(out, dict):  # accept a dict with seconds under a common key
        for k in ("seconds", "latency_s", "median_s", "time"):
            if k in out:
                return float(out[k]), ""
        raise ValueError(f"tt.plan_latency returned {out} without seconds")
    return float(out), ""


def _tt_beam_plan_latency(tt, obs_dim: int, act_dim: int, horizon: int, quick: bool) -> float:
    """Fallback: tt.py's cached beam_plan with its default Args (random weights, uniform bins),
    a context of max_context_transitions random transitions + the current observation."""
    args = tt.Args()
    cfg = tt.plan_config(args)
    torch.manual_seed(0)
    model = tt.build_model(args, obs_dim, act_dim, torch.device("cpu")).eval()
    D = obs_dim + act_dim + 2
    disc = tt.Discretizer(np.linspace(-1, 1, args.n_bins + 1)[:, None].repeat(D, 1).astype(np.float32))
    prefix = torch.randint(0, args.n_bins, (1, cfg["context"] * D + obs_dim))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return median_time(lambda: tt.beam_plan(model, disc, prefix, horizon, cfg["beam_width"], cfg["n_expand"],
                                                 cfg["cdf_act"], cfg["discount"], cfg["context"], True, gen),
                           repeats=1 if quick else 3, warmup=1)


def decision_latency(quick: bool):
    """TAP vs TT decision latency at H=15, hopper-sized and 3x larger obs/act, one table."""
    rows, horizon = [], 15
    tap_s, tt_s = {}, {}
    for obs_dim, act_dim in SIZES:
        setting = f"H={horizon}, obs {obs_dim}, act {act_dim}, random weights, 1 state, CPU fp32"
        if quick:  # smoke check: tiny models, tiny beam
            t = tap_latency(obs_dim, act_dim, horizon, repeats=1, beam_width=4, n_embd=32, code_dim=16,
                            n_layer=1, prior_n_embd=32, prior_n_layer=1)
        else:
            t = tap_latency(obs_dim, act_dim, horizon, repeats=5)
        tap_s[obs_dim] = t
        rows.append(dict(row="tap_decision_latency", metric="TAP latent beam search", value=1000 * t, unit="ms",
                         setting=setting, notes="beam 64 x expand 4, 5 codes; official sizes (VQ 4x128, codes 512-d, "
                                                "prior 4x512)" if not quick else "quick: tiny model, beam 4"))
        if not quick:
            tb = tap_latency(obs_dim, act_dim, horizon, repeats=5, bf16=True)
            rows.append(dict(row="tap_decision_latency", metric="TAP latent beam search, bf16 autocast",
                             value=1000 * tb, unit="ms", setting=setting.replace("fp32", "bf16"),
                             notes="--bf16"))
        s, why = tt_latency(obs_dim, act_dim, horizon, quick) if not quick else (None, "skipped in --quick")
        tt_s[obs_dim] = s
        if s is not None:
            rows.append(dict(row="tap_decision_latency", metric="TT cached beam search", value=1000 * s, unit="ms",
                             setting=setting, notes=(why or "tt.plan_latency") + "; tt.py planning defaults "
                                                          "(beam 128 x expand 2, context 5, KV cache)"))
            rows.append(dict(row="tap_decision_latency", metric="TT / TAP latency", value=s / t, unit="x",
                             setting=setting, notes="target >= 10x at hopper size"))
        else:
            rows.append(dict(row="tap_decision_latency", metric="TT cached beam search", value="n/a", unit="ms",
                             setting=setting, notes=why))
    small, big = SIZES[0][0], SIZES[1][0]
    rows.append(dict(row="tap_decision_latency", metric="TAP latency growth 3x obs/act", value=tap_s[big] / tap_s[small],
                     unit="x", setting=f"obs {small}->{big}", notes="target: flat (~1x)"))
    if tt_s[small] is not None and tt_s[big] is not None:
        rows.append(dict(row="tap_decision_latency", metric="TT latency growth 3x obs/act", value=tt_s[big] / tt_s[small],
                         unit="x", setting=f"obs {small}->{big}", notes="TT plans over H*(obs+act+2) tokens"))
    return rows


ROWS = {"tap_decision_latency": decision_latency}
