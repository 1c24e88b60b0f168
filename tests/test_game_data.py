"""make_datasets.py, games: MinAtar DQN source agents, Atari DQN-Replay reader, game data checks.
Numbers are pinned from MinAtar's examples/dqn.py, ALE's action numbering, the Atari-57 score
table and hand computations, never read back from the code under test."""
import gzip

import numpy as np
import pytest
import torch

import common
import make_datasets as md

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")


@pytest.fixture
def quick(monkeypatch):
    """DQN with an early replay start and few evaluation episodes (seconds, not minutes)."""
    monkeypatch.setattr(md, "REPLAY_START_SIZE", 200)
    monkeypatch.setattr(md, "EVAL_EPISODES", 3)


# ------------------------------------------------------------------------------- constants
def test_dqn_constants_are_minatars():
    # MinAtar examples/dqn.py (Young & Tian 2019, App.)
    assert md.BATCH_SIZE == 32
    assert md.REPLAY_BUFFER_SIZE == 100_000
    assert md.TARGET_NETWORK_UPDATE_FREQ == 1000
    assert md.FIRST_N_FRAMES == 100_000
    assert md.REPLAY_START_SIZE == 5000
    assert (md.START_EPSILON, md.END_EPSILON) == (1.0, 0.1)
    assert md.STEP_SIZE == 0.00025
    assert (md.GRAD_MOMENTUM, md.SQUARED_GRAD_MOMENTUM, md.MIN_SQUARED_GRAD) == (0.95, 0.95, 0.01)
    assert md.GAMMA == 0.99
    assert md.TRAINING_FREQ == 4  # the named deviation (MinAtar: 1), Nature DQN's update period
    assert (md.EVAL_EPSILON, md.EVAL_EPISODES) == (0.05, 100)
    assert md.DQN_FRAMES == 500_000
    # the contract's environment settings
    assert md.MAX_EPISODE_STEPS == 2500
    assert md.STICKY_ACTION_PROB == 0.1
    assert md.MINATAR_CHANNELS == dict(asterix=4, breakout=4, freeway=7, seaquest=10,
                                       space_invaders=6)
    opt = md.make_optimizer([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert (opt["lr"], opt["alpha"], opt["eps"], opt["momentum"], opt["centered"]) == (
        0.00025, 0.95, 0.01, 0.95, True)


def test_epsilon_schedule_by_hand():
    assert md.epsilon_at(0) == 1.0
    assert md.epsilon_at(4999) == 1.0  # uniform actions before the replay start
    assert md.epsilon_at(5000) == 1.0
    assert md.epsilon_at(5000 + 50_000) == pytest.approx(0.55)
    assert md.epsilon_at(5000 + 25_000) == pytest.approx(0.775)
    assert md.epsilon_at(105_000) == pytest.approx(0.1)
    assert md.epsilon_at(2_000_000) == pytest.approx(0.1)


# --------------------------------------------------------------------------------- network
def test_qnetwork_layers_and_channel_last_input():
    net = md.QNetwork(4)
    # conv 4*16*9 + 16, FC 1024*128 + 128, output 128*6 + 6
    assert sum(p.numel() for p in net.parameters()) == 592 + 131_200 + 774
    assert sum(p.numel() for p in md.QNetwork(10).parameters()) == 1456 + 131_200 + 774
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv.weight[0, 2, 0, 0] = 1.0  # conv channel 0 at (i, j) = input channel 2 at (i, j)
        net.fc_hidden.weight[0, 1] = 1.0  # flat index 1 = conv channel 0, row 0, column 1
        net.output.weight[3, 0] = 2.0
    obs = torch.zeros(1, 10, 10, 4, dtype=torch.uint8)  # (B, H, W, C) as the datasets store it
    obs[0, 0, 1, 2] = 1
    assert net(obs).tolist() == [[0.0, 0.0, 0.0, 2.0, 0.0, 0.0]]
    obs_t = torch.zeros(1, 10, 10, 4, dtype=torch.uint8)
    obs_t[0, 1, 0, 2] = 1  # the transposed pixel must not light it up
    assert net(obs_t).tolist() == [[0.0] * 6]


class _TableQ(torch.nn.Module):
    """Q(s) = a row of a table, the row index stored in pixel (0, 0, 0) of the observation."""

    def __init__(self, rows):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(rows, dtype=torch.float32))

    def forward(self, obs):
        return self.table[obs[:, 0, 0, 0].long()]


def _obs(ids):
    o = torch.zeros(len(ids), 10, 10, 4, dtype=torch.uint8)
    o[:, 0, 0, 0] = torch.tensor(ids)
    return o


def test_dqn_loss_by_hand():
    online = _TableQ([[1.0, 2.0, 0, 0, 0, 0], [-0.6, 9.0, 0, 0, 0, 0],
                      [100.0] * 6, [100.0] * 6])  # rows 2, 3: next states, must not be used
    target = _TableQ([[0.0] * 6, [0.0] * 6, [3.0, 5.0, 4.0, 0, 0, 0], [10.0] * 6])
    loss = md.dqn_loss(online, target, _obs([0, 1]), torch.tensor([1, 0]),
                       torch.tensor([1.0, -1.0]), _obs([2, 3]), torch.tensor([False, True]))
    # targets: 1 + 0.99 * 5 = 5.95; -1 (terminal: no bootstrap)
    # Huber: |2 - 5.95| = 3.95 -> 3.95 - 0.5 = 3.45; |-0.6 + 1| = 0.4 -> 0.5 * 0.16 = 0.08
    assert loss.item() == pytest.approx((3.45 + 0.08) / 2, abs=1e-6)
    loss.backward()
    assert target.table.grad is None
    g = online.table.grad
    assert g[0, 1].item() == pytest.approx(-0.5) and g[1, 0].item() == pytest.approx(0.2)
    assert g[2:].abs().sum() == 0 and g[0, 0] == 0


def test_dqn_schedule_of_updates_and_target_syncs(quick, monkeypatch):
    monkeypatch.setattr(md, "TARGET_NETWORK_UPDATE_FREQ", 3)
    steps, syncs = [], []
    step = torch.optim.RMSprop.step
    monkeypatch.setattr(torch.optim.RMSprop, "step", lambda self, *a: steps.append(1) or step(self))
    load = md.QNetwork.load_state_dict
    monkeypatch.setattr(md.QNetwork, "load_state_dict",
                        lambda self, *a, **k: syncs.append(1) or load(self, *a, **k))
    md.run_dqn("breakout", frames=200 + 97, seed=0, verbose=False)
    # updates at t = 204, 208, ..., 296 (t > 200, t % 4 == 0): 24; syncs: the first copy + 24 / 3
    assert len(steps) == 24
    assert len(syncs) == 1 + 8


# -------------------------------------------------------------------------- generated data
def _check_contract(d, game, n):
    assert d["observations"].dtype == np.uint8
    assert d["observations"].shape == (n, 10, 10, md.MINATAR_CHANNELS[game])
    assert set(np.unique(d["observations"])) <= {0, 1}
    assert d["actions"].dtype == np.int64 and d["actions"].min() >= 0 and d["actions"].max() <= 5
    assert d["rewards"].dtype == np.float32
    assert d["terminals"].dtype == bool and d["timeouts"].dtype == bool
    assert d["terminals"][-1] or d["timeouts"][-1]
    assert not (d["terminals"] & d["timeouts"]).any()
    assert d["source_step"].dtype == np.int64
    np.testing.assert_array_equal(d["source_step"], np.arange(n))
    for k in ("ref_random", "ref_expert"):
        assert d[k].dtype == np.float64 and d[k].shape == ()


def test_generation_is_deterministic_per_seed_and_meets_the_contract(quick):
    a = md.run_dqn("breakout", frames=1500, seed=0, verbose=False)
    b = md.run_dqn("breakout", frames=1500, seed=0, verbose=False)
    c = md.run_dqn("breakout", frames=1500, seed=1, verbose=False)
    _check_contract(a, "breakout", 1500)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(a["actions"], c["actions"])
    assert a["terminals"].sum() >= 5  # breakout episodes end with the ball lost
    md.validate_game_data(a, "minatar/breakout")
    # each episode starts from minatar_reset: frame 0 is the reset state of its own seed
    ends = np.flatnonzero(a["terminals"] | a["timeouts"])
    assert (a["observations"][ends[:-1] + 1].sum((1, 2, 3)) > 0).all()


def test_episode_cap_sets_timeouts(quick, monkeypatch):
    monkeypatch.setattr(md, "MAX_EPISODE_STEPS", 50)
    d = md.run_dqn("freeway", frames=230, seed=0, verbose=False)  # freeway never ends by itself
    np.testing.assert_array_equal(np.flatnonzero(d["timeouts"]), [49, 99, 149, 199, 229])
    assert not d["terminals"].any()
    _check_contract(d, "freeway", 230)


def test_random_phase_actions_are_uniform(monkeypatch):
    monkeypatch.setattr(md, "EVAL_EPISODES", 3)
    d = md.run_dqn("space_invaders", frames=3000, seed=0, verbose=False)  # all before 5000
    counts = np.bincount(d["actions"], minlength=6)
    assert counts.min() > 3000 / 6 * 0.8, counts


def test_vectorized_evaluation_equals_one_episode_at_a_time():
    net = md.QNetwork(6)
    seeds = [11, 12, 13]
    together = md.evaluate_minatar("space_invaders", net, seeds, eps=0.0)
    for s, ret in zip(seeds, together):
        env = md.minatar_env("space_invaders")
        obs, total = md.minatar_reset(env, s), 0.0
        for _ in range(md.MAX_EPISODE_STEPS):
            with torch.no_grad():
                a = int(net(torch.from_numpy(obs[None])).argmax())
            r, done = env.act(a)
            total += r
            obs = env.state().astype(np.uint8)
            if done:
                break
        assert ret == total


# ------------------------------------------------------------------------ Atari DQN-Replay
def _write_replay(d, n=(5, 5), obs_shape=(84, 84), seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(exist_ok=True)
    for i, m in enumerate(n):
        arrays = dict(
            observation=rng.integers(0, 256, (m, *obs_shape), dtype=np.uint8),
            action=np.array([0, 1, 2, 3, 4, 5, 0, 1][:m], dtype=np.int32),
            reward=np.array([0, 1, -1, 0, 3, 0, 0, 1][:m], dtype=np.float32),
            terminal=np.array([0, 0, 1, 0, 0, 0, 0, 0][:m], dtype=np.uint8))
        for k, v in arrays.items():
            with gzip.open(d / f"$store$_{k}_ckpt.{i}.gz", "wb") as f:
                np.save(f, v, allow_pickle=False)
    return d


def test_minimal_action_sets_from_ale():
    # ALE's full numbering: NOOP 0, FIRE 1, UP 2, RIGHT 3, LEFT 4, DOWN 5, UPRIGHT 6, UPLEFT 7,
    # DOWNRIGHT 8, DOWNLEFT 9, ..., RIGHTFIRE 11, LEFTFIRE 12
    assert md.minimal_action_set("Pong").tolist() == [0, 1, 3, 4, 11, 12]
    assert md.minimal_action_set("Breakout").tolist() == [0, 1, 3, 4]
    assert md.minimal_action_set("MsPacman").tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9]


def test_atari_reference_scores_are_the_atari57_table():
    assert md.ATARI_SCORES["Pong"] == (-20.7, 14.6)
    assert md.ATARI_SCORES["Alien"] == (227.8, 7127.7)
    assert md.ATARI_SCORES["MsPacman"] == (307.3, 6951.6)
    assert md.ATARI_SCORES["SpaceInvaders"] == (148.0, 1668.7)
    assert md.ATARI_SCORES["StarGunner"] == (664.0, 10250.0)
    assert md.ATARI_SCORES["Breakout"] == (1.7, 30.5)


def test_dqn_replay_reader(tmp_path):
    d = _write_replay(tmp_path / "replay_logs")
    data = common.load_dataset("atari/Pong", "dqn-replay", path=d, verbose=False)
    assert data["observations"].shape == (10, 84, 84, 1) and data["observations"].dtype == np.uint8
    with gzip.open(d / "$store$_observation_ckpt.1.gz") as f:
        np.testing.assert_array_equal(data["observations"][5:, :, :, 0], np.load(f))
    # minimal indices 0..5 of Pong -> full 0, 1, 3, 4, 11, 12
    assert data["actions"].tolist() == [0, 1, 3, 4, 11, 0, 1, 3, 4, 11]
    assert data["actions"].dtype == np.int64
    assert data["rewards"].tolist() == [0, 1, -1, 0, 3] * 2
    assert np.flatnonzero(data["terminals"]).tolist() == [2, 7]
    assert np.flatnonzero(data["timeouts"]).tolist() == [4, 9]  # each checkpoint's end
    assert data["source_step"].tolist() == list(range(10))
    assert (float(data["ref_random"]), float(data["ref_expert"])) == (-20.7, 14.6)
    capped = md.read_dqn_replay(d, "Pong", size=7)
    assert len(capped["actions"]) == 7 and np.flatnonzero(capped["timeouts"]).tolist() == [4, 6]
    one = md.read_dqn_replay(d, "Pong", checkpoints=[1])
    assert one["source_step"].tolist() == [5, 6, 7, 8, 9]


def test_dqn_replay_bad_inputs(tmp_path):
    with pytest.raises(common.DatasetError, match="does not exist"):
        md.read_dqn_replay(tmp_path / "nope", "Pong")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DatasetError, match="no \\$store\\$_observation_ckpt"):
        md.read_dqn_replay(tmp_path / "empty", "Pong")
    d = _write_replay(tmp_path / "a")
    (d / "$store$_reward_ckpt.1.gz").unlink()
    missing = r"missing replay file\(s\) \$store\$_reward_ckpt.1"
    with pytest.raises(common.DatasetError, match=missing):
        md.read_dqn_replay(d, "Pong")
    d = _write_replay(tmp_path / "b")
    with gzip.open(d / "$store$_action_ckpt.0.gz", "wb") as f:
        np.save(f, np.zeros(4, np.int32))
    with pytest.raises(common.DatasetError, match="mismatched lengths"):
        md.read_dqn_replay(d, "Pong")
    d = _write_replay(tmp_path / "c", obs_shape=(84, 80))
    with pytest.raises(common.DatasetError, match=r"\(N, 84, 84\)"):
        md.read_dqn_replay(d, "Pong")
    d = _write_replay(tmp_path / "d")
    with pytest.raises(common.DatasetError, match="minimal set of 4"):
        md.read_dqn_replay(d, "Breakout")  # Pong's action 4, 5 are outside Breakout's 4
    with pytest.raises(common.DatasetError, match="unknown Atari game 'Pongg'.*Pong.*ATARI_SCORES"):
        common.load_dataset("atari/Pongg", "dqn-replay", path=d, verbose=False)
    with pytest.raises(common.DatasetError, match="DQN-Replay directory"):
        common.load_dataset("atari/Pong", "dqn-replay", verbose=False)


