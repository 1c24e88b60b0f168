"""Invariants of common.py: datasets, episode helpers, evaluation, args, logs, checkpoints."""
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, TINY_BUDGET


# ----------------------------------------------------------------------------- environments
def test_env_names_and_unknown_env_error():
    assert common.env_id("hopper") == "Hopper-v5"
    assert common.env_id("InvertedPendulum-v5") == "InvertedPendulum-v5"
    with pytest.raises(ValueError, match="hopper, halfcheetah, walker2d"):
        common.env_id("hoper")
    with pytest.raises(ValueError, match="unknown env"):
        common.make_env("cartpole-v99")


def test_normalized_score_references():
    lo, hi = common.REF_SCORES["hopper"]
    np.testing.assert_allclose(common.normalized_score("hopper", [lo, hi, (lo + hi) / 2]), [0, 100, 50])
    assert np.isnan(common.normalized_score("Pendulum-v1", [1.0])).all()


# ----------------------------------------------------------------------------- episode helpers
def test_returns_to_go_matches_definition():
    r = np.random.default_rng(0).normal(size=37)
    for gamma in (1.0, 0.99, 0.5):
        want = [sum(gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
        got = common.returns_to_go(r, gamma)
        assert got.shape == r.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(common.returns_to_go([1.0, 2.0, 3.0]), [6.0, 5.0, 3.0])


def test_split_episodes_boundaries_and_partial_tail():
    n = 10
    data = {"observations": np.arange(n)[:, None].astype(np.float32), "rewards": np.arange(n, dtype=np.float32),
            "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}
    data["terminals"][2] = True   # episode 0 = rows 0..2
    data["timeouts"][6] = True    # episode 1 = rows 3..6, tail 7..9 is partial
    eps = common.split_episodes(data)
    assert [len(e["rewards"]) for e in eps] == [3, 4, 3]
    assert eps[1]["rewards"][0] == 3 and eps[2]["observations"][-1, 0] == 9


# ----------------------------------------------------------------------------- validation
def _valid(n=50, obs=11, act=3):
    rng = np.random.default_rng(0)
    d = dict(observations=rng.normal(size=(n, obs)), actions=rng.uniform(-1, 1, (n, act)),
             rewards=rng.normal(size=n), terminals=np.zeros(n, bool), timeouts=np.zeros(n, bool))
    d["timeouts"][-1] = True
    return d


def test_validate_accepts_and_derives_next_observations():
    d = common.validate_dataset(_valid(), env="hopper")
    assert d["observations"].dtype == np.float32 and d["terminals"].dtype == bool
    np.testing.assert_array_equal(d["next_observations"][:-1], d["observations"][1:])


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.pop("actions"), "missing key"),
    (lambda d: d.update(rewards=d["rewards"][:-1]), "rows"),
    (lambda d: d["observations"].__setitem__((7, 2), np.nan), "NaN"),
    (lambda d: d["rewards"].__setitem__(3, np.inf), "NaN or inf"),
    (lambda d: d.update(observations=d["observations"][:, :5]), "observes 11"),
    (lambda d: d.update(actions=d["actions"][:, :2]), "takes 3"),
    (lambda d: d.update(observations=d["observations"][:, 0]), "2-D"),
])
def test_validate_rejects_bad_datasets(corrupt, message):
    d = _valid()
    corrupt(d)
    with pytest.raises(common.DatasetError, match=message):
        common.validate_dataset(d, env="hopper", source="bad.npz")


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(common.DatasetError, match="empty"):
        common.load_dataset("hopper", path=empty)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(common.DatasetError, match="not a .npz file"):
        common.load_dataset("hopper", path=garbage)
    with pytest.raises(FileNotFoundError):
        common.load_dataset("hopper", path=tmp_path / "missing.npz")
    no_rows = tmp_path / "norows.npz"
    common.save_npz(no_rows, {k: v[:0] for k, v in _valid().items()})
    with pytest.raises(common.DatasetError, match="empty"):
        common.load_dataset("hopper", path=no_rows)
    with pytest.raises(ValueError, match="unknown dataset"):
        common.load_dataset("hopper", "meduim")


def test_npz_round_trip(tmp_path):
    d = common.validate_dataset(_valid(), env="hopper")
    common.save_npz(tmp_path / "d.npz", d)
    back = common.load_dataset("hopper", path=tmp_path / "d.npz")
    for k in common.KEYS:
        np.testing.assert_array_equal(back[k], d[k])


# ----------------------------------------------------------------------------- generation
def test_tiny_generation_is_valid_deterministic_and_cached(tiny_dataset, data_dir):
    path = tiny_dataset("hopper", "medium", 3000)
    d = common.load_dataset("hopper", path=path)
    assert len(d["rewards"]) == 3000
    ends = np.logical_or(d["terminals"], d["timeouts"])
    assert ends[-1], "every episode (the last one included) must end with terminals or timeouts"
    assert not np.logical_and(d["terminals"], d["timeouts"]).any()
    # transitions chain inside an episode: next_obs[t] == obs[t+1] unless t ends an episode
    np.testing.assert_array_equal(d["next_observations"][:-1][~ends[:-1]], d["observations"][1:][~ends[:-1]])
    # cached by (env, dataset, size, seed, budget)
    assert common.dataset_path("hopper", "medium", 3000, 0, TINY_BUDGET).exists()
    # the same seed gives the same data, whatever the number of worker processes
    again = common.generate_dataset("hopper", "medium", size=3000, seed=0, budget=TINY_BUDGET,
                                    workers=1, verbose=False)
    for k in common.KEYS:
        np.testing.assert_array_equal(again[k], d[k])


