"""common.py: what every seqrl algorithm file shares, and nothing algorithmic.

    ENVS, make_env, normalized_score     environments and D4RL reference scores
    load_dataset, validate_dataset       D4RL-style data: a file, a Minari id, the cache, or generated
    split_episodes, returns_to_go        episode helpers
    evaluate                             vectorized, seeded evaluation of a batched policy
    parse_args, set_seed                 `@dataclass Args` -> flags with --help; seeding
    Run, load_checkpoint                 run folder, logs, bar, resume, Ctrl-C, portable checkpoints
Dataset generation (ARS) and the Minari / D4RL v0 readers live in make_datasets.py.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import random
import signal
import sys
import tempfile
import textwrap
import time
import types
import typing
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
# D4RL reference returns (random, expert) of the v2 environments (d4rl/infos.py); a Minari
# dataset adds its own (ref_min_score, ref_max_score) under its id when loaded.
REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
              "walker2d": (1.629008, 4592.3)}
DATASETS = ("random", "medium", "medium-replay", "expert", "medium-expert")
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
FLAGS = ("rewards", "terminals", "timeouts")  # the 1-D keys


class DatasetError(ValueError):
    """A dataset that cannot be used as it is."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or lacks what is needed."""


def env_id(env: str) -> str:
    """hopper -> Hopper-v5; registered Gymnasium ids pass through; anything else is an error."""
    if env in ENVS or env in gym.registry:
        return ENVS.get(env, env)
    raise ValueError(f"unknown env {env!r}: use one of {', '.join(ENVS)} or a registered "
                     f"Gymnasium id such as InvertedPendulum-v5")


def make_env(env: str) -> gym.Env:
    return gym.make(env_id(env), disable_env_checker=True)  # the checker costs ~20% of a step


def env_dims(env: str) -> tuple[int, int]:
    e = make_env(env)
    return int(np.prod(e.observation_space.shape)), int(np.prod(e.action_space.shape))


def normalized_score(env: str, returns, dataset: str | None = None) -> np.ndarray:
    """100 (R - random) / (expert - random); a Minari dataset's own references when it has them."""
    lo, hi = REF_SCORES.get(dataset, REF_SCORES.get(env, (np.nan, np.nan)))
    return 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)


def returns_to_go(rewards, gamma: float = 1.0) -> np.ndarray:
    """R_t = sum_{k >= t} gamma^(k - t) r_k over one episode."""
    out, running = np.zeros(len(rewards)), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = out[t] = float(rewards[t]) + gamma * running
    return out


def split_episodes(data: dict) -> list[dict]:
    """A flat D4RL dict -> one dict of views per episode, cut after each terminal or timeout."""
    n = len(data["rewards"])
    ends = [0, *(np.flatnonzero(data["terminals"] | data["timeouts"]) + 1)]
    ends += [n] if ends[-1] < n else []
    return [{k: v[a:b] for k, v in data.items() if len(v) == n} for a, b in zip(ends, ends[1:])]


