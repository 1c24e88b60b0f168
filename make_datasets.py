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
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import zipfile
from pathlib import Path

import numpy as np

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


def prepare(env, dataset, path=None, size=None, seed=0, budget=None, verbose=True):
    """What common.load_dataset asks for when the cache misses: (validated arrays, env)."""
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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--env", default="hopper", help=f"one of {', '.join(ENVS)}")
    parser.add_argument("--dataset", default="medium", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--size", type=int, default=None, help="transitions (default 1M, as D4RL)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--budget", type=int, default=None, help="ARS env steps (default per env)")
    args = parser.parse_args(argv)
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
