"""make_datasets.py: seqrl's data preparation, run once (like nanoGPT's prepare.py).

    python make_datasets.py --env hopper --dataset medium   # into $SEQRL_DATA_DIR (~/.cache/seqrl)

Augmented Random Search (Mania et al. 2018, arXiv 1803.07055, variant V2-t: a linear policy on
running-normalized observations, antithetic perturbations, the top-b directions) trains one linear
policy per (env, seed, budget); its rollouts give D4RL's five datasets:
    random         uniform random actions
    medium         the ARS snapshot at about 1/3 of the expert return, Gaussian action noise 0.1
    medium-replay  every training rollout ARS made until that snapshot (a real learning history)
    expert         the best evaluated ARS snapshot (at or near the end of the run), noise 0.05
    medium-expert  medium + expert, concatenated (as D4RL)
Deviation from D4RL: D4RL used SAC policies on the v2 environments; here ARS runs on the Gymnasium
v5 environments because it needs nothing but numpy and a few CPU minutes, so scores normalized with
the D4RL references are labelled "D4RL-normalized". Deterministic per seed; atomic writes.
`common.load_dataset` calls `prepare` on a cache miss: it generates, or reads and validates a
user's .npz / D4RL .hdf5 file or a local Minari dataset.
Games (Multi-Game DT): "minatar/<game>" dataset "dqn" is the whole learning history of a DQN
agent (MinAtar's examples/dqn.py; deviation: an update every 4th frame, 500k frames, for 2 CPUs)
with its final policy's and a random policy's scores (`python make_datasets.py --env minatar/all
--workers 2`); "atari/<Game>" dataset "dqn-replay" reads Dopamine DQN-Replay files (--dataset-path).
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import re
import time
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from common import (
    ENVS,
    KEYS,
    REF_SCORES,
    DatasetError,
    data_dir,
    dataset_path,
    env_dims,
    env_id,
    load_dataset,
    make_env,
    normalized_score,
    save_npz,
    split_episodes,
    tqdm,
)

# --------------------------------------------------------------------------------------
# Offline generation with Augmented Random Search (V2-t)
# --------------------------------------------------------------------------------------
# Per-env ARS settings (Mania et al. 2018, Table 9; alive-bonus shift Sec. 4.2) and our budget.
# halfcheetah uses N=8, b=4 instead of the paper's N=32: measured here, it reaches ~3400 in 1.5M
# steps where N=32 reached ~2000 and N=16, b=8 ~2300 (each iteration costs 2N 1000-step episodes).
DATASETS = ("random", "medium", "medium-replay", "expert", "medium-expert")
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
    record, max_tr, noise = (
        job.get("record", False),
        job.get("max_transitions"),
        job.get("noise", 0.0),
    )
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
    out = dict(
        returns=np.array(returns),
        shifted=np.array(shifted),
        lengths=np.array(lengths),
        obs_sum=obs_sum,
        obs_sq=obs_sq,
        count=count,
    )
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

    def imap(self, jobs):
        """Results in job order as they finish (for a progress bar)."""
        if self.pool is None:
            return (_rollout(j) for j in jobs)
        return self.pool.imap(_rollout, jobs)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def run_ars(
    env: str,
    seed: int = 0,
    budget: int | None = None,
    workers: int | None = None,
    verbose: bool = True,
    pool: _Pool | None = None,
) -> dict:
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
                    jobs.append(
                        dict(
                            env=env,
                            M=M + sign * cfg["noise"] * deltas[k],
                            mean=mean,
                            std=std,
                            seed=int(rng.integers(2**31)),
                            record=True,
                            shift=cfg["shift"],
                        )
                    )
            evaluate_now = it % 5 == 0
            eval_jobs = (
                [
                    dict(env=env, M=M.copy(), mean=mean, std=std, seed=int(rng.integers(2**31)))
                    for _ in range(3)
                ]
                if evaluate_now
                else []
            )
            results = pool.map(jobs + eval_jobs)
            train, evals = results[: len(jobs)], results[len(jobs) :]
            if evaluate_now:
                snapshots.append(
                    dict(
                        iteration=it,
                        steps=steps,
                        M=M.copy(),
                        mean=mean.copy(),
                        std=std.copy(),
                        eval_return=float(np.mean([r["returns"][0] for r in evals])),
                        history_len=len(history),
                    )
                )
            r = np.array([res["shifted"][0] for res in train]).reshape(cfg["n_dirs"], 2)
            top = np.argsort(-r.max(1))[: cfg["top"]]  # V2-t: keep the best b directions
            sigma = r[top].std() + 1e-8
            M = M + cfg["step_size"] / (cfg["top"] * sigma) * np.einsum(
                "k,kij->ij", r[top, 0] - r[top, 1], deltas[top]
            )
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


def _roll_policy(env, snap, noise, size, seed, pool, chunks=16, verbose=False):
    """Roll a snapshot (or uniform actions when snap is None) out to exactly `size` transitions."""
    sizes = [size // chunks + (1 if i < size % chunks else 0) for i in range(chunks)]
    rng = np.random.default_rng(seed)
    jobs = [
        dict(
            env=env,
            M=None if snap is None else snap["M"],
            mean=None if snap is None else snap["mean"],
            std=None if snap is None else snap["std"],
            noise=noise,
            seed=int(rng.integers(2**31)),
            record=True,
            max_transitions=s,
        )
        for s in sizes
        if s > 0
    ]
    parts = []
    with tqdm(total=size, desc=f"rollout {env}", unit="step", disable=not verbose) as bar:
        for r in pool.imap(jobs):
            parts.append(r["data"])
            bar.update(len(r["data"]["rewards"]))
    return _concat(parts)


def _ars_policies(env: str, seed: int, budget: int | None, pool: _Pool, verbose: bool) -> dict:
    """The medium and expert snapshots and the medium-replay history of one ARS run,
    cached in the data folder so that every dataset of (env, seed, budget) shares one run."""
    file = data_dir() / f"{env}-ars-seed{seed}-budget{budget or ARS_CONFIG[env]['budget']}.npz"
    if file.exists():
        with np.load(file) as f:
            z = {k: f[k] for k in f.files}

        def snap(p):
            return {k: z[f"{p}_{k}"] for k in ("M", "mean", "std", "eval_return")}

        return dict(
            medium=snap("medium"), expert=snap("expert"), replay={k: z[f"replay_{k}"] for k in KEYS}
        )
    run = run_ars(env, seed, budget, verbose=verbose, pool=pool)
    snaps = run["snapshots"]
    best = max(range(len(snaps)), key=lambda i: snaps[i]["eval_return"])
    expert = snaps[best]
    # the medium snapshot: closest to 1/3 of the expert return, after at least one ARS update
    candidates = [s for s in snaps[: best + 1] if s["history_len"] > 0] or [snaps[-1]]
    medium = min(candidates, key=lambda s: abs(s["eval_return"] - expert["eval_return"] / 3.0))
    if verbose:
        print(
            f"[seqrl] ARS: {run['steps']} steps; expert snapshot return "
            f"{expert['eval_return']:.0f} "
            f"(iteration {expert['iteration']}), medium snapshot {medium['eval_return']:.0f} "
            f"(iteration {medium['iteration']})",
            flush=True,
        )
    replay = _concat(run["history"][: medium["history_len"] or len(run["history"])])
    z = {
        f"{p}_{k}": np.asarray(s[k])
        for p, s in (("medium", medium), ("expert", expert))
        for k in ("M", "mean", "std", "eval_return")
    }
    z.update({f"replay_{k}": v for k, v in replay.items()})
    save_npz(file, z)
    return dict(medium=medium, expert=expert, replay=replay)


def generate_dataset(
    env: str,
    dataset: str,
    size: int | None = None,
    seed: int = 0,
    budget: int | None = None,
    workers: int | None = None,
    verbose: bool = True,
) -> dict:
    """One D4RL-style dataset, generated offline (the module docstring). Deterministic per seed."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    size = size or 1_000_000
    pool = _Pool(workers)
    try:
        if dataset == "random":
            return _roll_policy(env, None, 0.0, size, seed, pool, verbose=verbose)
        ars = _ars_policies(env, seed, budget, pool, verbose)
        if dataset == "medium-replay":
            data = ars["replay"]
            if (
                len(data["rewards"]) > size
            ):  # keep the earliest `size` transitions; the cut ends an episode
                data = {k: v[:size].copy() for k, v in data.items()}
                data["timeouts"][-1] |= ~data["terminals"][-1]
            return data
        parts = []
        if dataset in ("medium", "medium-expert"):
            parts.append(
                _roll_policy(
                    env, ars["medium"], MEDIUM_NOISE, size, seed + 1, pool, verbose=verbose
                )
            )
        if dataset in ("expert", "medium-expert"):
            parts.append(
                _roll_policy(
                    env, ars["expert"], EXPERT_NOISE, size, seed + 2, pool, verbose=verbose
                )
            )
        return _concat(parts)
    finally:
        pool.close()


