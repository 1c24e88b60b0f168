"""common.py and make_datasets.py: datasets, validation, evaluation, flags, runs, checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

import common
import make_datasets
from conftest import ROOT, TINY_BUDGET


# ----------------------------------------------------------------------------- environments
def test_env_names_and_unknown_env_is_always_an_error(tmp_path):
    assert common.env_id("hopper") == "Hopper-v5"
    assert common.env_id("InvertedPendulum-v5") == "InvertedPendulum-v5"
    with pytest.raises(ValueError, match="hopper, halfcheetah, walker2d"):
        common.env_id("hoper")
    common.save_npz(tmp_path / "d.npz", _valid())
    with pytest.raises(ValueError, match="unknown env 'hoper'"):  # also with a dataset file
        common.load_dataset("hoper", path=tmp_path / "d.npz")


def test_d4rl_reference_scores_are_d4rls():
    # d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE of the v2 datasets, written out literally
    assert common.REF_SCORES["hopper"] == (-20.272305, 3234.3)
    assert common.REF_SCORES["halfcheetah"] == (-280.178953, 12135.0)
    assert common.REF_SCORES["walker2d"] == (1.629008, 4592.3)
    np.testing.assert_allclose(common.normalized_score("hopper", [3234.3, -20.272305, 1000.0]),
                               [100.0, 0.0, 100 * 1020.272305 / 3254.572305])
    assert np.isnan(common.normalized_score("Pendulum-v1", [1.0])).all()


# ----------------------------------------------------------------------------- episode helpers
def test_returns_to_go_matches_definition():
    r = np.random.default_rng(0).normal(size=37)
    for gamma in (1.0, 0.99, 0.5):
        want = [sum(gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
        np.testing.assert_allclose(common.returns_to_go(r, gamma), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(common.returns_to_go([1.0, 2.0, 3.0]), [6.0, 5.0, 3.0])


def test_split_episodes_boundaries_and_partial_tail():
    n = 10
    data = {"observations": np.arange(n)[:, None].astype(np.float32),
            "rewards": np.arange(n, dtype=np.float32),
            "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    data["terminals"][2] = True  # episode 0 = rows 0..2
    data["timeouts"][6] = True  # episode 1 = rows 3..6, then a tail 7..9 without an end flag
    eps = common.split_episodes(data)
    assert [len(e["rewards"]) for e in eps] == [3, 4, 3]
    assert eps[1]["rewards"][0] == 3 and eps[2]["observations"][-1, 0] == 9
    data["timeouts"][9] = True
    assert [len(e["rewards"]) for e in common.split_episodes(data)] == [3, 4, 3]


# ----------------------------------------------------------------------------- validation
def _valid(n=50, obs=11, act=3):
    rng = np.random.default_rng(0)
    d = dict(observations=rng.normal(size=(n, obs)), actions=rng.uniform(-1, 1, (n, act)),
             rewards=rng.normal(size=n), terminals=np.zeros(n, bool), timeouts=np.zeros(n, bool))
    d["timeouts"][-1] = True
    return d


def test_validate_accepts_and_derives_next_observations():
    d = _valid()
    d["terminals"][9] = True
    out = make_datasets.validate_dataset(d, "hopper")
    assert out["observations"].dtype == np.float32 and out["terminals"].dtype == bool
    nxt = out["next_observations"]
    np.testing.assert_array_equal(nxt[:9], out["observations"][1:10])
    np.testing.assert_array_equal(nxt[9], out["observations"][9])  # an episode's last row
    np.testing.assert_array_equal(nxt[-1], out["observations"][-1])


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.pop("actions"), "missing key"),
    (lambda d: d.pop("timeouts"), "missing key"),
    (lambda d: d.update(rewards=d["rewards"][:-1]), "shape"),
    (lambda d: d["observations"].__setitem__((7, 2), np.nan), "NaN or inf at row 7"),
    (lambda d: d["rewards"].__setitem__(3, np.inf), "NaN or inf at row 3"),
    (lambda d: d.update(terminals=np.where(np.arange(50) == 4, np.nan, 0.0)), "NaN"),
    (lambda d: d.update(terminals=np.where(np.arange(50) == 4, 2, 0)), "other than 0 / 1"),
    (lambda d: d.update(timeouts=np.full(50, 0.5)), "other than 0 / 1"),
    (lambda d: d.update(observations=d["observations"][:, :5]), "Hopper-v5 has 11"),
    (lambda d: d.update(actions=d["actions"][:, :2]), "Hopper-v5 has 3"),
    (lambda d: d.update(observations=d["observations"][:, 0]), "shape"),
    (lambda d: d.update(observations=np.array([["a"] * 11] * 50)), "not numeric"),
    (lambda d: d.update({k: v[:0] for k, v in d.items()}), "0 > 0 rows"),
])
def test_validate_rejects_bad_datasets(corrupt, message):
    d = _valid()
    corrupt(d)
    with pytest.raises(common.DatasetError, match=message):
        make_datasets.validate_dataset(d, "hopper", source="bad.npz")


def test_a_last_episode_without_end_flag_is_said_and_closed(capsys):
    d = _valid()
    d["timeouts"][-1] = False
    out = make_datasets.validate_dataset(d, "hopper", source="x.npz")
    assert out["timeouts"][-1] and "no end flag" in capsys.readouterr().out


def test_bad_files(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "garbage.hdf5").write_bytes(b"not hdf5")
    for name, message in [("empty.npz", "not a readable .npz"), ("garbage.npz", "not a readable"),
                          ("garbage.hdf5", "not a readable HDF5"), ("none.npz", "does not exist")]:
        with pytest.raises(common.DatasetError, match=message):
            common.load_dataset("hopper", path=tmp_path / name)
    with pytest.raises(common.DatasetError, match="unknown dataset 'meduim'"):
        common.load_dataset("hopper", "meduim")


def test_npz_round_trip_and_dataset_env(tmp_path):
    d = make_datasets.validate_dataset(_valid(), "hopper")
    common.save_npz(tmp_path / "d.npz", d)
    back = common.load_dataset("hopper", path=tmp_path / "d.npz")
    assert isinstance(back, dict) and back.env == "hopper"
    for k in common.KEYS:
        np.testing.assert_array_equal(back[k], d[k])


def test_d4rl_hdf5_v2_and_v0_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    d = _valid()
    with h5py.File(tmp_path / "v2.hdf5", "w") as f:
        for k, v in d.items():
            f[k] = v
        f["infos/qpos"] = np.zeros((50, 3))  # extra D4RL groups are ignored
    back = common.load_dataset("hopper", path=tmp_path / "v2.hdf5")
    np.testing.assert_allclose(back["observations"], d["observations"], rtol=1e-6)
    # v0 layout: no `timeouts`; an episode that reaches Hopper's 1000-step limit ends with one
    n = 1005
    v0 = dict(observations=np.zeros((n, 11)), actions=np.zeros((n, 3)), rewards=np.ones(n),
              terminals=np.zeros(n, bool))
    v0["terminals"][1004] = True  # episode 1: rows 1000..1004, ends in a terminal
    with h5py.File(tmp_path / "v0.hdf5", "w") as f:
        for k, v in v0.items():
            f[k] = v
    back = common.load_dataset("hopper", path=tmp_path / "v0.hdf5")
    assert np.flatnonzero(back["timeouts"]).tolist() == [999]
    assert [len(e["rewards"]) for e in common.split_episodes(back)] == [1000, 5]


@pytest.fixture()
def minari_dataset(tmp_path, monkeypatch):
    """A local Minari dataset test/hopper/tiny-v0 (two versions) with reference scores."""
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    from minari.data_collector.episode_buffer import EpisodeBuffer
    env = common.make_env("hopper")
    for version, lengths in ((0, (20, 20)), (1, (20, 40))):
        episodes = []
        for i, n in enumerate(lengths):  # random actions; the first episode ends in a terminal
            obs = [env.reset(seed=i)[0]]
            acts = [env.action_space.sample() for _ in range(n)]
            obs += [env.step(a)[0] for a in acts]
            episodes.append(EpisodeBuffer(id=i, observations=np.array(obs), actions=np.array(acts),
                                          rewards=list(np.ones(n)), terminations=[False] * (n - 1)
                                          + [i == 0], truncations=[False] * (n - 1) + [i == 1]))
        minari.create_dataset_from_buffers(f"test/hopper/tiny-v{version}", episodes, env=env,
                                           algorithm_name="random", ref_min_score=-10.0,
                                           ref_max_score=90.0 + version)
    yield "test/hopper/tiny"
    common.REF_SCORES.pop("test/hopper/tiny", None)


def test_minari_env_version_and_reference_scores(minari_dataset):
    data = common.load_dataset("halfcheetah", minari_dataset)  # the env comes from the dataset
    assert data.env == "hopper" and len(data["rewards"]) == 60  # the newest local version, v1
    assert common.REF_SCORES[minari_dataset] == (-10.0, 91.0)
    assert common.normalized_score("hopper", 40.5, dataset=minari_dataset) == pytest.approx(50.0)
    assert np.flatnonzero(data["terminals"]).tolist() == [19]
    assert np.flatnonzero(data["timeouts"]).tolist() == [59]
    np.testing.assert_array_equal(data["next_observations"][:19], data["observations"][1:20])
    with pytest.raises(common.DatasetError, match="minari download test/walker/none"):
        common.load_dataset("hopper", "test/walker/none")


def test_without_make_datasets_the_error_says_what_to_do(tmp_path):
    shutil.copy(ROOT / "common.py", tmp_path)
    script = "import common; common.load_dataset('hopper', 'medium')"
    env = dict(os.environ, SEQRL_DATA_DIR=str(tmp_path / "data"), PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "needs make_datasets.py beside common.py" in out.stderr


# ----------------------------------------------------------------------------- generation
def test_tiny_generation_is_valid_deterministic_and_cached(tiny_dataset):
    d = common.load_dataset("hopper", path=tiny_dataset("hopper", "medium", 3000))
    assert len(d["rewards"]) == 3000
    ends = d["terminals"] | d["timeouts"]
    assert ends[-1] and not (d["terminals"] & d["timeouts"]).any()
    np.testing.assert_array_equal(d["next_observations"][:-1][~ends[:-1]],
                                  d["observations"][1:][~ends[:-1]])
    assert common.dataset_path("hopper", "medium", 3000, 0, TINY_BUDGET).exists()
    again = make_datasets.generate_dataset("hopper", "medium", size=3000, seed=0,
                                           budget=TINY_BUDGET, workers=1, verbose=False)
    for k in common.KEYS:  # the same seed gives the same data, whatever the worker count
        np.testing.assert_array_equal(again[k], d[k])


def test_medium_replay_is_a_learning_history(tiny_dataset):
    d = common.load_dataset("hopper", path=tiny_dataset("hopper", "medium-replay", 10**6))
    rets = np.array([e["rewards"].sum() for e in common.split_episodes(d)])
    q = len(rets) // 4
    assert len(rets) >= 20 and rets[-q:].mean() > rets[:q].mean()


def test_random_dataset_uses_uniform_actions(tiny_dataset):
    d = common.load_dataset("hopper", path=tiny_dataset("hopper", "random", 2000))
    assert d["actions"].min() >= -1 and d["actions"].max() <= 1
    assert abs(d["actions"].mean()) < 0.1 and d["actions"].std() > 0.5


def test_make_datasets_cli_prints_a_summary(tiny_dataset):
    tiny_dataset("hopper", "medium", 3000)
    out = subprocess.run([sys.executable, str(ROOT / "make_datasets.py"), "--env", "hopper",
                          "--size", "3000", "--budget", str(TINY_BUDGET)],
                         capture_output=True, text=True, check=True).stdout
    assert "3000 transitions" in out and "D4RL-normalized mean" in out


# ----------------------------------------------------------------------------- evaluation
class _LinearPolicy:
    """A deterministic batched policy that records the hooks evaluate() calls."""

    def __init__(self, obs_dim, act_dim):
        self.W = np.random.default_rng(1).normal(0, 0.5, (obs_dim, act_dim))
        self.observed = []

    def reset(self, n):
        self.n = n

    def __call__(self, obs):
        assert obs.dtype == np.float32 and obs.shape == (self.n, self.W.shape[0])
        return torch.as_tensor(np.tanh(obs @ self.W))  # torch output is accepted too

    def observe(self, rewards, dones):
        self.observed.append(rewards.copy())


def test_vectorized_evaluation_equals_sequential():
    pol = _LinearPolicy(*common.env_dims("hopper"))
    vec = common.evaluate(pol, "hopper", n_episodes=4, seed=7, progress=False)
    observed = np.sum(pol.observed, axis=0)
    seq = [common.evaluate(pol, "hopper", n_episodes=1, seed=7 + i) for i in range(4)]
    np.testing.assert_allclose(vec["returns"], [s["returns"][0] for s in seq], rtol=1e-6)
    np.testing.assert_array_equal(vec["lengths"], [s["lengths"][0] for s in seq])
    assert len(set(vec["lengths"].tolist())) > 1, "episodes must end at different steps"
    np.testing.assert_allclose(observed, vec["returns"], rtol=1e-5)


def test_evaluation_bar_counts_environment_steps(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.total, self.n = kw["total"], 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def update(self, n):
            self.n += n

    monkeypatch.setattr(common, "tqdm", Bar)
    out = common.evaluate(_LinearPolicy(*common.env_dims("hopper")), "hopper", 3, seed=0)
    assert bars[0].total == 3 * 1000 and bars[0].n == out["lengths"].sum()


# ----------------------------------------------------------------------------- flags
@dataclass
class _Args:
    env: str = "hopper"
    """which environment"""
    lr: float = 1e-4
    """learning rate (a 100% literal docstring)"""
    cuda: bool = True
    """use the GPU"""
    dims: tuple[int, ...] = (1, 2)
    """channel multipliers"""
    resume: Optional[str] = None
    """checkpoint to resume"""
    mults: Optional[tuple[int, ...]] = None
    """optional multipliers"""


def test_parse_args_flags_defaults_and_wandb(monkeypatch):
    assert common.parse_args(_Args, []) == _Args()
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    a = common.parse_args(_Args, ["--env", "walker2d", "--lr", "3e-4", "--no-cuda", "--dims", "1",
                                  "4", "--resume", "x.pt", "--mults", "2", "--wandb-project", "p"])
    assert (a.env, a.lr, a.cuda, a.dims, a.resume, a.mults) == ("walker2d", 3e-4, False, (1, 4),
                                                                "x.pt", (2,))
    assert os.environ["WANDB_PROJECT"] == "p"


def test_parse_args_help_shows_field_docs(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(_Args, ["--help"])
    out = capsys.readouterr().out
    for text in ("which environment", "a 100% literal docstring", "--no-cuda", "--wandb-entity"):
        assert text in out


# ----------------------------------------------------------------------------- runs and checkpoints
@dataclass
class _RunArgs:
    exp_name: str = "toy"
    seed: int = 0
    env: str = "hopper"
    dataset: str = "medium"
    dataset_path: Optional[str] = None
    total_steps: int = 8
    resume: Optional[str] = None
    tensorboard: bool = False
    track: bool = False


def _train(args, stop_at=None):
    """A toy run that draws from every RNG a run depends on: torch, a generator, numpy, python."""
    import random
    common.set_seed(args.seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    gen = torch.Generator().manual_seed(args.seed)
    run = common.Run(args, "toy", extra=lambda: dict(mean=torch.ones(3)), model=model,
                     optimizer=opt, scheduler=sched, sampler=gen)
    for step in run.loop(args.total_steps):
        x = torch.randn(4, 3, generator=gen) + torch.randn(3) + np.random.rand() + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run.log(**{"losses/loss": loss})
        if run.every(3):
            run.log(**{"eval/normalized_score": 1.0})
            run.save()
        if step == stop_at:
            break
    run.finish()
    return run, model


def test_run_folder_logs_and_portable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, model = _train(_RunArgs())
    again, _ = _train(_RunArgs())
    assert run.dir != again.dir and run.dir.name.startswith("hopper__toy__0__")  # same second
    assert json.loads((run.dir / "args.json").read_text())["total_steps"] == 8
    recs = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "losses/loss" in r] == list(range(1, 9))
    assert all("charts/SPS" in r for r in recs if "losses/loss" in r and r["step"] > 1)
    ckpt = torch.load(run.dir / "checkpoint.pt", weights_only=True)  # plain tensors and values
    assert ckpt["algo"] == "toy" and ckpt["step"] == 8 and ckpt["args"]["env"] == "hopper"
    assert torch.equal(ckpt["model"]["weight"], model.weight) and torch.equal(ckpt["mean"],
                                                                             torch.ones(3))
    path_run = common.Run(_RunArgs(dataset_path=str(tmp_path / "hopper_medium-v2.hdf5")), "toy")
    minari_run = common.Run(_RunArgs(dataset="mujoco/hopper/medium-v0"), "toy")
    assert path_run.dir.name.startswith("hopper_medium-v2__toy__0__")
    assert minari_run.dir.name.startswith("mujoco-hopper-medium-v0__toy__0__")


def test_resume_continues_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, straight = _train(_RunArgs(exp_name="a"))
    half, _ = _train(_RunArgs(exp_name="b"), stop_at=4)  # saved at step 3 and then at 4
    resumed, model = _train(_RunArgs(exp_name="b", resume=str(half.dir / "checkpoint.pt")))
    assert resumed.dir == half.dir and resumed.step == 8
    assert torch.equal(model.weight, straight.weight) and torch.equal(model.bias, straight.bias)


def test_resume_from_another_device_reseeds_the_generator(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run, _ = _train(_RunArgs(total_steps=2))
    ckpt = torch.load(run.dir / "checkpoint.pt", weights_only=True)
    ckpt["sampler"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state size
    torch.save(ckpt, run.dir / "checkpoint.pt")
    _train(_RunArgs(total_steps=3, resume=str(run.dir / "checkpoint.pt")))
    assert "reseeded, not continued" in capsys.readouterr().out


def test_ctrl_c_saves_then_exits_130_and_resume_finishes(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        import common, torch
        from test_common import _RunArgs
        args = common.parse_args(_RunArgs, sys.argv[1:])
        model = torch.nn.Linear(2, 2)
        run = common.Run(args, "toy", model=model)
        for step in run.loop(args.total_steps):
            print("step", step, flush=True)
            time.sleep(0.05)
        run.finish()
    """))
    proc = subprocess.Popen([sys.executable, str(script), "--total-steps", "1000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("step")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted: saved" in out
    ckpt_path = next(tmp_path.glob("runs/*/checkpoint.pt"))
    step = common.load_checkpoint(ckpt_path, "toy")["step"]
    assert 1 <= step < 1000 and f"step {step}\n" in out and f"step {step + 1}" not in out
    done = subprocess.run([sys.executable, str(script), "--total-steps", str(step + 2),
                           "--resume", str(ckpt_path)], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout
    assert done.startswith(f"step {step + 1}\nstep {step + 2}\n")


def test_bad_checkpoints_have_clear_errors(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage")
    torch.save({"step": 1, "algo": "toy", "w": torch.ones(2)}, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:40])
    torch.save({"step": 1}, tmp_path / "noalgo.pt")
    torch.save({"algo": "toy", "stats": np.zeros(3)}, tmp_path / "numpy.pt")  # not weights_only
    for name, message in [("garbage.pt", "cannot read"), ("truncated.pt", "cannot read"),
                          ("none.pt", "cannot read"), ("noalgo.pt", "no 'algo' key"),
                          ("numpy.pt", "cannot read")]:
        with pytest.raises(common.CheckpointError, match=message):
            common.load_checkpoint(tmp_path / name)
    with pytest.raises(common.CheckpointError, match="a toy checkpoint: use toy.py"):
        common.load_checkpoint(tmp_path / "good.pt", "dt")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    common.atomic_write(path, lambda tmp: torch.save({"step": 1}, tmp))

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        common.atomic_write(path, fail)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "no temp file may be left behind"