def test_medium_replay_is_a_learning_history(tiny_dataset):
    d = common.load_dataset("hopper", path=tiny_dataset("hopper", "medium-replay", 10**6))
    rets = np.array([e["rewards"].sum() for e in common.split_episodes(d)])
    assert len(rets) >= 20
    q = len(rets) // 4
    assert rets[-q:].mean() > rets[:q].mean(), "ARS returns should trend upward over the history"
    ends = np.logical_or(d["terminals"], d["timeouts"])
    assert ends[-1]


def test_random_dataset_uses_uniform_actions(tiny_dataset):
    d = common.load_dataset("hopper", path=tiny_dataset("hopper", "random", 2000))
    assert len(d["rewards"]) == 2000
    assert d["actions"].min() >= -1 and d["actions"].max() <= 1
    assert abs(d["actions"].mean()) < 0.1 and d["actions"].std() > 0.5


# ----------------------------------------------------------------------------- evaluation
class _LinearPolicy:
    """Deterministic batched policy that also records the hooks evaluate() calls."""
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
    vec = common.evaluate(pol, "hopper", n_episodes=4, seed=7)
    seq = [common.evaluate(pol, "hopper", n_episodes=1, seed=7 + i) for i in range(4)]
    np.testing.assert_allclose(vec["returns"], [s["returns"][0] for s in seq], rtol=1e-6)
    np.testing.assert_array_equal(vec["lengths"], [s["lengths"][0] for s in seq])
    assert len(set(vec["lengths"].tolist())) > 1, "episodes should end at different steps (masking exercised)"
    np.testing.assert_allclose(vec["normalized"], common.normalized_score("hopper", vec["returns"]))


def test_evaluate_observe_hook_sums_to_returns():
    pol = _LinearPolicy(*common.env_dims("hopper"))
    out = common.evaluate(pol, "hopper", n_episodes=3, seed=0)
    np.testing.assert_allclose(np.sum(pol.observed, axis=0), out["returns"], rtol=1e-5)


# ----------------------------------------------------------------------------- args
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


def test_parse_args_flags_and_defaults():
    a = common.parse_args(_Args, [])
    assert a == _Args()
    a = common.parse_args(_Args, ["--env", "walker2d", "--lr", "3e-4", "--no-cuda", "--dims", "1", "4", "8",
                                  "--resume", "x.pt", "--mults", "2", "3"])
    assert (a.env, a.lr, a.cuda, a.dims, a.resume, a.mults) == ("walker2d", 3e-4, False, (1, 4, 8), "x.pt", (2, 3))


def test_parse_args_help_shows_field_docs(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(_Args, ["--help"])
    out = capsys.readouterr().out
    for text in ("which environment", "a 100% literal docstring", "--no-cuda", "channel multipliers"):
        assert text in out


# ----------------------------------------------------------------------------- runs and checkpoints
def test_run_logger_writes_args_and_metrics(tmp_path):
    log = common.RunLogger(_Args(), "test", run_dir=tmp_path / "run")
    log.log(10, **{"losses/loss": np.float32(0.5), "eval/return_mean": 3.0})
    log.close()
    assert json.loads((tmp_path / "run" / "args.json").read_text())["dims"] == [1, 2]
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 10 and rec["losses/loss"] == 0.5


def test_checkpoint_round_trip_and_rng_state(tmp_path):
    common.set_seed(3)
    state = {"model": torch.nn.Linear(2, 2).state_dict(), "step": 5, "rng": common.rng_state()}
    common.save_checkpoint(tmp_path / "c.pt", state)
    a = (np.random.rand(), torch.rand(1).item())
    back = common.load_checkpoint(tmp_path / "c.pt", required=("model", "step"))
    common.set_rng_state(back["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == a
    assert torch.equal(back["model"]["weight"], state["model"]["weight"])
    with pytest.raises(common.CheckpointError, match="lacks"):
        common.load_checkpoint(tmp_path / "c.pt", required=("optimizer",))


def test_corrupt_or_missing_checkpoint_has_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(common.CheckpointError, match="corrupt"):
        common.load_checkpoint(bad)
    good = tmp_path / "good.pt"
    common.save_checkpoint(good, {"step": 1})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(common.CheckpointError, match="corrupt"):
        common.load_checkpoint(truncated)
    with pytest.raises(common.CheckpointError, match="does not exist"):
        common.load_checkpoint(tmp_path / "none.pt")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    common.save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        common.save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert common.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "no temp file may be left behind"


def test_cli_prints_a_summary(tiny_dataset):
    path = tiny_dataset("hopper", "medium", 3000)
    out = subprocess.run([sys.executable, str(ROOT / "common.py"), "dataset", "--env", "hopper", "--path", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "3000 transitions" in out and "D4RL-normalized mean" in out


def test_d4rl_hdf5_file_loads(tmp_path):
    h5py = pytest.importorskip("h5py")
    d = _valid()
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        for k, v in d.items():
            f[k] = v
        f["infos/qpos"] = np.zeros((len(v), 3))  # extra D4RL groups are ignored
    back = common.load_dataset("hopper", path=tmp_path / "d.hdf5")
    np.testing.assert_allclose(back["observations"], d["observations"], rtol=1e-6)