# ------------------------------------------------------------------------------ validation
def _valid(n=6):
    ends = np.zeros(n, bool)
    ends[-1] = True
    return dict(observations=np.zeros((n, 10, 10, 4), np.uint8), actions=np.zeros(n, np.int64),
                rewards=np.ones(n, np.float32), terminals=ends, timeouts=np.zeros(n, bool),
                source_step=np.arange(n, dtype=np.int64), ref_random=np.array(0.5),
                ref_expert=np.array(3.0))


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("source_step"), "missing key"),
    (lambda d: d.update(observations=d["observations"].astype(np.float32)), "not uint8"),
    (lambda d: d.update(observations=np.zeros((6, 10, 10, 7), np.uint8)), r"\(6, 10, 10, 4\)"),
    (lambda d: d.update(actions=np.full(6, 6, np.int64)), "outside 0..5"),
    (lambda d: d.update(actions=np.zeros(6, np.int32)), "actions are int32"),
    (lambda d: d["rewards"].__setitem__(2, np.nan), "NaN or inf"),
    (lambda d: d["terminals"].__setitem__(-1, False), "last row ends no episode"),
    (lambda d: d.update(source_step=np.array([0, 1, 2, 2, 3, 4])), "not increasing"),
    (lambda d: d.update(ref_expert=np.array(np.inf)), "not finite"),
])
def test_validation_names_the_problem(change, match):
    d = _valid()
    change(d)
    with pytest.raises(common.DatasetError, match=match):
        md.validate_game_data(d, "minatar/breakout")


