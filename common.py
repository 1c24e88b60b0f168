"""common.py: the one module every seqrl algorithm file shares.

It holds only what all of them need and nothing algorithmic:

    ENVS, make_env, normalized_score        environments and D4RL reference scores
    load_dataset, validate_dataset          D4RL-style datasets (file, Minari, cache, or generated)
    split_episodes, returns_to_go           episode helpers
    evaluate                                vectorized, seeded evaluation of a batched policy
    set_seed, get_device, rng_state, ...    reproducibility
    parse_args                              `@dataclass Args` -> argparse flags with --help
    RunLogger                               runs/{env}__{algo}__{seed}__{time}/ args.json + metrics.jsonl
    save_checkpoint, load_checkpoint        atomic, with clear errors for corrupt files

Datasets are made offline, D4RL style, with Augmented Random Search (Mania et al. 2018,
arXiv 1803.07055, variant V2-t: a linear policy on running-normalized observations,
antithetic perturbations, the top-b directions). One ARS run per (env, seed, budget) gives
    random         uniform random actions
    medium         the ARS snapshot at about 1/3 of the expert return, Gaussian action noise 0.1
    medium-replay  every training rollout ARS made until that snapshot (a real learning history)
    expert         the best evaluated ARS snapshot (at or near the end of the run), noise 0.05
    medium-expert  medium + expert, concatenated (as D4RL)
Deviation from D4RL: D4RL used SAC policies on the v2 environments; we use ARS on the
Gymnasium v5 environments because it needs nothing but numpy and a few CPU minutes.
Scores normalized with the D4RL references are therefore labelled "D4RL-normalized".

Command line:  python common.py dataset --env hopper --dataset medium
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import textwrap
import time
import typing
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: fall back to a silent iterator
    def tqdm(iterable=None, **kwargs):
        class _Silent:
            def __init__(self, it): self.it = it
            def __iter__(self): return iter(self.it)
            def update(self, n=1): pass
            def set_postfix(self, *a, **k): pass
            def set_description(self, *a, **k): pass
            def close(self): pass
            def __enter__(self): return self
            def __exit__(self, *a): pass
        return _Silent(iterable if iterable is not None else [])

# --------------------------------------------------------------------------------------
# Environments and D4RL reference scores
# --------------------------------------------------------------------------------------
ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
# D4RL reference returns (random, expert), measured on the v2 environments.
REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
DATASETS = ("random", "medium", "medium-replay", "expert", "medium-expert")
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def env_id(env: str) -> str:
    """Map a short name (hopper) to a Gymnasium id (Hopper-v5); registered Gymnasium ids pass through."""
    if env in ENVS:
        return ENVS[env]
    if env in gym.registry:
        return env
    raise ValueError(
        f"unknown env {env!r}: use one of {', '.join(ENVS)} (or any registered Gymnasium id, "
        f"e.g. InvertedPendulum-v5)")


def make_env(env: str, seed: int | None = None) -> gym.Env:
    """One Gymnasium environment (env checker off: it costs ~20% of step time)."""
    e = gym.make(env_id(env), disable_env_checker=True)
    if seed is not None:
        e.reset(seed=seed)
        e.action_space.seed(seed)
    return e


def normalized_score(env: str, returns) -> np.ndarray:
    """D4RL-normalized score, 100 * (R - random) / (expert - random); NaN for envs without references."""
    returns = np.asarray(returns, dtype=np.float64)
    if env not in REF_SCORES:
        return np.full_like(returns, np.nan)
    lo, hi = REF_SCORES[env]
    return 100.0 * (returns - lo) / (hi - lo)


def env_dims(env: str) -> tuple[int, int]:
    """(obs_dim, act_dim) of an environment, without keeping it open."""
    e = gym.make(env_id(env), disable_env_checker=True)
    dims = (int(np.prod(e.observation_space.shape)), int(np.prod(e.action_space.shape)))
    e.close()
    return dims


# --------------------------------------------------------------------------------------
# Episode helpers
# --------------------------------------------------------------------------------------
def returns_to_go(rewards, gamma: float = 1.0) -> np.ndarray:
    """R_t = sum_{k>=t} gamma^(k-t) r_k for one episode; same length as `rewards`."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if gamma == 1.0:
        return np.cumsum(rewards[::-1])[::-1].copy()
    out = np.zeros_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def split_episodes(data: dict) -> list[dict]:
    """Split a flat D4RL dict into episodes at terminals | timeouts (a trailing partial
    episode is kept). Each episode is a dict of the same keys, sliced (views)."""
    ends = np.flatnonzero(np.logical_or(data["terminals"], data["timeouts"]))
    n = len(data["rewards"])
    bounds = list(ends + 1)
    if not bounds or bounds[-1] != n:
        bounds.append(n)
    episodes, start = [], 0
    for stop in bounds:
        if stop > start:
            episodes.append({k: v[start:stop] for k, v in data.items() if len(v) == n})
        start = stop
    return episodes