# ----------------------------------------------------------------------- import and validate
def validate_dataset(data: dict, env: str, source: str = "dataset") -> dict:
    """Keys, shapes, finite values, 0 / 1 flags and the env's sizes, checked; float32 arrays and
    bool flags out; `next_observations` made from the next row when absent."""
    if missing := [k for k in KEYS[:5] if k not in data]:
        raise DatasetError(f"{source}: missing key(s) {missing}; a D4RL dataset has {list(KEYS)}")
    n, out, flat = len(data["rewards"]), {}, ("rewards", "terminals", "timeouts")
    for k in (k for k in KEYS if k in data):
        try:
            v = np.asarray(data[k], dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise DatasetError(
                f"{source}: {k!r} is not numeric ({np.asarray(data[k]).dtype})"
            ) from e
        if n == 0 or len(v) != n or v.ndim != (1 if k in flat else 2):
            raise DatasetError(
                f"{source}: {k!r} has shape {v.shape}, not ({n},"
                f"{'' if k in flat else ' dim'}) with {n} > 0 rows"
            )
        if not np.isfinite(v).all():
            row = int((~np.isfinite(v)).reshape(n, -1).any(1).argmax())
            raise DatasetError(f"{source}: {k!r} is NaN or inf at row {row}; clean the data")
        if k in flat[1:] and not np.isin(v, (0.0, 1.0)).all():
            raise DatasetError(f"{source}: {k!r} holds values other than 0 / 1 (they are flags)")
        out[k] = v.astype(bool) if k in flat[1:] else v
    if not (out["terminals"][-1] or out["timeouts"][-1]):
        print(f"[seqrl] {source}: the last episode has no end flag; it ends with a timeout")
        out["timeouts"][-1] = True
    if "next_observations" not in out:  # the next row; an episode's last row repeats itself
        end = (out["terminals"] | out["timeouts"])[:, None]
        out["next_observations"] = np.where(
            end, out["observations"], np.roll(out["observations"], -1, axis=0)
        )
    obs_dim, act_dim = env_dims(env)
    for k, dim in (("observations", obs_dim), ("actions", act_dim), ("next_observations", obs_dim)):
        if out[k].shape[1] != dim:
            raise DatasetError(
                f"{source}: {k} have {out[k].shape[1]} dims but {env_id(env)} has "
                f"{dim}; is it a dataset of another env? (set --env)"
            )
    return out


def read_npz(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({e})") from e


def read_hdf5(path, env: str) -> dict:
    """A D4RL .hdf5 file (v2, or v0 without `timeouts`: derived from the env's step limit, as
    d4rl's own qlearning_dataset did)."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading D4RL .hdf5 files needs h5py: pip install h5py") from e
    try:
        with h5py.File(path, "r") as f:
            data = {k: f[k][()] for k in KEYS if k in f}
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({e}); pass a D4RL .hdf5") from e
    if "timeouts" not in data and "terminals" in data:
        limit = make_env(env).spec.max_episode_steps
        print(
            f"[seqrl] {path}: no 'timeouts' (D4RL v0 layout); an episode that reaches the "
            f"{limit}-step limit of {env} without a terminal ends with a timeout"
        )
        timeouts, t = np.zeros(len(data["terminals"]), dtype=bool), 0
        for i, term in enumerate(np.asarray(data["terminals"]).reshape(-1)):
            t += 1
            timeouts[i] = t == limit and not term
            t = 0 if term or timeouts[i] else t
        data["timeouts"] = timeouts
    return data


def read_minari(dataset_id: str) -> tuple[dict, str]:
    """A local Minari dataset as D4RL arrays, and its env (from the dataset's env_spec). An id
    without -vN takes the newest local version; the dataset's reference scores are registered."""
    try:
        import minari
    except ImportError as e:
        raise ImportError(
            f"{dataset_id!r} is a Minari id; reading it needs: pip install minari"
        ) from e
    local = sorted(minari.list_local_datasets(), key=lambda d: int(d.rsplit("-v", 1)[-1]))
    found = [d for d in local if d == dataset_id or d.rsplit("-v", 1)[0] == dataset_id]
    if not found:
        raise DatasetError(
            f"Minari dataset {dataset_id!r} is not on disk: run `minari download "
            f"{dataset_id}` first (nothing downloads at run time)"
        )
    ds = minari.load_dataset(found[-1])
    meta = ds.storage.metadata
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        REF_SCORES[dataset_id] = (float(meta["ref_min_score"]), float(meta["ref_max_score"]))
    eps = list(ds.iterate_episodes())
    parts = {k: [] for k in KEYS}
    for e in eps:
        for k, v in zip(
            KEYS,
            (
                e.observations[:-1],
                e.actions,
                e.rewards,
                e.terminations,
                e.truncations,
                e.observations[1:],
            ),
        ):
            parts[k].append(np.asarray(v))
    gid = ds.spec.env_spec.id
    return {k: np.concatenate(v) for k, v in parts.items()}, next(
        (k for k, v in ENVS.items() if v == gid), gid
    )


# --------------------------------------------------------------------------------------
# Games (Multi-Game DT): MinAtar data from a DQN source agent, Atari DQN-Replay files
# --------------------------------------------------------------------------------------
# MinAtar (Young & Tian 2019, arXiv 1903.03176): 10x10xC binary frames, 6 actions n,l,u,r,d,f in
# every game. The environment settings below are shared with dt.py's evaluation (the contract).
MINATAR_CHANNELS = {"asterix": 4, "breakout": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}
MINATAR_ACTIONS = 6
MAX_EPISODE_STEPS = 2500  # env steps; the row at the cap gets a timeout flag
STICKY_ACTION_PROB = 0.1  # minatar.Environment's own defaults
GAME_DATASETS = {"minatar": "dqn", "atari": "dqn-replay"}
# DQN constants of MinAtar's examples/dqn.py (the paper's App.) unless marked
BATCH_SIZE = 32
REPLAY_BUFFER_SIZE = 100_000
TARGET_NETWORK_UPDATE_FREQ = 1000  # counted in policy-network updates
TRAINING_FREQ = 4  # deviation: MinAtar updates every frame; every 4th (Nature DQN) fits 2 CPUs
FIRST_N_FRAMES = 100_000  # epsilon anneals linearly over these frames after the replay start
REPLAY_START_SIZE = 5000  # uniform random actions before, no updates
START_EPSILON = 1.0
END_EPSILON = 0.1
STEP_SIZE = 0.00025  # centered RMSProp: lr, momentum, alpha, eps
GRAD_MOMENTUM = 0.95
SQUARED_GRAD_MOMENTUM = 0.95
MIN_SQUARED_GRAD = 0.01
GAMMA = 0.99
DQN_FRAMES = 500_000  # default `size`: frames of learning history (MinAtar's runs: 5M)
EVAL_EPSILON = 0.05  # the final policy's evaluation epsilon (Nature DQN's evaluation)
EVAL_EPISODES = 100


def minatar_env(game: str):
    """minatar.Environment with the contract's settings; an unknown game is a named error."""
    if game not in MINATAR_CHANNELS:
        raise DatasetError(
            f"unknown MinAtar game {game!r}: use one of {', '.join(MINATAR_CHANNELS)}")
    try:
        import minatar
    except ImportError as e:
        raise ImportError("MinAtar games need the minatar package: pip install minatar") from e
    return minatar.Environment(game, sticky_action_prob=STICKY_ACTION_PROB, difficulty_ramping=True)


def minatar_reset(env, seed: int) -> np.ndarray:
    """Start an episode seeded with `seed` (sticky actions start from no-op, as a new env)."""
    env.seed(seed)
    env.reset()
    env.last_action = 0
    return env.state().astype(np.uint8)


ATARI_FRAME = (84, 84)  # evaluation frames: the DQN-Replay data's size
ATARI_FRAME_SKIP = 4
ATARI_NOOP_MAX = 30


class GameEnv(gym.Env):
    """The evaluation env of a game as a Gymnasium env: frames (H, W, channels) uint8, channels
    zero-padded to `channels` (default: the family's, so that every game of it has one
    observation space), one action set per family (Discrete 6 / 18). MinAtar with the data's
    settings (minatar_env, minatar_reset); Atari as the MGDT paper's / official evaluation:
    84x84 grayscale (area resize), frame skip 4 with the max of the last two frames, 1-30 no-op
    starts, no sticky actions, all 18 actions."""

    def __init__(self, env: str, channels: int | None = None):
        self.family, game = env.split("/", 1)
        minatar = self.family == "minatar"
        self.channels = channels or (max(MINATAR_CHANNELS.values()) if minatar else 1)
        self.observation_space = gym.spaces.Box(0, 255, (*((10, 10) if minatar else ATARI_FRAME),
                                                         self.channels), np.uint8)
        self.action_space = gym.spaces.Discrete(MINATAR_ACTIONS if minatar else 18)
        if minatar:
            self.env = minatar_env(game)
            return
        try:
            import ale_py
        except ImportError as e:
            raise ImportError("Atari games need ale-py: pip install ale-py") from e
        gym.register_envs(ale_py)
        self.env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0,
                            full_action_space=True, obs_type="grayscale")

    def frame(self, x) -> np.ndarray:
        if self.family == "atari":  # (210, 160) -> (84, 84), as cv2.INTER_AREA
            x = torch.nn.functional.interpolate(torch.as_tensor(x, dtype=torch.float32)[None, None],
                                                ATARI_FRAME, mode="area")[0, 0].round().numpy()
        x = np.asarray(x, dtype=np.uint8).reshape(*x.shape[:2], -1)
        return np.pad(x, ((0, 0), (0, 0), (0, self.channels - x.shape[-1])))

    def reset(self, seed: int | None = None, options=None):
        """-> (frame, {}); seed None (an autoreset): one drawn from the env's own stream."""
        super().reset(seed=seed)
        seed = int(self.np_random.integers(2**31)) if seed is None else seed
        if self.family == "minatar":
            return self.frame(minatar_reset(self.env, seed)), {}
        x, _ = self.env.reset(seed=seed)
        for _ in range(np.random.default_rng(seed).integers(1, ATARI_NOOP_MAX + 1)):  # no-ops
            x, *_ = self.env.step(0)
        return self.frame(x), {}

    def step(self, a: int):
        """-> (frame, reward, terminated, truncated False, {}) (the episode cap is the caller's)."""
        if self.family == "minatar":
            r, done = self.env.act(int(a))
            return self.frame(self.env.state()), float(r), bool(done), False, {}
        frames, total, done = [], 0.0, False
        for _ in range(ATARI_FRAME_SKIP):
            x, r, term, trunc, _ = self.env.step(int(a))
            frames, total, done = frames[-1:] + [x], total + float(r), term or trunc
            if done:
                break
        return self.frame(np.maximum(frames[0], frames[-1])), total, done, False, {}


def epsilon_at(t: int) -> float:
    """Behaviour epsilon at frame t: 1 (uniform actions) until the replay start, then linear from
    START_EPSILON to END_EPSILON over FIRST_N_FRAMES frames, then constant."""
    if t < REPLAY_START_SIZE:
        return 1.0
    frac = min((t - REPLAY_START_SIZE) / FIRST_N_FRAMES, 1.0)
    return START_EPSILON + frac * (END_EPSILON - START_EPSILON)


class QNetwork(torch.nn.Module):
    """MinAtar's DQN: conv 16 3x3 stride 1 -> ReLU -> FC 128 -> ReLU -> Q (6)."""

    def __init__(self, in_channels: int, n_actions: int = MINATAR_ACTIONS):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 16, kernel_size=3, stride=1)
        self.fc_hidden = torch.nn.Linear(16 * 8 * 8, 128)
        self.output = torch.nn.Linear(128, n_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # (B, 10, 10, C) -> (B, n_actions)
        x = torch.relu(self.conv(obs.permute(0, 3, 1, 2).float()))  # (B, 16, 8, 8)
        return self.output(torch.relu(self.fc_hidden(x.flatten(1))))


def dqn_loss(q_net, target_net, obs, actions, rewards, next_obs, terminals, gamma=GAMMA):
    """Huber(Q(s, a), r + gamma (1 - terminal) max_a' Q_target(s', a')), batch mean."""
    q = q_net(obs).gather(1, actions[:, None]).squeeze(1)  # (B,)
    with torch.no_grad():
        next_q = target_net(next_obs).max(1).values  # (B,)
    target = rewards + gamma * (1.0 - terminals.float()) * next_q
    return torch.nn.functional.smooth_l1_loss(q, target)


def make_optimizer(params):
    return torch.optim.RMSprop(params, lr=STEP_SIZE, alpha=SQUARED_GRAD_MOMENTUM, centered=True,
                               eps=MIN_SQUARED_GRAD, momentum=GRAD_MOMENTUM)


def _greedy(q_net, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return q_net(torch.from_numpy(obs)).argmax(1).numpy()


def evaluate_minatar(game: str, q_net, seeds, eps: float = EVAL_EPSILON, rng=None) -> np.ndarray:
    """Episode returns, one episode per seed, all episodes stepped together; the epsilon-greedy
    policy of q_net, or uniform random actions when q_net is None."""
    rng = rng or np.random.default_rng(0)
    envs = [minatar_env(game) for _ in seeds]
    obs = np.stack([minatar_reset(e, int(s)) for e, s in zip(envs, seeds)])
    returns, active = np.zeros(len(envs)), np.ones(len(envs), bool)
    for _ in range(MAX_EPISODE_STEPS):
        idx = np.flatnonzero(active)
        acts = rng.integers(MINATAR_ACTIONS, size=len(idx))
        if q_net is not None:
            explore = rng.random(len(idx)) < eps
            acts = np.where(explore, acts, _greedy(q_net, obs[idx]))
        for i, a in zip(idx, acts):
            r, done = envs[i].act(int(a))
            returns[i] += r
            obs[i] = envs[i].state()
            active[i] = not done
        if not active.any():
            break
    return returns


def run_dqn(game: str, frames: int = DQN_FRAMES, seed: int = 0, verbose: bool = True) -> dict:
    """Train DQN on a MinAtar game for `frames` env steps and return every transition it played
    (the dataset "dqn": its whole learning history, exploration included), with reference scores
    of its final policy and of uniform random actions (the same episode seeds)."""
    env = minatar_env(game)
    rng = np.random.default_rng(seed)  # actions, replay samples
    seed_rng = np.random.default_rng((seed, 1))  # episode seeds
    n_ch = MINATAR_CHANNELS[game]
    obs = np.zeros((frames + 1, 10, 10, n_ch), np.uint8)  # row t + 1 = next state of row t
    actions = np.zeros(frames, np.int64)
    rewards = np.zeros(frames, np.float32)
    terminals = np.zeros(frames, bool)
    timeouts = np.zeros(frames, bool)
    cut_next = {}  # next state of a timeout row (row t + 1 starts a new episode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q_net = QNetwork(n_ch)
    target_net = QNetwork(n_ch)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = make_optimizer(q_net.parameters())
    ep_returns, ep_len, ep_ret, updates = [], 0, 0.0, 0
    obs[0] = minatar_reset(env, int(seed_rng.integers(2**31)))
    bar = tqdm(total=frames, desc=f"DQN {game}", unit="step", disable=not verbose, mininterval=2.0)
    for t in range(frames):
        if rng.random() < epsilon_at(t):
            a = int(rng.integers(MINATAR_ACTIONS))
        else:
            a = int(_greedy(q_net, obs[t : t + 1])[0])
        r, term = env.act(a)
        ep_len += 1
        ep_ret += r
        actions[t], rewards[t], terminals[t] = a, r, term
        timeouts[t] = not term and (ep_len == MAX_EPISODE_STEPS or t == frames - 1)
        if term or timeouts[t]:
            if timeouts[t]:
                cut_next[t] = env.state()
            ep_returns.append(ep_ret)
            ep_len, ep_ret = 0, 0.0
            obs[t + 1] = minatar_reset(env, int(seed_rng.integers(2**31)))
            bar.set_postfix(episodes=len(ep_returns), last100=f"{np.mean(ep_returns[-100:]):.2f}")
        else:
            obs[t + 1] = env.state()
        if t > REPLAY_START_SIZE and t % TRAINING_FREQ == 0:  # the replay: the last 100k rows
            lo = max(0, t + 1 - REPLAY_BUFFER_SIZE)
            idx = lo + rng.choice(t + 1 - lo, BATCH_SIZE, replace=False)
            nxt = obs[idx + 1]
            for j in np.flatnonzero(timeouts[idx]):
                nxt[j] = cut_next[int(idx[j])]
            loss = dqn_loss(q_net, target_net, torch.from_numpy(obs[idx]),
                            torch.from_numpy(actions[idx]), torch.from_numpy(rewards[idx]),
                            torch.from_numpy(nxt), torch.from_numpy(terminals[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            if updates % TARGET_NETWORK_UPDATE_FREQ == 0:
                target_net.load_state_dict(q_net.state_dict())
        bar.update(1)
    bar.close()
    eval_seeds = np.random.default_rng((seed, 2)).integers(2**31, size=EVAL_EPISODES)
    expert = evaluate_minatar(game, q_net, eval_seeds, rng=np.random.default_rng((seed, 3)))
    random = evaluate_minatar(game, None, eval_seeds, rng=np.random.default_rng((seed, 4)))
    return dict(
        observations=obs[:frames], actions=actions, rewards=rewards, terminals=terminals,
        timeouts=timeouts, source_step=np.arange(frames, dtype=np.int64),
        ref_random=np.array(random.mean()), ref_expert=np.array(expert.mean()),
    )


# Atari-57 (random, human) scores, as in DQN Zoo's atari_data.py (Pong's human score is 14.6 there,
# the Nature DQN table has 9.3). Held-out games of MGDT (Sec. 4.5) first, then common ones.
ATARI_SCORES = {
    "Alien": (227.8, 7127.7), "MsPacman": (307.3, 6951.6), "Pong": (-20.7, 14.6),
    "SpaceInvaders": (148.0, 1668.7), "StarGunner": (664.0, 10250.0),
    "Asterix": (210.0, 8503.3), "BeamRider": (363.9, 16926.5), "Breakout": (1.7, 30.5),
    "Enduro": (0.0, 860.5), "Freeway": (0.0, 29.6), "Qbert": (163.9, 13455.0),
    "Seaquest": (68.4, 42054.7),
}
ATARI_ACTIONS = 18
REPLAY_FILES = ("observation", "action", "reward", "terminal")


def atari_game(game: str) -> str:
    if game not in ATARI_SCORES:
        raise DatasetError(
            f"unknown Atari game {game!r}: known {', '.join(ATARI_SCORES)}; for another game add "
            f"its (random, human) scores to make_datasets.ATARI_SCORES")
    return game


def minimal_action_set(game: str) -> np.ndarray:
    """ALE's minimal action set of a game, in ALE's full 18-action numbering (the actions
    Dopamine's agents index)."""
    try:
        import ale_py
    except ImportError as e:
        raise ImportError("Atari games need ale-py: pip install ale-py") from e
    rom = ale_py.roms.get_rom_path(re.sub(r"(?<!^)(?=[A-Z])", "_", atari_game(game)).lower())
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.loadROM(rom)
    return np.array([a.value for a in ale.getMinimalActionSet()], np.int64)


def read_dqn_replay(path, game: str, checkpoints=None, size=None) -> dict:
    """Dopamine replay files ($store$_<name>_ckpt.<i>.gz, gzipped .npy) as a game dataset:
    checkpoints in order (all, or the listed ones; the first `size` rows), one 84x84 frame per
    row, minimal-set actions mapped to the full set, an episode cut at each checkpoint's end."""
    d = Path(path)
    if not d.is_dir():
        raise DatasetError(f"DQN-Replay directory {d} does not exist (pass a replay_logs folder)")
    found = sorted(int(p.name.split(".")[-2]) for p in d.glob("$store$_observation_ckpt.*.gz"))
    ckpts = found if checkpoints is None else list(checkpoints)
    if not ckpts:
        raise DatasetError(f"{d}: no $store$_observation_ckpt.<i>.gz files; is it a Dopamine "
                           f"replay_logs directory?")
    names = [f"$store$_{k}_ckpt.{i}.gz" for i in ckpts for k in REPLAY_FILES]
    if missing := [n for n in names if not (d / n).is_file()]:
        raise DatasetError(f"{d}: missing replay file(s) {', '.join(missing)}")
    minimal = minimal_action_set(game)
    parts, rows = [], 0
    for i in ckpts:
        if size is not None and rows >= size:
            break
        z = {}
        for k in REPLAY_FILES:
            try:
                with gzip.open(d / f"$store$_{k}_ckpt.{i}.gz") as f:
                    z[k] = np.load(f, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise DatasetError(f"{d}: $store$_{k}_ckpt.{i}.gz is not a gzipped .npy ({e})")
        if len({len(v) for v in z.values()}) != 1:
            lengths = {k: len(v) for k, v in z.items()}
            raise DatasetError(f"{d}: checkpoint {i} has mismatched lengths {lengths}")
        if z["observation"].shape[1:] != (84, 84):
            raise DatasetError(f"{d}: checkpoint {i} observations have shape "
                               f"{z['observation'].shape}, not (N, 84, 84) grayscale frames")
        if (z["action"] < 0).any() or (z["action"] >= len(minimal)).any():
            raise DatasetError(f"{d}: checkpoint {i} has actions outside {game}'s minimal set "
                               f"of {len(minimal)}; is it a replay of another game?")
        n = len(z["action"]) if size is None else min(len(z["action"]), size - rows)
        term = z["terminal"][:n] != 0
        parts.append(dict(
            observations=z["observation"][:n, :, :, None].astype(np.uint8),
            actions=minimal[z["action"][:n].astype(np.int64)],
            rewards=z["reward"][:n].astype(np.float32), terminals=term,
            timeouts=(np.arange(n) == n - 1) & ~term[-1],
            source_step=i * len(z["action"]) + np.arange(n, dtype=np.int64)))
        rows += n
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    lo, hi = ATARI_SCORES[game]
    return dict(data, ref_random=np.array(lo), ref_expert=np.array(hi))


def validate_game_data(data: dict, env: str, source: str = "dataset") -> dict:
    """The contract's arrays, dtypes and shapes, finite rewards, 0 / 1 flags, a last-row end."""
    family, game = env.split("/", 1)
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "source_step",
            "ref_random", "ref_expert")
    if missing := [k for k in keys if k not in data]:
        raise DatasetError(f"{source}: missing key(s) {missing}; a game dataset has {list(keys)}")
    obs, n = data["observations"], len(data["rewards"])
    frame = (10, 10, MINATAR_CHANNELS[game]) if family == "minatar" else (84, 84, 1)
    if n == 0 or obs.dtype != np.uint8 or obs.shape != (n, *frame):
        raise DatasetError(f"{source}: observations are {obs.dtype} {obs.shape}, not uint8 "
                           f"({n}, {', '.join(map(str, frame))}) for {env}")
    for k, dt in (("actions", np.int64), ("rewards", np.float32), ("terminals", np.bool_),
                  ("timeouts", np.bool_), ("source_step", np.int64)):
        if data[k].dtype != dt or data[k].shape != (n,):
            raise DatasetError(f"{source}: {k} are {data[k].dtype} {data[k].shape}, not "
                               f"{np.dtype(dt)} ({n},)")
    n_act = MINATAR_ACTIONS if family == "minatar" else ATARI_ACTIONS
    if data["actions"].min() < 0 or data["actions"].max() >= n_act:
        raise DatasetError(f"{source}: actions outside 0..{n_act - 1} (the full action set)")
    if not np.isfinite(data["rewards"]).all():
        raise DatasetError(f"{source}: rewards are NaN or inf")
    if not (data["terminals"][-1] or data["timeouts"][-1]):
        raise DatasetError(f"{source}: the last row ends no episode (set its timeout)")
    if (np.diff(data["source_step"]) <= 0).any():
        raise DatasetError(f"{source}: source_step is not increasing (rows out of order)")
    lo, hi = (np.asarray(data[k]) for k in ("ref_random", "ref_expert"))
    if lo.shape or hi.shape or not np.isfinite([lo, hi]).all():
        raise DatasetError(f"{source}: ref_random / ref_expert are {lo} / {hi}, not finite scalars")
    if hi <= lo:  # tiny test runs can get here; normalized scores would be meaningless
        print(f"[seqrl] warning: {source}: ref_expert {hi} <= ref_random {lo}; scores normalized "
              f"with them divide by {hi - lo}")
    return {k: data[k] for k in keys} | dict(ref_random=lo.astype(np.float64),
                                             ref_expert=hi.astype(np.float64))


def game_summary(env: str, data: dict) -> str:
    rows = {k: v for k, v in data.items() if np.ndim(v)}  # split_episodes takes row arrays only
    rets = np.array([ep["rewards"].sum() for ep in split_episodes(rows)])
    k = max(1, len(rets) // 10)
    return (f"[seqrl] {env}: {len(rets)} episodes, {len(data['rewards'])} rows, return mean "
            f"{rets.mean():.2f} (first 10% of episodes {rets[:k].mean():.2f}, last 10% "
            f"{rets[-k:].mean():.2f}), ref_random {float(data['ref_random']):.2f}, ref_expert "
            f"{float(data['ref_expert']):.2f}")


def prepare_game(env, dataset, path=None, size=None, seed=0, budget=None, verbose=True):
    """prepare() for "minatar/<game>" (generated, cached) and "atari/<Game>" (read from `path`)."""
    family, game = env.split("/", 1)
    if family not in GAME_DATASETS or dataset != GAME_DATASETS[family]:
        raise DatasetError(f"{env}: the game datasets are " + ", ".join(
            f"{f}/<game> {d!r}" for f, d in GAME_DATASETS.items()) + f", not {dataset!r}")
    if budget is not None:
        raise DatasetError(f"{env}: budget is ARS's (MuJoCo); set the game data's size instead")
    if family == "atari":
        atari_game(game)
        if path is None:
            raise DatasetError(f"{env}: pass the DQN-Replay directory (path= / --dataset-path)")
        data = validate_game_data(read_dqn_replay(path, game, size=size), env, str(path))
    else:
        minatar_env(game)
        if path is not None:
            return validate_game_data(read_npz(path), env, str(path)), env
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny nets; one thread also makes the data thread-independent
        try:
            data = run_dqn(game, size or DQN_FRAMES, seed, verbose)
        finally:
            torch.set_num_threads(threads)
        data = validate_game_data(data, env, f"{env} {dataset}")
        save_npz(dataset_path(env, dataset, size, seed, budget), data)
    if verbose:
        print(game_summary(env, data), flush=True)
    return data, env


def prepare(env, dataset, path=None, size=None, seed=0, budget=None, verbose=True):
    """What common.load_dataset asks for when the cache misses: (validated arrays, env)."""
    if env.startswith(("minatar/", "atari/")):
        return prepare_game(env, dataset, path, size, seed, budget, verbose)
    if path is not None:
        if not Path(path).is_file():
            raise DatasetError(f"dataset file {path} does not exist")
        hdf5 = Path(path).suffix in (".hdf5", ".h5")
        raw = read_hdf5(path, env) if hdf5 else read_npz(path)
        return validate_dataset(raw, env, str(path)), env
    if "/" in dataset:
        raw, env = read_minari(dataset)
        return validate_dataset(raw, env, dataset), env
    if dataset not in DATASETS:
        raise DatasetError(
            f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}, a "
            f"Minari id (mujoco/hopper/medium-v0) or a file (--dataset-path)"
        )
    if env not in ENVS:
        raise DatasetError(f"generation supports {', '.join(ENVS)}; for {env} pass --dataset-path")
    if verbose:
        print(f"[seqrl] {env}/{dataset} not cached: generating it offline with ARS (seed {seed})")
    data = generate_dataset(env, dataset, size=size, seed=seed, budget=budget, verbose=verbose)
    data = validate_dataset(data, env, dataset)
    save_npz(dataset_path(env, dataset, size, seed, budget), data)
    if verbose:
        print(dataset_summary(env, dataset, data))
    return data, env


def dataset_summary(env: str, name: str, data: dict) -> str:
    rets = np.array([ep["rewards"].sum() for ep in split_episodes(data)])
    norm = normalized_score(env, rets.mean())
    return (
        f"[seqrl] {env}/{name}: {len(rets)} episodes, {len(data['rewards'])} transitions, "
        f"return mean {rets.mean():.1f} min {rets.min():.1f} max {rets.max():.1f}, "
        f"D4RL-normalized mean {float(norm):.1f}"
    )


def _generate_game(job: tuple) -> str:
    """One game's dataset in a worker process (one torch thread); returns its summary line."""
    env, dataset, size, seed, verbose = job
    t0 = time.time()
    data = load_dataset(env, dataset, size=size, seed=seed, verbose=verbose)
    return f"{game_summary(env, data)}, {(time.time() - t0) / 60:.1f} min"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--env", default="hopper", help=f"one of {', '.join(ENVS)}, minatar/<game> "
                        f"(minatar/all: the five), atari/<Game> (with --dataset-path)")
    parser.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default "
                        f"medium); dqn for minatar/, dqn-replay for atari/")
    parser.add_argument("--dataset-path", default=None, help="atari/: a DQN-Replay directory")
    parser.add_argument("--size", type=int, default=None, help="transitions (default 1M, as D4RL; "
                        f"minatar: {DQN_FRAMES} DQN frames; atari: all checkpoints' rows)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--budget", type=int, default=None, help="ARS env steps (default per env)")
    parser.add_argument("--workers", type=int, default=1, help="minatar/all: games in parallel")
    args = parser.parse_args(argv)
    family = args.env.split("/")[0] if "/" in args.env else None
    args.dataset = args.dataset or GAME_DATASETS.get(family, "medium")
    t0 = time.time()
    if family in GAME_DATASETS:
        games = list(MINATAR_CHANNELS) if args.env == "minatar/all" else [args.env.split("/")[1]]
        if family == "atari":
            data, _ = prepare_game(args.env, args.dataset, args.dataset_path, args.size, args.seed)
            save_npz(file := dataset_path(args.env, args.dataset, args.size, args.seed), data)
            print(f"[seqrl] {file}")
            return
        jobs = [(f"minatar/{g}", args.dataset, args.size, args.seed, True) for g in games]
        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            for line in pool.imap(_generate_game, jobs):
                print(line, flush=True)
        print(f"[seqrl] {data_dir()}; done in {time.time() - t0:.1f} s")
        return
    if args.env not in ENVS:
        parser.error(f"--env {args.env!r}: generation supports {', '.join(ENVS)}")
    if args.dataset not in DATASETS:
        parser.error(f"--dataset {args.dataset!r}: use one of {', '.join(DATASETS)}")
    t0 = time.time()
    file = dataset_path(args.env, args.dataset, args.size, args.seed, args.budget)
    cached = file.exists()
    data = load_dataset(args.env, args.dataset, size=args.size, seed=args.seed, budget=args.budget)
    if cached:  # a fresh generation printed its summary already
        print(dataset_summary(args.env, args.dataset, data))
    print(f"[seqrl] {file}")
    print(f"[seqrl] done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