def test_unknown_games_and_datasets_are_named_errors():
    with pytest.raises(common.DatasetError, match=", ".join(GAMES)):
        common.load_dataset("minatar/pacman", "dqn", verbose=False)
    with pytest.raises(common.DatasetError, match="'dqn'"):
        common.load_dataset("minatar/breakout", "medium", verbose=False)
    with pytest.raises(common.DatasetError, match="size"):
        common.load_dataset("minatar/breakout", "dqn", budget=10, verbose=False)


# ------------------------------------------------------------------------ cache round trip
def test_load_dataset_generates_then_hits_the_cache(quick, monkeypatch):
    data = common.load_dataset("minatar/asterix", "dqn", size=600, seed=3, verbose=False)
    assert common.dataset_path("minatar/asterix", "dqn", 600, 3).exists()
    _check_contract(data, "asterix", 600)
    monkeypatch.setattr(md, "run_dqn", lambda *a, **k: pytest.fail("the cache was missed"))
    again = common.load_dataset("minatar/asterix", "dqn", size=600, seed=3, verbose=False)
    assert sorted(again) == sorted(data)
    for k in data:
        np.testing.assert_array_equal(again[k], data[k], err_msg=k)


def test_cli_writes_the_atari_cache(tmp_path, capsys):
    d = _write_replay(tmp_path / "r")
    md.main(["--env", "atari/Pong", "--dataset-path", str(d), "--size", "8"])
    data = common.load_dataset("atari/Pong", "dqn-replay", size=8, verbose=False)
    assert len(data["actions"]) == 8
    assert "Pong" in capsys.readouterr().out