# --------------------------------------------------------------------------------------
# Dataset validation
# --------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """A dataset file or dict that cannot be used as it is."""


def validate_dataset(data: dict, env: str | None = None, source: str = "dataset") -> dict:
    """Check keys, shapes, lengths, finiteness and (given env) the obs / action sizes.
    Returns the dict with float32 arrays and bool flags; `next_observations` is derived
    from the next row when absent (the episode's last row repeats its own observation)."""
    required = ("observations", "actions", "rewards", "terminals", "timeouts")
    missing = [k for k in required if k not in data]
    if missing:
        raise DatasetError(f"{source}: missing key(s) {missing}; a D4RL-style dataset needs "
                           f"{list(required)} (+ optional next_observations)")
    out = {k: np.asarray(data[k]) for k in KEYS if k in data}
    n = len(out["rewards"])
    if n == 0:
        raise DatasetError(f"{source}: the dataset is empty (0 transitions)")
    for k, v in out.items():
        if len(v) != n:
            raise DatasetError(f"{source}: key {k!r} has {len(v)} rows but 'rewards' has {n}; "
                               f"all keys must have one row per transition")
    for k in ("observations", "actions", "next_observations"):
        if k in out:
            if out[k].ndim != 2:
                raise DatasetError(f"{source}: {k!r} must be 2-D (N, dim), got shape {out[k].shape}")
            out[k] = out[k].astype(np.float32, copy=False)
    for k in ("rewards", "terminals", "timeouts"):
        if out[k].ndim != 1:
            out[k] = out[k].reshape(n) if out[k].size == n else out[k]
            if out[k].ndim != 1:
                raise DatasetError(f"{source}: {k!r} must be 1-D (N,), got shape {out[k].shape}")
    out["rewards"] = out["rewards"].astype(np.float32, copy=False)
    out["terminals"] = out["terminals"].astype(bool)
    out["timeouts"] = out["timeouts"].astype(bool)
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in out and not np.isfinite(out[k]).all():
            bad = int((~np.isfinite(out[k])).reshape(n, -1).any(1).argmax())
            raise DatasetError(f"{source}: key {k!r} contains NaN or inf (first at row {bad}); "
                               f"clean or drop those transitions")
    if "next_observations" not in out:
        nxt = np.empty_like(out["observations"])
        nxt[:-1] = out["observations"][1:]
        nxt[-1] = out["observations"][-1]
        ends = np.logical_or(out["terminals"], out["timeouts"])
        nxt[ends] = out["observations"][ends]
        out["next_observations"] = nxt
    if out["next_observations"].shape != out["observations"].shape:
        raise DatasetError(f"{source}: next_observations shape {out['next_observations'].shape} "
                           f"!= observations shape {out['observations'].shape}")
    if env is not None:
        obs_dim, act_dim = env_dims(env)
        if out["observations"].shape[1] != obs_dim:
            raise DatasetError(f"{source}: observations have {out['observations'].shape[1]} dims but "
                               f"{env_id(env)} observes {obs_dim}; is this a dataset of another env?")
        if out["actions"].shape[1] != act_dim:
            raise DatasetError(f"{source}: actions have {out['actions'].shape[1]} dims but "
                               f"{env_id(env)} takes {act_dim}; is this a dataset of another env?")
    return out


# --------------------------------------------------------------------------------------
# Dataset loading: path -> Minari -> cache -> offline generation
# --------------------------------------------------------------------------------------
def data_dir() -> Path:
    return Path(os.environ.get("SEQRL_DATA_DIR", Path.home() / ".cache" / "seqrl"))


