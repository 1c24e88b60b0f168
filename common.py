"""common.py, what every seqrl file shares: envs, D4RL scores, datasets, episodes, vectorized
evaluation, flags from `@dataclass Args`, and `Run` (run folder, logs, resume, checkpoints)."""
import argparse
import ast
import dataclasses
import inspect
import json
import os
import random
import signal
import textwrap
import time
import typing
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
# D4RL (random, expert) returns of the v2 envs (d4rl/infos.py); Minari ids add their own on load
REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
              "walker2d": (1.629008, 4592.3)}
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")

class DatasetError(ValueError):
    """A dataset that cannot be used as it is."""

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or lacks what is needed."""

def env_id(env: str) -> str:
    """hopper -> Hopper-v5; registered Gymnasium ids pass through; anything else is an error."""
    if env in ENVS or env in gym.registry:
        return ENVS.get(env, env)
    raise ValueError(f"unknown env {env!r}: use {', '.join(ENVS)} or a Gymnasium id (Hopper-v5)")

def make_env(env: str, **kw):
    if env.startswith(("minatar/", "atari/")):  # games: the data's settings, one episode
        return __import__("make_datasets").GameEnv(env, **kw)
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
    ends = np.flatnonzero(np.logical_or(data["terminals"], data["timeouts"])) + 1
    cuts = np.unique([0, *ends, n := len(data["rewards"])])
    return [{k: v[a:b] for k, v in data.items() if len(v) == n} for a, b in zip(cuts, cuts[1:])]

def data_dir() -> Path:
    return Path(os.environ.get("SEQRL_DATA_DIR", Path.home() / ".cache" / "seqrl"))

def dataset_path(env, dataset, size=None, seed=0, budget=None) -> Path:
    ars = "" if budget is None else f"-ars{budget}"
    return data_dir() / f"{env}-{dataset}-{size or 'default'}-seed{seed}{ars}.npz"

def atomic_write(path, write_fn) -> None:
    """write_fn(tmp) into a temp file beside `path`, then rename: never half a file."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def save_npz(path, data: dict) -> None:
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **data))

class Dataset(dict):
    """The D4RL arrays, and `env`: the env to evaluate on (a Minari dataset's own)."""

def load_dataset(env: str, dataset: str = "medium", *, path=None, size=None, seed=0,
                 budget=None, verbose=True) -> Dataset:
    """D4RL arrays from the cache, else make_datasets.py reads `path` or Minari, or generates."""
    env.startswith(("minatar/", "atari/")) or env_id(env)  # games: make_datasets.py checks them
    cached = dataset_path(env, dataset, size, seed, budget)
    if path is None and cached.exists():  # written by make_datasets.py, validated then
        raw = dict(np.load(cached))  # every array read; the file closes with the NpzFile
    else:
        try:
            import make_datasets
        except ModuleNotFoundError:
            raise DatasetError(f"{path or dataset} is not in the cache {data_dir()}; generating or "
                               f"reading data needs make_datasets.py beside common.py") from None
        raw, env = make_datasets.prepare(env, dataset, path, size, seed, budget, verbose)
    (out := Dataset(raw)).env = env
    return out