# ---------------------------------------------------------------------------------- datasets
def validate_dataset(data: dict, env: str, source: str = "dataset") -> dict:
    """Keys, shapes, finite values, 0 / 1 flags and the env's sizes, checked; float32 arrays and
    bool flags out; `next_observations` derived from the next row when absent."""
    if missing := [k for k in KEYS[:5] if k not in data]:
        raise DatasetError(f"{source}: missing key(s) {missing}; a D4RL dataset has {list(KEYS)}")
    n, out = len(data["rewards"]), {}
    for k in (k for k in KEYS if k in data):
        try:
            v = np.asarray(data[k], dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{source}: {k!r} is not numeric ({np.asarray(data[k]).dtype})") from e
        if n == 0 or len(v) != n or v.ndim != (1 if k in FLAGS else 2):
            raise DatasetError(f"{source}: {k!r} has shape {v.shape}; expected ({n},"
                               f"{'' if k in FLAGS else ' dim'}) with n > 0")
        if not np.isfinite(v).all():
            raise DatasetError(f"{source}: {k!r} has NaN or inf at row "
                               f"{int((~np.isfinite(v)).reshape(n, -1).any(1).argmax())}; clean it")
        if k in FLAGS[1:] and not np.isin(v, (0.0, 1.0)).all():
            raise DatasetError(f"{source}: {k!r} holds values other than 0 / 1 (flags are booleans)")
        out[k] = v.astype(bool) if k in FLAGS[1:] else v
    if not (out["terminals"][-1] or out["timeouts"][-1]):
        print(f"[seqrl] {source}: the last episode has no end flag; marking it a timeout")
        out["timeouts"][-1] = True
    if "next_observations" not in out:  # the next row; an episode's last row repeats itself
        ends = out["terminals"] | out["timeouts"]
        out["next_observations"] = np.where(ends[:, None], out["observations"],
                                            np.roll(out["observations"], -1, axis=0))
    obs_dim, act_dim = env_dims(env)
    for k, want in (("observations", obs_dim), ("actions", act_dim), ("next_observations", obs_dim)):
        if out[k].shape[1] != want:
            raise DatasetError(f"{source}: {k} have {out[k].shape[1]} dims but {env_id(env)} has "
                               f"{want}; is it a dataset of another env? (set --env)")
    return out


def data_dir() -> Path:
    return Path(os.environ.get("SEQRL_DATA_DIR", Path.home() / ".cache" / "seqrl"))


def dataset_path(env, dataset, size=None, seed=0, budget=None) -> Path:
    ars = "" if budget is None else f"-ars{budget}"
    return data_dir() / f"{env}-{dataset}-{size or 'default'}-seed{seed}{ars}.npz"


def atomic_write(path, write_fn) -> None:
    """write_fn(tmp) into a temp file beside `path`, then rename: never half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path, data: dict) -> None:
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **data))


def read_npz(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({e}); pass a valid file") from e


class Dataset(dict):
    """The D4RL arrays, plus `env` (to evaluate on) and `name` (for the run folder)."""


def load_dataset(env: str, dataset: str = "medium", *, path=None, size=None, seed=0,
                 budget=None, verbose=True) -> Dataset:
    """D4RL-style data from `path` (.npz, D4RL .hdf5), a Minari id (`dataset` with a "/"; the env
    is the dataset's), the cache `$SEQRL_DATA_DIR`, or else generated by make_datasets.py."""
    env_id(env)
    name, cached = dataset.replace("/", "-"), dataset_path(env, dataset, size, seed, budget)
    if path is None and "/" not in dataset and dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}, a "
                           f"Minari id (mujoco/hopper/medium-v0) or a file (--dataset-path)")
    if path is not None and Path(path).suffix not in (".hdf5", ".h5") or not path and cached.exists():
        raw, name = read_npz(path or cached), Path(path).stem if path else name
    else:
        try:
            import make_datasets  # generation, and the .hdf5 / Minari readers
        except ImportError:
            raise DatasetError(f"{path or dataset}: reading .hdf5 / Minari data or generating "
                               f"needs make_datasets.py (seqrl) beside common.py") from None
        raw, env, name = make_datasets.prepare(env, dataset, path, size, seed, budget, verbose)
    out = Dataset(validate_dataset(raw, env, source=str(path or dataset)))
    out.env, out.name = env, name
    return out