def _atomic_write(path: Path, write_fn) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_npz(path, data: dict) -> None:
    """Atomically write a dict of arrays as .npz (loadable by load_dataset(path=...))."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **data)
    _atomic_write(Path(path), write)


def _read_file(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty (0 bytes)")
    if path.suffix in (".hdf5", ".h5"):
        try:
            import h5py
        except ImportError as e:
            raise ImportError("reading D4RL .hdf5 files needs h5py: pip install h5py") from e
        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in KEYS if k in f}
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: not a .npz file (no zip archive inside); delete it or pass a valid "
                           f".npz / D4RL .hdf5 file")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zip / format errors
        raise DatasetError(f"{path}: not a readable .npz file ({e}); delete it or pass a valid file") from e


def _load_minari(dataset_id: str, download: bool) -> dict:
    try:
        import minari
    except ImportError as e:
        raise ImportError(f"{dataset_id!r} looks like a Minari id; reading it needs minari: "
                          f"pip install minari") from e
    ds = minari.load_dataset(dataset_id, download=download)
    parts = {k: [] for k in KEYS}
    for ep in ds.iterate_episodes():
        obs = np.asarray(ep.observations)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(np.asarray(ep.terminations))
        parts["timeouts"].append(np.asarray(ep.truncations))
    return {k: np.concatenate(v) for k, v in parts.items()}


def dataset_path(env: str, dataset: str, size: int | None, seed: int, budget: int | None = None) -> Path:
    b = "" if budget is None else f"-ars{budget}"
    return data_dir() / f"{env}-{dataset}-{size or 'default'}-seed{seed}{b}.npz"


def load_dataset(env: str, dataset: str = "medium", *, path=None, size: int | None = None,
                 seed: int = 0, budget: int | None = None, download: bool = False,
                 verbose: bool = True) -> dict:
    """A D4RL-style dataset as a dict of numpy arrays (KEYS), validated against the env.

    Sources, in order: `path` (.npz or D4RL .hdf5); a Minari id (`dataset` containing "/");
    the cache `$SEQRL_DATA_DIR` (default ~/.cache/seqrl); otherwise offline ARS generation
    (cached). `size` is the number of transitions of random / medium / expert (default 1M,
    as D4RL) and a cap on medium-replay; `budget` the ARS env-step budget (default per env).
    """
    if path is not None:
        return validate_dataset(_read_file(Path(path)), env if env in ENVS or env in gym.registry else None,
                                source=str(path))
    if "/" in dataset:
        return validate_dataset(_load_minari(dataset, download), env, source=dataset)
    env_id(env)  # raises for an unknown env
    if env not in ENVS:
        raise ValueError(f"offline generation supports {list(ENVS)}; for {env!r} pass path=...")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}, "
                         f"a Minari id (e.g. mujoco/hopper/medium-v0) or path=FILE")
    file = dataset_path(env, dataset, size, seed, budget)
    if file.exists():
        return validate_dataset(_read_file(file), env, source=str(file))
    if verbose:
        print(f"[seqrl] {file.name} not cached: generating {env}/{dataset} offline with ARS "
              f"(seed {seed}) into {file.parent}", flush=True)
    data = generate_dataset(env, dataset, size=size, seed=seed, budget=budget, verbose=verbose)
    save_npz(file, data)
    if verbose:
        print(dataset_summary(env, dataset, data), flush=True)
    return validate_dataset(data, env, source=str(file))


def dataset_summary(env: str, name: str, data: dict) -> str:
    rets = np.array([ep["rewards"].sum() for ep in split_episodes(data)])
    norm = normalized_score(env, rets.mean())
    return (f"[seqrl] {env}/{name}: {len(rets)} episodes, {len(data['rewards'])} transitions, "
            f"return mean {rets.mean():.1f} min {rets.min():.1f} max {rets.max():.1f}, "
            f"D4RL-normalized mean {float(norm):.1f}")


# --------------------------------------------------------------------------------------
# Offline generation with Augmented Random Search (V2-t)
# --------------------------------------------------------------------------------------
# Per-env ARS settings (Mania et al. 2018, Table 9; alive-bonus shift Sec. 4.2) and our budget.
# halfcheetah uses N=8, b=4 instead of the paper's N=32: measured here, it reaches ~3400 in 1.5M
# steps where N=32 reached ~2000 and N=16, b=8 ~2300 (each iteration costs 2N 1000-step episodes).
ARS_CONFIG = {
    "hopper": dict(step_size=0.01, noise=0.025, n_dirs=8, top=4, shift=1.0, budget=1_000_000),
    "halfcheetah": dict(step_size=0.02, noise=0.03, n_dirs=8, top=4, shift=0.0, budget=2_500_000),
    "walker2d": dict(step_size=0.025, noise=0.01, n_dirs=40, top=30, shift=1.0, budget=3_000_000),
}
MEDIUM_NOISE, EXPERT_NOISE = 0.1, 0.05
_WORKER_ENVS: dict = {}


def _rollout(job: dict) -> dict:
    """One episode (or episodes up to `max_transitions`) of a linear policy
    a = clip(M (s - mean) / std + noise), or uniform actions when M is None. Runs in a worker."""
    name = job["env"]
    if name not in _WORKER_ENVS:
        _WORKER_ENVS[name] = make_env(name)
    env = _WORKER_ENVS[name]
    rng = np.random.default_rng(job["seed"])
    low, high = env.action_space.low, env.action_space.high
    M, mean, std = job.get("M"), job.get("mean"), job.get("std")
    record, max_tr, noise = job.get("record", False), job.get("max_transitions"), job.get("noise", 0.0)
    rows = {k: [] for k in KEYS}
    returns, shifted, lengths, obs_sum, obs_sq, count = [], [], [], 0.0, 0.0, 0
    ep = 0
    while True:
        obs, _ = env.reset(seed=int(job["seed"]) * 1000 + ep)
        ret, length, done = 0.0, 0, False
        while not done:
            if M is None:
                act = rng.uniform(low, high)
            else:
                act = M @ ((obs - mean) / std)
                if noise:
                    act = act + noise * rng.standard_normal(act.shape)
                act = np.clip(act, low, high)
            nxt, rew, term, trunc, _ = env.step(act)
            length += 1
            ret += rew
            obs_sum = obs_sum + obs
            obs_sq = obs_sq + obs * obs
            count += 1
            cut = max_tr is not None and count >= max_tr
            if record:
                for k, v in zip(KEYS, (obs, act, rew, term, trunc or (cut and not term), nxt)):
                    rows[k].append(v)
            obs, done = nxt, term or trunc or cut
        returns.append(ret)
        shifted.append(ret - job.get("shift", 0.0) * length)
        lengths.append(length)
        ep += 1
        if max_tr is None or count >= max_tr:
            break
    out = dict(returns=np.array(returns), shifted=np.array(shifted), lengths=np.array(lengths),
               obs_sum=obs_sum, obs_sq=obs_sq, count=count)
    if record:
        dtypes = (np.float32, np.float32, np.float32, bool, bool, np.float32)
        out["data"] = {k: np.asarray(rows[k], dtype=dt) for k, dt in zip(KEYS, dtypes)}
    return out


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


class _Pool:
    """Process pool for rollouts (deterministic: results come back in job order)."""
    def __init__(self, workers: int | None):
        self.workers = workers or max(1, min(os.cpu_count() or 1, 8))
        # fork where available: workers only run numpy + MuJoCo, and fork (unlike spawn) works
        # from scripts without an `if __name__ == "__main__"` guard
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.pool = ctx.Pool(self.workers) if self.workers > 1 else None

    def map(self, jobs):
        if self.pool is None:
            return [_rollout(j) for j in jobs]
        return self.pool.map(_rollout, jobs, chunksize=max(1, len(jobs) // (2 * self.workers)))

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def run_ars(env: str, seed: int = 0, budget: int | None = None, workers: int | None = None,
            verbose: bool = True, pool: _Pool | None = None) -> dict:
    """Train a linear policy with ARS V2-t for `budget` env steps, recording every training
    rollout (for medium-replay) and a policy snapshot at every evaluation."""
    cfg = dict(ARS_CONFIG[env])
    budget = budget or cfg["budget"]
    obs_dim, act_dim = env_dims(env)
    rng = np.random.default_rng(seed)
    M = np.zeros((act_dim, obs_dim))
    mean, var, n_seen = np.zeros(obs_dim), np.ones(obs_dim), 0
    s_sum, s_sq = np.zeros(obs_dim), np.zeros(obs_dim)
    own_pool = pool is None
    pool = pool or _Pool(workers)
    history, snapshots, steps, it = [], [], 0, 0
    bar = tqdm(total=budget, desc=f"ARS {env}", unit="step", disable=not verbose, mininterval=1.0)
    try:
        while steps < budget:
            std = np.sqrt(var)
            std = np.where(std < 1e-6, np.inf, std)  # constant dims contribute nothing
            deltas = rng.standard_normal((cfg["n_dirs"], act_dim, obs_dim))
            jobs = []
            for k in range(cfg["n_dirs"]):
                for sign in (1.0, -1.0):
                    jobs.append(dict(env=env, M=M + sign * cfg["noise"] * deltas[k], mean=mean, std=std,
                                     seed=int(rng.integers(2**31)), record=True, shift=cfg["shift"]))
            evaluate_now = it % 5 == 0
            eval_jobs = [dict(env=env, M=M.copy(), mean=mean, std=std, seed=int(rng.integers(2**31)))
                         for _ in range(3)] if evaluate_now else []
            results = pool.map(jobs + eval_jobs)
            train, evals = results[:len(jobs)], results[len(jobs):]
            if evaluate_now:
                snapshots.append(dict(iteration=it, steps=steps, M=M.copy(), mean=mean.copy(), std=std.copy(),
                                      eval_return=float(np.mean([r["returns"][0] for r in evals])),
                                      history_len=len(history)))
            r = np.array([res["shifted"][0] for res in train]).reshape(cfg["n_dirs"], 2)
            top = np.argsort(-r.max(1))[: cfg["top"]]  # V2-t: keep the best b directions
            sigma = r[top].std() + 1e-8
            M = M + cfg["step_size"] / (cfg["top"] * sigma) * np.einsum("k,kij->ij", r[top, 0] - r[top, 1], deltas[top])
            for res in train:  # V2: running observation statistics from every visited state
                s_sum += res["obs_sum"]
                s_sq += res["obs_sq"]
                n_seen += res["count"]
                history.append(res["data"])
            mean = s_sum / n_seen
            var = np.maximum(s_sq / n_seen - mean**2, 0.0)
            n_new = sum(int(res["count"]) for res in results)
            steps += n_new
            it += 1
            bar.update(n_new)
            if snapshots:
                bar.set_postfix(last_eval=f"{snapshots[-1]['eval_return']:.0f}")
    finally:
        bar.close()
        if own_pool:
            pool.close()
    return dict(snapshots=snapshots, history=history, steps=steps)


def _roll_policy(env, snap, noise, size, seed, pool, chunks=16, desc=""):
    """Roll a snapshot (or uniform actions when snap is None) out to exactly `size` transitions."""
    sizes = [size // chunks + (1 if i < size % chunks else 0) for i in range(chunks)]
    rng = np.random.default_rng(seed)
    jobs = [dict(env=env, M=None if snap is None else snap["M"], mean=None if snap is None else snap["mean"],
                 std=None if snap is None else snap["std"], noise=noise, seed=int(rng.integers(2**31)),
                 record=True, max_transitions=s) for s in sizes if s > 0]
    return _concat([r["data"] for r in pool.map(jobs)])


def _ars_policies(env: str, seed: int, budget: int | None, pool: _Pool, verbose: bool) -> dict:
    """The medium and expert snapshots and the medium-replay history of one ARS run,
    cached in the data folder so that every dataset of (env, seed, budget) shares one run."""
    file = data_dir() / f"{env}-ars-seed{seed}-budget{budget or ARS_CONFIG[env]['budget']}.npz"
    if file.exists():
        with np.load(file) as f:
            z = {k: f[k] for k in f.files}
        snap = lambda p: {k: z[f"{p}_{k}"] for k in ("M", "mean", "std", "eval_return")}
        return dict(medium=snap("medium"), expert=snap("expert"),
                    replay={k: z[f"replay_{k}"] for k in KEYS})
    run = run_ars(env, seed, budget, verbose=verbose, pool=pool)
    snaps = run["snapshots"]
    best = max(range(len(snaps)), key=lambda i: snaps[i]["eval_return"])
    expert = snaps[best]
    # the medium snapshot: closest to 1/3 of the expert return, after at least one ARS update
    candidates = [s for s in snaps[: best + 1] if s["history_len"] > 0] or [snaps[-1]]
    medium = min(candidates, key=lambda s: abs(s["eval_return"] - expert["eval_return"] / 3.0))
    if verbose:
        print(f"[seqrl] ARS: {run['steps']} steps; expert snapshot return {expert['eval_return']:.0f} "
              f"(iteration {expert['iteration']}), medium snapshot {medium['eval_return']:.0f} "
              f"(iteration {medium['iteration']})", flush=True)
    replay = _concat(run["history"][: medium["history_len"] or len(run["history"])])
    z = {f"{p}_{k}": np.asarray(s[k]) for p, s in (("medium", medium), ("expert", expert))
         for k in ("M", "mean", "std", "eval_return")}
    z.update({f"replay_{k}": v for k, v in replay.items()})
    save_npz(file, z)
    return dict(medium=medium, expert=expert, replay=replay)


def generate_dataset(env: str, dataset: str, size: int | None = None, seed: int = 0,
                     budget: int | None = None, workers: int | None = None, verbose: bool = True) -> dict:
    """Generate one D4RL-style dataset offline (see the module docstring). Deterministic per seed."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    size = size or 1_000_000
    pool = _Pool(workers)
    try:
        if dataset == "random":
            return _roll_policy(env, None, 0.0, size, seed, pool)
        ars = _ars_policies(env, seed, budget, pool, verbose)
        if dataset == "medium-replay":
            data = ars["replay"]
            if len(data["rewards"]) > size:  # keep the earliest `size` transitions; the cut ends an episode
                data = {k: v[:size].copy() for k, v in data.items()}
                data["timeouts"][-1] |= ~data["terminals"][-1]
            return data
        parts = []
        if dataset in ("medium", "medium-expert"):
            parts.append(_roll_policy(env, ars["medium"], MEDIUM_NOISE, size, seed + 1, pool))
        if dataset in ("expert", "medium-expert"):
            parts.append(_roll_policy(env, ars["expert"], EXPERT_NOISE, size, seed + 2, pool))
        return _concat(parts)
    finally:
        pool.close()