def evaluate(policy, env: str, n_episodes=10, seed=0, max_steps=None, progress=True, dataset=None):
    """Episode i (seeded seed + i) of n at once, for each env of env ("a+b": games): policy(obs
    (N, ...)) -> actions, hooks policy.reset(N), policy.observe(rewards, dones), N = n x envs."""
    names = [e for e in env.split("+") for _ in range(n_episodes)]
    envs = gym.vector.SyncVectorEnv([lambda e=e: make_env(e) for e in names],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    obs, _ = envs.reset(seed=[seed + i % n_episodes for i in range(len(names))])
    getattr(policy, "reset", lambda n: None)(n := len(names))
    returns, lengths, active = np.zeros(n), np.zeros(n, int), np.ones(n, bool)
    limit = max_steps or envs.envs[0].spec.max_episode_steps or 10**6
    with tqdm(total=n * limit, desc="eval", unit="step", disable=not progress) as bar:
        for _ in range(limit):
            act = np.asarray(torch.as_tensor(policy(obs.astype(np.float32))).detach().cpu())
            obs, rew, term, trunc, _ = envs.step(act.reshape(envs.action_space.shape))
            rew, done = np.where(active, rew, 0.0), term | trunc | ~active
            returns, lengths = returns + rew, lengths + active
            getattr(policy, "observe", lambda r, d: None)(rew.astype(np.float32), done)
            bar.update(int(active.sum()))
            active &= ~done
            if not active.any():
                break
    envs.close()
    return dict(returns=returns, lengths=lengths,
                normalized=normalized_score(env, returns, dataset))

def parse_args(cls, argv=None):
    """Flags from a dataclass's fields, --help from the string under each field (CleanRL
    style); --wandb-project / --wandb-entity set wandb's own WANDB_PROJECT / WANDB_ENTITY."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    parser = argparse.ArgumentParser(description=(inspect.getmodule(cls).__doc__ or "").split(
        "\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if type(None) in typing.get_args(typ):  # Optional[X] -> X
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        kw = dict(default=f.default, help=docs.get(f.name, " ").replace("%", "%%"), dest=f.name)
        seq = typing.get_origin(typ) in (tuple, list)  # tuple[int, ...]: --flag 1 2 3
        kw.update(dict(action=argparse.BooleanOptionalAction) if typ is bool else
                  dict(nargs="+" if seq else None, type=typing.get_args(typ)[0] if seq else typ))
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    parser.add_argument("--wandb-project", help="wandb project (with --track)")
    parser.add_argument("--wandb-entity", help="wandb entity (with --track)")
    values = vars(parser.parse_args(argv))
    os.environ.update({k.upper(): v for k in ("wandb_project", "wandb_entity")  # wandb's own
                       if (v := values.pop(k))})
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

def set_seed(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

def get_device(cuda: bool = True) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")

def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states as tensors and numbers (weights_only-safe)."""
    _, keys, *rest = np.random.get_state()
    return dict(python=torch.tensor(random.getstate()[1]), numpy=torch.from_numpy(keys.astype(int)),
                np_rest=tuple(rest), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all())

def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["np_rest"]))
    torch.set_rng_state(state["torch"].cpu())
    if len(state["cuda"]) == torch.cuda.device_count():  # 0 == 0 without CUDA
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    else:
        print("[seqrl] not the run's devices: the CUDA random streams restart, not continue")