# ---------------------------------------------------------------------------------- evaluation
def evaluate(policy, env: str, n_episodes=10, seed=0, max_steps=None, progress=True,
             dataset=None) -> dict:
    """All episodes at once in a Gymnasium vector env (episode i seeded seed + i).

    policy(obs (n, obs_dim) float32) -> actions (n, act_dim); optional hooks policy.reset(n) and
    policy.observe(rewards, dones) after each step. A finished episode's later actions are
    ignored (next-step autoreset is masked). Returns arrays returns, lengths, normalized."""
    envs = gym.vector.SyncVectorEnv([lambda: make_env(env)] * n_episodes,
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    obs, _ = envs.reset(seed=[seed + i for i in range(n_episodes)])
    getattr(policy, "reset", lambda n: None)(n_episodes)
    returns, lengths = np.zeros(n_episodes), np.zeros(n_episodes, dtype=np.int64)
    active = np.ones(n_episodes, dtype=bool)
    limit = max_steps or envs.envs[0].spec.max_episode_steps or 10**6
    with tqdm(total=n_episodes * limit, desc="eval", unit="step", disable=not progress,
              leave=False) as bar:
        for _ in range(limit):
            act = policy(obs.astype(np.float32))
            act = act.detach().cpu().numpy() if isinstance(act, torch.Tensor) else np.asarray(act)
            obs, rew, term, trunc, _ = envs.step(act.reshape(envs.action_space.shape))
            rew, done = np.where(active, rew, 0.0), term | trunc | ~active
            returns, lengths = returns + rew, lengths + active
            getattr(policy, "observe", lambda r, d: None)(rew.astype(np.float32), done)
            bar.update(int(active.sum()))
            active &= ~done
            if not active.any():
                break
    envs.close()
    return dict(returns=returns, lengths=lengths, normalized=normalized_score(env, returns, dataset))


# ---------------------------------------------------------------------------------- arguments
def parse_args(cls, argv=None):
    """Flags from a dataclass's fields, --help from the string under each field (CleanRL
    style); --wandb-project / --wandb-entity set wandb's own WANDB_PROJECT / WANDB_ENTITY."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):  # no source (an interactive session): no help texts
        body = []
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    desc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(description=desc,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X] -> X
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        kw = dict(default=f.default, help=docs.get(f.name, " ").replace("%", "%%"), dest=f.name)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) in (tuple, list):
            kw.update(nargs="+", type=typing.get_args(typ)[0])
        else:
            kw["type"] = typ
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    parser.add_argument("--wandb-project", help="wandb project (with --track)")
    parser.add_argument("--wandb-entity", help="wandb entity (with --track)")
    values = vars(parser.parse_args(argv))
    for key in ("wandb_project", "wandb_entity"):
        if value := values.pop(key):
            os.environ[key.upper()] = value
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(cuda: bool = True) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------- runs
def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states as tensors and numbers (weights_only-safe)."""
    _, keys, *rest = np.random.get_state()
    return dict(python=torch.tensor(random.getstate()[1]), numpy=torch.tensor(keys.astype(np.int64)),
                numpy_rest=tuple(rest), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_rest"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    elif torch.cuda.is_available() or state["cuda"]:
        print("[seqrl] other devices than the run's: CUDA random streams restart, not continue")


def load_checkpoint(path, algo: str | None = None) -> dict:
    """A checkpoint dict, read with weights_only=True onto the CPU; CheckpointError if unusable."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass runs/<run>/checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or not a seqrl checkpoint ({e})"[:300]) from e
    if not isinstance(ckpt, dict) or "algo" not in ckpt:
        raise CheckpointError(f"{path} is not a seqrl checkpoint (no 'algo' key)")
    if algo is not None and ckpt["algo"] != algo:
        raise CheckpointError(f"{path} is a {ckpt['algo']} checkpoint: load it with {ckpt['algo']}.py")
    return ckpt


class Run:
    """A training run: runs/{env}__{exp_name}__{seed}__{time}/ with args.json, metrics.jsonl,
    TensorBoard (--tensorboard), wandb (--track), the progress bar, --resume and checkpoints.

        run = common.Run(args, "dt", model=model, optimizer=optimizer, sampler=generator)
        for step in run.loop(args.total_steps):    # after run.step when resumed
            ...the update...; run.log(**{"losses/loss": loss})
            if run.every(args.eval_every): run.log(**eval_metrics); run.save()
        run.finish()
    Keyword objects are saved with state_dict() (a torch.Generator with get_state()) and restored
    by --resume; `extra` (tensors, numbers, strings, or a function giving them) is saved as is.
    Ctrl-C: the update in flight finishes, then a checkpoint, then exit 130 (twice: abort)."""

    def __init__(self, args, algo: str, extra=None, **objects):
        self.args, self.algo, self.extra, self.objects = args, algo, extra, objects
        self.step, self.total, self.saved, self.stop, self.bar = 0, 0, -1, False, None
        if getattr(args, "resume", None):
            self.dir = Path(args.resume).parent
            self.restore(load_checkpoint(args.resume, algo))
        else:
            tag = (Path(args.dataset_path).stem if getattr(args, "dataset_path", None) else
                   getattr(args, "dataset", "") if "/" in getattr(args, "dataset", "") else args.env)
            name = f"{tag.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
            for i in range(1000):  # unique, even for runs started within the same second
                self.dir = Path("runs") / (name + (f"-{i}" if i else ""))
                if not self.dir.exists():
                    self.dir.mkdir(parents=True, exist_ok=i == 999)
                    break
        cfg = dataclasses.asdict(args)
        atomic_write(self.dir / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=1)))
        self.tb = self.wandb = None
        if getattr(args, "tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter  # pip install tensorboard
            self.tb = SummaryWriter(str(self.dir))
            self.tb.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                             "\n".join(f"|{k}|{v}|" for k, v in cfg.items()))
        if getattr(args, "track", False):
            import wandb  # pip install wandb
            self.wandb = wandb.init(name=self.dir.name, id=self.dir.name, config=cfg,
                                    dir=str(self.dir), resume="allow")
        self.sps = (self.step, time.time())

    def restore(self, ckpt: dict) -> None:
        for name, obj in self.objects.items():
            if name not in ckpt:
                raise CheckpointError(f"{self.args.resume} lacks {name!r}: not a {self.algo} run?")
            if not isinstance(obj, torch.Generator):
                obj.load_state_dict(ckpt[name])
            elif obj.get_state().numel() == ckpt[name].numel():
                obj.set_state(ckpt[name])
            else:  # a CUDA generator's state does not fit a CPU one, and vice versa
                obj.manual_seed(self.args.seed + ckpt["step"])
                print(f"[seqrl] {name}: run made on another device: reseeded, not continued exactly")
        set_rng_state(ckpt["rng"])
        self.step = ckpt["step"]

    def save(self) -> Path:
        extra = self.extra() if callable(self.extra) else self.extra or {}
        state = dict(algo=self.algo, args=dataclasses.asdict(self.args), step=self.step,
                     rng=rng_state(), **extra, **{k: o.get_state() if isinstance(o, torch.Generator)
                                                  else o.state_dict() for k, o in self.objects.items()})
        atomic_write(self.dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
        self.saved = self.step
        return self.dir / "checkpoint.pt"

    def loop(self, total: int):
        """Yields step = 1 .. total (continuing after run.step), with the bar and Ctrl-C."""
        self.total, self.bar = total, tqdm(total=total, initial=self.step, desc=self.algo, unit="upd")
        try:
            old = signal.signal(signal.SIGINT, self.interrupt)
        except ValueError:  # not the main thread: Ctrl-C stays Python's
            old = None
        try:
            while self.step < total:
                if self.stop:
                    print(f"\n[seqrl] interrupted: saved {self.save()}; continue with --resume")
                    raise SystemExit(130)
                self.step += 1
                yield self.step
                self.bar.update(1)
        finally:
            signal.signal(signal.SIGINT, old) if old is not None else None
            self.bar.close()

    def interrupt(self, signum, frame):
        self.stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def every(self, n: int) -> bool:
        return n > 0 and (self.step % n == 0 or self.step == self.total)

    def log(self, **metrics) -> None:
        """One metrics.jsonl line (+ TensorBoard / wandb); losses/* also get charts/SPS."""
        now = time.time()
        rec = {k: v if isinstance(v, str) else torch.as_tensor(v).item() for k, v in metrics.items()}
        if any(k.startswith("losses/") for k in rec) and self.step > self.sps[0]:
            rec["charts/SPS"] = (self.step - self.sps[0]) / max(now - self.sps[1], 1e-9)
        if "charts/SPS" in rec or any(k.startswith("eval/") for k in rec):
            self.sps = (self.step, now)  # evaluation time stays out of SPS
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "time": now, **rec}) + "\n")
        for k, v in rec.items():
            _ = self.tb.add_scalar(k, v, self.step) if self.tb and isinstance(v, float) else None
        _ = self.wandb.log(rec, step=self.step) if self.wandb else None
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in rec.items()
                                  if k.startswith("losses/") or k == "eval/normalized_score"})

    def finish(self) -> Path:
        """The last checkpoint (unless just saved); loggers closed; returns the run folder."""
        if self.saved != self.step:
            self.save()
        _ = self.tb.close() if self.tb else None
        _ = self.wandb.finish() if self.wandb else None
        print(f"[seqrl] run folder {self.dir}")
        return self.dir