# --------------------------------------------------------------------------------------
# Vectorized evaluation
# --------------------------------------------------------------------------------------
def evaluate(policy, env: str, n_episodes: int = 10, seed: int = 0, progress: bool = False,
             max_steps: int | None = None) -> dict:
    """Run `n_episodes` episodes at once in a Gymnasium vector env (episode i seeded seed + i).

    `policy(obs)` gets a float32 array (n_episodes, obs_dim) with every env's current
    observation and returns actions (n_episodes, act_dim) (numpy or torch). Optional hooks:
    `policy.reset(n)` before the first step, `policy.observe(rewards, dones)` after every
    step (e.g. to decrement a return-to-go). Finished episodes are masked: their next
    actions are ignored, and the vector env's next-step autoreset is never counted.
    Returns {"returns", "lengths", "normalized"} as numpy arrays of length n_episodes.
    """
    envs = gym.vector.SyncVectorEnv([lambda: make_env(env) for _ in range(n_episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    obs, _ = envs.reset(seed=[seed + i for i in range(n_episodes)])
    if hasattr(policy, "reset"):
        policy.reset(n_episodes)
    returns, lengths = np.zeros(n_episodes), np.zeros(n_episodes, dtype=np.int64)
    active = np.ones(n_episodes, dtype=bool)
    limit = max_steps or envs.envs[0].spec.max_episode_steps or 10**9
    bar = tqdm(total=n_episodes, desc="eval", unit="ep", disable=not progress, leave=False)
    try:
        for _ in range(limit):
            act = policy(obs.astype(np.float32))
            if isinstance(act, torch.Tensor):
                act = act.detach().cpu().numpy()
            act = np.asarray(act, dtype=np.float64).reshape((n_episodes,) + envs.single_action_space.shape)
            obs, rew, term, trunc, _ = envs.step(act)
            done = np.logical_or(term, trunc)
            returns += np.where(active, rew, 0.0)
            lengths += active
            if hasattr(policy, "observe"):
                policy.observe(np.where(active, rew, 0.0).astype(np.float32), np.logical_or(done, ~active))
            newly = active & done
            active &= ~done
            bar.update(int(newly.sum()))
            if not active.any():
                break
    finally:
        bar.close()
        envs.close()
    return dict(returns=returns, lengths=lengths, normalized=normalized_score(env, returns))


# --------------------------------------------------------------------------------------
# Reproducibility and devices
# --------------------------------------------------------------------------------------
def set_seed(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def get_device(cuda: bool = True) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def rng_state() -> dict:
    """Every RNG state a run depends on (for exact resume)."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# Arguments: a dataclass with attribute docstrings -> argparse
# --------------------------------------------------------------------------------------
def _field_docs(cls) -> dict:
    """The string literal written under each field (CleanRL style) becomes its --help text."""
    docs = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass (fields -> --flags, docs -> --help) and parse."""
    doc = (cls.__doc__ or "").strip()
    module_doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(description=module_doc or doc,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(default=default, help=docs.get(f.name, " ").replace("%", "%%"), dest=f.name)
        origin, targs = typing.get_origin(typ), typing.get_args(typ)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            non_none = [a for a in targs if a is not type(None)]
            typ = non_none[0] if len(non_none) == 1 else str
            origin, targs = typing.get_origin(typ), typing.get_args(typ)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif origin in (tuple, list):
            parser.add_argument(flag, nargs="+", type=targs[0] if targs else str, **kwargs)
        else:
            parser.add_argument(flag, type=typ, **kwargs)
    ns = parser.parse_args(argv)
    values = vars(ns)
    for f in dataclasses.fields(cls):  # nargs="+" gives lists; tuple (or Optional[tuple]) fields want tuples
        if isinstance(values[f.name], list) and "tuple" in str(hints[f.name]).lower():
            values[f.name] = tuple(values[f.name])
    return cls(**values)


# --------------------------------------------------------------------------------------
# Runs, logs and checkpoints
# --------------------------------------------------------------------------------------
def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


class RunLogger:
    """runs/{env}__{algo}__{seed}__{time}/ with args.json and metrics.jsonl (one JSON object
    per event, CleanRL-style names), plus TensorBoard (--tensorboard) and wandb (--track)."""

    def __init__(self, args, algo: str, run_dir: str | Path | None = None, root: str = "runs",
                 tensorboard: bool = False, track: bool = False, wandb_project: str = "seqrl"):
        cfg = {k: _jsonable(v) for k, v in (dataclasses.asdict(args) if dataclasses.is_dataclass(args)
                                            else dict(args)).items()}
        if run_dir is None:
            name = f"{cfg.get('env', 'env')}__{cfg.get('exp_name') or algo}__{cfg.get('seed', 0)}__{int(time.time())}"
            run_dir = Path(root) / name
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard needs tensorboard: pip install tensorboard") from e
            self.tb = SummaryWriter(str(self.dir))
        if track:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("--track needs wandb: pip install wandb") from e
            self.wandb = wandb.init(project=wandb_project, name=self.dir.name, config=cfg,
                                    dir=str(self.dir), resume="allow", id=self.dir.name)

    def log(self, step: int, **metrics) -> None:
        record = {"step": int(step), "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if self.tb is not None and isinstance(record[k], (int, float)):
                self.tb.add_scalar(k, record[k], step)
        if self.wandb is not None:
            self.wandb.log({k: record[k] for k in metrics}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or lacks what is needed."""


def save_checkpoint(path, state: dict) -> None:
    """torch.save through a temp file + rename, so a crash never leaves half a checkpoint."""
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu", required=()) -> dict:
    """Load a checkpoint written by save_checkpoint; any unreadable file raises CheckpointError.
    Loads with weights_only=False (it holds RNG states and args): only load files you trust."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a seqrl checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]}); use another file") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; was it written by another script?")
    return state


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description="seqrl shared tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dataset", help="generate (or find) a dataset and print its summary",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--env", default="hopper", help=f"one of {', '.join(ENVS)}")
    d.add_argument("--dataset", default="medium", help=f"one of {', '.join(DATASETS)} or a Minari id")
    d.add_argument("--path", default=None, help="read this .npz / .hdf5 instead")
    d.add_argument("--size", type=int, default=None, help="transitions (default 1M, as D4RL)")
    d.add_argument("--seed", type=int, default=0, help="generation seed")
    d.add_argument("--budget", type=int, default=None, help="ARS env steps (default per env)")
    a = parser.parse_args(argv)
    t0 = time.time()
    cached = a.path is not None or "/" in a.dataset or dataset_path(a.env, a.dataset, a.size, a.seed, a.budget).exists()
    data = load_dataset(a.env, a.dataset, path=a.path, size=a.size, seed=a.seed, budget=a.budget)
    if cached:  # a fresh generation has printed its summary already
        print(dataset_summary(a.env, a.path or a.dataset, data))
    print(f"[seqrl] done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