def load_checkpoint(path, algo: str | None = None) -> dict:
    """A checkpoint dict, read with weights_only=True onto the CPU; CheckpointError if unusable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not torch, or pickled objects
        raise CheckpointError(f"cannot read checkpoint {path}: {e}"[:300]) from e
    if not isinstance(ckpt, dict) or "algo" not in ckpt:
        raise CheckpointError(f"{path} is not a seqrl checkpoint (no 'algo' key)")
    if algo is not None and ckpt["algo"] != algo:
        raise CheckpointError(f"{path} is a {ckpt['algo']} checkpoint: use {ckpt['algo']}.py")
    return ckpt

class Run:
    """runs/{env}__{exp_name}__{seed}__{time}/ (args.json, metrics.jsonl, TensorBoard, wandb), bar,
    --resume, checkpoints: Run(args, "dt", model=m, sampler=generator, ...); `for step in run.loop(
    total):` update, run.log(...), run.save(); run.finish(). Objects: saved by state_dict() (a
    Generator: get_state()), restored on --resume; `extra` (or a function giving it): as is. Ctrl-C:
    saved, exit 130. torchrun: every rank calls it all; rank 0 writes; ranks stop at one step."""

    def __init__(self, args, algo: str, extra=None, **objects):
        self.args, self.algo, self.extra, self.objects = args, algo, extra, objects
        self.step, self.total, self.saved, self.stop, self.bar = 0, 0, -1, False, tqdm(disable=True)
        self.rank = int(os.environ.get("RANK", 0))  # torchrun's: rank 0 alone writes
        if getattr(args, "resume", None):  # every object's state, the RNGs and the step
            self.dir, ckpt = Path(args.resume).parent, load_checkpoint(args.resume, algo)
            ckpt.update((ranks := ckpt.pop("ranks", [{}]))[self.rank % len(ranks)])  # torchrun's
            for name, obj in objects.items():
                if not isinstance(obj, torch.Generator):
                    obj.load_state_dict(ckpt[name])
                elif obj.get_state().numel() == ckpt[name].numel():
                    obj.set_state(ckpt[name])
                else:  # a CUDA generator's state does not fit a CPU one, and vice versa
                    obj.manual_seed(args.seed + ckpt["step"])
                    print(f"[seqrl] {name}: the run used another device; reseeded, not continued")
            set_rng_state(ckpt["rng"])
            self.step = ckpt["step"]
        else:
            path, dataset = getattr(args, "dataset_path", None), getattr(args, "dataset", "")
            tag = Path(path).stem if path else args.env if "/" not in dataset else dataset
            name = f"{tag.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.dir = next(d for i in range(10**4) if not (d := Path("runs") / (
                name + (f"-{i}" if i else ""))).exists())  # unique within one second too
            self.rank or self.dir.mkdir(parents=True)
        if dist.is_initialized():  # every rank learns rank 0's folder
            dist.broadcast_object_list(names := [self.dir], src=0)
            self.dir = names[0]
        cfg, self.tb, self.wandb = dataclasses.asdict(args), None, None
        self.rank or (self.dir / "args.json").write_text(json.dumps(cfg, indent=1))
        if getattr(args, "tensorboard", False) and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # needs: pip install tensorboard
            self.tb = SummaryWriter(str(self.dir))
            self.tb.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in cfg.items()))
        if getattr(args, "track", False) and self.rank == 0:
            import wandb  # pip install wandb
            self.wandb = wandb.init(name=self.dir.name, id=self.dir.name, config=cfg,
                                    dir=str(self.dir), resume="allow")
        self.sps = (self.step, time.time())

    def save(self) -> Path:
        extra = self.extra() if callable(self.extra) else self.extra or {}
        rng = dict(rng=rng_state(), **{k: o.get_state() for k, o in self.objects.items()
                                        if isinstance(o, torch.Generator)})  # random streams
        state = dict(algo=self.algo, args=dataclasses.asdict(self.args), step=self.step, **extra,
                     **rng, **{k: o.state_dict() for k, o in self.objects.items() if k not in rng})
        if dist.is_initialized():  # every rank's random streams (so every rank calls save)
            dist.all_gather_object(ranks := [None] * dist.get_world_size(), rng)
            state["ranks"] = ranks
        self.rank or atomic_write(self.dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
        self.saved = self.step
        return self.dir / "checkpoint.pt"

    def loop(self, total: int):
        """Yields step = 1 .. total (continuing after run.step), with the bar and Ctrl-C."""
        self.total, self.bar = total, tqdm(total=total, initial=self.step, desc=self.algo,
                                           unit="upd", disable=self.rank > 0)
        old = signal.signal(signal.SIGINT, self.interrupt)  # main thread only, as Python's own
        try:
            while self.step < total:
                if dist.is_initialized():  # any rank's Ctrl-C stops every rank at this step
                    dist.all_gather_object(stops := [None] * dist.get_world_size(), self.stop)
                    self.stop = any(stops)
                if self.stop:
                    print(f"\n[seqrl] interrupted: saved {self.save()}; continue with --resume")
                    raise SystemExit(130)
                self.step += 1
                yield self.step
                self.bar.update(1)
        finally:
            signal.signal(signal.SIGINT, old)
            self.bar.close()

    def interrupt(self, signum, frame):
        self.stop = True
        # a second Ctrl-C aborts; not under torchrun: its agent repeats one (and kills after 30 s)
        dist.is_initialized() or signal.signal(signal.SIGINT, signal.default_int_handler)

    def every(self, n: int) -> bool:
        return n > 0 and (self.step % n == 0 or self.step == self.total)

    def log(self, **metrics) -> None:
        """One metrics.jsonl line (+ TensorBoard / wandb); losses/* also get charts/SPS."""
        if self.rank > 0:
            return
        now, rec = time.time(), {k: torch.as_tensor(v).item() for k, v in metrics.items()}
        if any(k.startswith("losses/") for k in rec) and self.step > self.sps[0]:
            rec["charts/SPS"] = (self.step - self.sps[0]) / max(now - self.sps[1], 1e-9)
        self.sps = (self.step, now)  # SPS since the last log: evaluation time stays out
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "time": now, **rec}) + "\n")
        for k, v in rec.items() if self.tb else ():  # TensorBoard, when on
            self.tb.add_scalar(k, v, self.step)
        self.wandb and self.wandb.log(rec, step=self.step)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in rec.items()
                              if k.startswith("losses/") or k == "eval/normalized_score"})

    def finish(self) -> Path:
        """The last checkpoint (unless just saved); loggers closed; returns the run folder."""
        self.saved == self.step or self.save()
        self.tb and self.tb.close()
        self.wandb and self.wandb.finish()
        self.rank or print(f"[seqrl] run folder {self.dir}")
        return self.dir
