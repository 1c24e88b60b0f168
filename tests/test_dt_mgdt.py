"""dt.py's Multi-Game DT (Lee et al. 2022) against the paper, the official colab and hand numbers:
token layout, the patch-aware causal mask, which token predicts what, the loss, return / reward
classes, expert inference and action sampling, game mixing, the MinAtar / Atari evaluation envs,
and multi-game + fine-tune runs on tiny contract-format datasets (CPU, offline, tiny sizes)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import dt
import make_datasets

GAMES = ("minatar/breakout", "minatar/asterix")
TINY = ["--embed-dim", "16", "--n-layer", "1", "--n-head", "2", "--batch-size", "8",
        "--eval-episodes", "2", "--eval-max-steps", "10", "--no-cuda", "--warmup-steps", "1"]


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    """One torch thread, runs/ under tmp_path, datasets in a fresh SEQRL_DATA_DIR."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEQRL_DATA_DIR", str(tmp_path / "data"))
    yield
    torch.set_num_threads(n)


def minatar_data(game, rows=240, seed=0, episode_cap=60):
    """Uniform-random MinAtar play in the data contract's format (episodes cut at episode_cap)."""
    import minatar
    env = minatar.Environment(game.split("/")[1], sticky_action_prob=0.1, difficulty_ramping=True)
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    ep, t = 0, 0
    env.seed(seed)
    env.reset()
    while len(cols["actions"]) < rows:
        cols["observations"].append(env.state().astype(np.uint8))
        a = int(rng.integers(6))
        r, done = env.act(a)
        t += 1
        last = len(cols["actions"]) == rows - 1
        for k, v in (("actions", a), ("rewards", r), ("terminals", done),
                     ("timeouts", not done and (t >= episode_cap or last))):
            cols[k].append(v)
        if done or t >= episode_cap:
            ep, t = ep + 1, 0
            env.seed(seed + ep)
            env.reset()
    out = {k: np.array(v) for k, v in cols.items()}
    out["actions"], out["rewards"] = out["actions"].astype(np.int64), out["rewards"].astype("f4")
    return dict(out, ref_random=np.array(0.25), ref_expert=np.array(4.25),
                source_step=np.arange(rows, dtype=np.int64))


def write_games(games=GAMES, rows=240):
    for i, g in enumerate(games):
        common.save_npz(common.dataset_path(g, "dqn", None, 0, None), minatar_data(g, rows, i))


def tiny_args(**kw):
    base = dict(env="minatar/breakout", embed_dim=16, n_layer=2, n_head=2, dropout=0.0,
                cuda=False)
    return dt.check_args(dt.Args(**{**base, **kw}))


def noisy_model(args, seed=0):
    torch.manual_seed(seed)
    model = dt.MultiGameDT("minatar", args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def random_batch(B=2, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = (torch.rand(B, K, 10, 10, 10, generator=g) < 0.3).to(torch.uint8)
    return (obs, *(torch.randint(0, n, (B, K), generator=g) for n in (121, 6, 4)))


# ---- constants, classes
def test_constants_paper_and_official():
    """Sec. 3.2: returns in [-20, 100], one class per integer (121 with both ends); the official
    4 reward classes, 128 return draws at temperature 0.75, actions from the top 50th percentile;
    Atari 84x84x1 in 14x14 patches (36 tokens), a window of 4 steps, 18 actions; kappa 10."""
    assert (dt.RETURN_MIN, dt.RETURN_MAX, dt.N_RETURNS, dt.N_REWARDS) == (-20, 100, 121, 4)
    assert (dt.RETURN_SAMPLES, dt.RETURN_TEMPERATURE, dt.ACTION_TOP_PERCENTILE) == (128, 0.75, 50)
    assert dt.GAME_SPEC["atari"][:6] == (84, 84, 1, 14, 18, 255.0)
    assert dt.GAME_SPEC["minatar"][:6] == (10, 10, 10, 5, 6, 1.0)
    assert dt.GAME_SPEC["minatar"][6] == 2500
    a = tiny_args(env="atari/Pong")
    assert a.context_len == 4 and a.dataset == "dqn" and dt.Args().expert_kappa == 10
    atari = dt.MultiGameDT("atari", a)
    assert atari.P == 36 and atari.pos.shape == (4 * 39, 16) and atari.mask.shape == (156, 156)
    assert atari.predict_action.out_features == 18 and atari.predict_return.out_features == 121


def test_return_and_reward_classes_at_the_edges():
    """clip(int(R), -20, 100) + 20, int() truncating towards zero; rewards 0 / 1 / 3 by sign."""
    R = torch.tensor([-21.0, -20.0, -19.5, -0.5, 0.7, 2.7, 99.9, 100.0, 101.0, 1e6])
    assert dt.encode_return(R).tolist() == [0, 0, 1, 20, 20, 22, 119, 120, 120, 120]
    r = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 5.0])
    assert dt.encode_reward(r).tolist() == [3, 3, 0, 1, 1, 1]


def test_dataset_tokens_hand_numbers():
    """Return-to-go with gamma 1 of raw rewards per episode, as classes; reward classes; actions
    as stored; channels zero-padded to 10; the references per game."""
    d = minatar_data("minatar/breakout", rows=6)
    d["rewards"] = np.array([1, 0, 2, -1, 0, 1], "f4")
    d["terminals"] = np.array([0, 0, 1, 0, 0, 0], bool)
    d["timeouts"] = np.array([0, 0, 0, 0, 0, 1], bool)
    data = dt.GameData({"minatar/breakout": d}, tiny_args(), torch.device("cpu"))
    assert data.returns.tolist() == [23, 22, 22, 20, 21, 21]  # R = 3 2 2 0 1 1, + 20
    assert data.rewards.tolist() == [1, 0, 1, 3, 0, 1]
    assert data.actions.tolist() == d["actions"].tolist() and data.lengths.tolist() == [3, 3]
    assert data.obs.shape == (6, 10, 10, 10) and data.obs.dtype == torch.uint8
    assert torch.equal(data.obs[..., :4], torch.as_tensor(d["observations"]))
    assert data.obs[..., 4:].sum() == 0
    assert data.stats() == dict(family="minatar", games=["minatar/breakout"],
                                refs=[[0.25, 4.25]])


def test_games_mixed_uniformly_episodes_by_length():
    """A window's game uniform (1/2, 1/2) although one game holds 4x the rows; within a game
    episodes in proportion to length; data_fraction keeps whole episodes, ~ the fraction of rows."""
    a, b = minatar_data("minatar/breakout", 400), minatar_data("minatar/asterix", 100, seed=1)
    a["actions"][:], b["actions"][:] = 0, 5
    data = dt.GameData({"minatar/breakout": a, "minatar/asterix": b}, tiny_args(),
                       torch.device("cpu"))
    obs, R, act, rew, mask = data.sample(20_000, 4, torch.Generator().manual_seed(0))
    assert obs.shape == (20_000, 4, 10, 10, 10) and mask[:, 0].all()
    assert abs((act[:, 0] == 5).float().mean().item() - 0.5) < 0.015
    lengths = data.lengths.double()
    in_b = torch.arange(len(lengths)) >= len(common.split_episodes(
        {k: v for k, v in a.items() if np.ndim(v)}))
    expect = torch.where(in_b, lengths / lengths[in_b].sum(), lengths / lengths[~in_b].sum()) / 2
    torch.testing.assert_close(data.probs.double(), expect, atol=1e-6, rtol=0)
    half = dt.GameData({"minatar/breakout": a}, tiny_args(data_fraction=0.5), torch.device("cpu"))
    assert 200 <= len(half.rewards) <= 260 and len(half.lengths) < len(data.lengths)
    ends = torch.cumsum(half.lengths, 0)
    assert ends[-1] == len(half.rewards)


# ---- model
def test_token_layout_per_step():
    """Per step [P patches of o_t, R_t, a_t, r_t]: patch k = the conv of the k-th 5x5 block
    (row-major) + patch_pos[k]; then the return, action and reward embeddings; + pos[i]."""
    args = tiny_args()
    model = noisy_model(args)
    obs, R, a, r = random_batch()
    x = model.tokens(obs, R, a, r)                                     # (B, K * 7, d)
    assert x.shape == (2, 28, 16)
    w, bias = model.patch.weight, model.patch.bias                    # (d, C, 5, 5)
    for b, t in ((0, 0), (1, 3)):
        base = 7 * t
        for k in range(4):
            i, j = divmod(k, 2)
            block = obs[b, t, 5 * i:5 * i + 5, 5 * j:5 * j + 5].float()  # (5, 5, C)
            ref = torch.einsum("dcij,ijc->d", w, block) + bias + model.patch_pos[k]
            torch.testing.assert_close(x[b, base + k], ref + model.pos[base + k])
        torch.testing.assert_close(x[b, base + 4], model.embed_return.weight[R[b, t]]
                                   + model.pos[base + 4])
        torch.testing.assert_close(x[b, base + 5], model.embed_action.weight[a[b, t]]
                                   + model.pos[base + 5])
        torch.testing.assert_close(x[b, base + 6], model.embed_reward.weight[r[b, t]]
                                   + model.pos[base + 6])
    atari = dt.MultiGameDT("atari", tiny_args(env="atari/Pong"))
    frame = torch.full((1, 1, 84, 84, 1), 255, dtype=torch.uint8)
    tok = atari.tokens(frame, *(torch.zeros(1, 1, dtype=torch.long),) * 3)
    assert tok.shape == (1, 39, 16)  # Atari: 36 patches + 3, pixels / 255
    ref = atari.patch.weight.sum((1, 2, 3)) + atari.patch.bias + atari.patch_pos[0] + atari.pos[0]
    torch.testing.assert_close(tok[0, 0], ref)


def test_attention_mask_by_hand():
    """K = 2 steps, P = 2 patches (5 tokens a step): causal, plus each frame's patches see each
    other; nothing sees a later step."""
    m = dt.game_mask(2, 2).int()
    ref = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(m, ref)


def _hidden(model, batch):
    seen = {}
    h = model.ln_f.register_forward_hook(lambda mod, i, o: seen.setdefault("x", o))
    out = model(*batch)
    h.remove()
    return seen["x"], out


def test_heads_read_the_right_tokens():
    """R_t logits = predict_return(o_t's last patch), a_t = predict_action(R_t's token), r_t =
    predict_reward(a_t's token) (official colab; next-token prediction)."""
    model = noisy_model(tiny_args())
    x, (R, a, r) = _hidden(model, random_batch())
    x = x.unflatten(1, (4, 7))
    torch.testing.assert_close(R, model.predict_return(x[:, :, 3]))
    torch.testing.assert_close(a, model.predict_action(x[:, :, 4]))
    torch.testing.assert_close(r, model.predict_reward(x[:, :, 5]))


def test_causality_and_frame_patches_see_each_other():
    """Nothing before step j changes when step j's tokens do; P(R_j) sees o_j but not R_j, a_j,
    r_j; a_j sees R_j but not a_j, r_j; r_j sees a_j but not r_j; patch 0 sees patch 3 of its own
    frame (not so under a plain causal mask)."""
    model = noisy_model(tiny_args())
    batch = random_batch()
    x, out = _hidden(model, batch)
    j = 2

    def changed(k, steps):  # k: 0 frames, 1 return, 2 action, 3 reward classes
        b = [z.clone() for z in batch]
        b[k][:, steps] = 1 - b[k][:, steps] if k == 0 else (b[k][:, steps] + 1) % (121, 6, 4)[k - 1]
        return _hidden(model, b)

    for k in range(4):  # later steps change nothing earlier
        x2, out2 = changed(k, slice(j, None))
        torch.testing.assert_close(x2[:, :7 * j], x[:, :7 * j])
    for k in range(4):  # token k of step j: heads R (0), a (1), r (2) >= k see it
        _, out2 = changed(k, j)
        for head in range(3):
            diff = (out2[head][:, j] - out[head][:, j]).abs().max()
            assert (diff > 1e-4) == (head >= k), (k, head, diff)
    b = [z.clone() for z in batch]
    b[0][:, j, 5:, 5:] = 1 - b[0][:, j, 5:, 5:]  # the last patch (bottom right) of frame j
    x2, _ = _hidden(model, b)
    assert (x2[:, 7 * j] - x[:, 7 * j]).abs().max() > 1e-4  # seen by the frame's first patch
    torch.testing.assert_close(x2[:, :7 * j], x[:, :7 * j])


def test_loss_hand_numbers_and_padding():
    """Mean of the three cross-entropies over the real steps (numpy reference); pads and patch
    tokens carry no loss: changing a pad's frame or classes changes nothing."""
    lg = [torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.0, 3.0], [9.0, 0.0, 0.0]]]),
          torch.tensor([[[0.0, 1.0], [2.0, -1.0], [0.0, 5.0]]]),
          torch.tensor([[[0.3, 0.0], [0.0, 0.0], [1.0, 0.0]]])]
    ys = [torch.tensor([[2, 0, 1]]), torch.tensor([[1, 1, 0]]), torch.tensor([[0, 1, 1]])]
    mask = torch.tensor([[True, True, False]])

    def ce(z, y):
        z = z[0, :2].numpy()
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -(lp[0, y[0, 0]] + lp[1, y[0, 1]]) / 2
    out = dt.game_loss(lg, (None, *ys, mask))
    hand = [ce(z, y) for z, y in zip(lg, ys)]
    for name, v in zip(("return", "action", "reward"), hand):
        assert out[f"{name}_loss"].item() == pytest.approx(v, abs=1e-6)
    assert out["total_loss"].item() == pytest.approx(sum(hand) / 3, abs=1e-6)
    model = noisy_model(tiny_args())
    obs, R, a, r = random_batch()
    mask = torch.tensor([[True, True, True, False]] * 2)
    base = dt.game_loss(model(obs, R, a, r), (obs, R, a, r, mask))["total_loss"]
    obs2, R2, a2, r2 = (z.clone() for z in (obs, R, a, r))
    obs2[:, 3], R2[:, 3], a2[:, 3], r2[:, 3] = 1 - obs2[:, 3], 7, 1, 2
    moved = dt.game_loss(model(obs2, R2, a2, r2), (obs2, R2, a2, r2, mask))["total_loss"]
    assert moved.item() == pytest.approx(base.item(), abs=1e-6)


# ---- inference
def test_expert_return_sampling_formula():
    """Official: q ~ softmax((logits + kappa linspace(0, 1, N)) / 0.75), the max of 128 draws:
    P(max <= k) = F(k)^128 with F the cdf of q (hand computation for 4 classes, 30k rows).
    kappa 0: one plain draw from softmax(logits)."""
    q = np.array([0.5, 0.49, 0.0078, 0.0022])
    logits = 0.75 * np.log(q) - 10 * np.linspace(0, 1, 4)  # so that the tilted q is as above
    L = torch.tensor(logits, dtype=torch.float32).expand(30_000, 4) + 1.5
    draws = dt.sample_expert_return(L, 10.0, torch.Generator().manual_seed(0))
    cdf = np.cumsum(q) ** 128
    expect = np.diff(np.r_[0.0, cdf])
    freq = torch.bincount(draws, minlength=4).numpy() / 30_000
    assert np.allclose(freq, expect, atol=0.012), (freq, expect)
    p = np.exp(logits) / np.exp(logits).sum()
    plain = dt.sample_expert_return(L, 0.0, torch.Generator().manual_seed(0))
    assert np.allclose(torch.bincount(plain, minlength=4).numpy() / 30_000, p, atol=0.01)


def test_action_sampling_top_half():
    """Official: temperature 1 over the logits above their 50th percentile: for logits 0..5 the
    median is 2.5, so actions 3, 4, 5 with probabilities exp(3, 4, 5) / sum."""
    L = torch.tensor([[2.0, 0.0, 5.0, 1.0, 3.0, 4.0]]).expand(30_000, 6)
    acts = dt.sample_action(L, torch.Generator().manual_seed(0))
    freq = torch.bincount(acts, minlength=6).numpy() / 30_000
    e = np.exp([5.0, 3.0, 4.0])
    expect = np.zeros(6)
    expect[[2, 4, 5]] = e / e.sum()
    assert np.allclose(freq, expect, atol=0.01), freq
    flat = dt.sample_action(torch.zeros(1000, 6), torch.Generator().manual_seed(0))
    assert flat.min() >= 0 and flat.max() <= 5  # ties: never an empty set


def test_action_space_union():
    """One action set per family, every game's actions index it, no per-game masking: each
    MinAtar game accepts all 6 actions; ALE with the full action space takes all 18."""
    import minatar
    for g in make_datasets.MINATAR_CHANNELS:
        assert minatar.Environment(g).num_actions() == 6
    assert dt.MultiGameDT("minatar", tiny_args()).predict_action.out_features == 6
    env = make_datasets.GameEnv("atari/Pong")
    assert env.env.action_space.n == 18


class Scripted(dt.GamePolicy):
    """The GamePolicy interface without a model: action (t + row) % 6, a record of calls."""

    def __init__(self, stats):
        self.stats = stats

    def reset(self, n):
        self.t, self.n, self.dones = 0, n, []

    def __call__(self, obs):  # frames of the family's 10 channels (the vector env's float32)
        assert obs.shape == (self.n, 10, 10, 10) and np.array_equal(obs, obs.astype(np.uint8))
        return (self.t + np.arange(self.n)) % 6

    def observe(self, rewards, dones):
        self.dones.append(np.array(dones))
        self.t += 1


def test_game_eval_loop_real_minatar_steps():
    """Two games x 2 episodes in one loop == each episode played alone in minatar (seed + i,
    sticky actions 0.1, difficulty ramping), with the cap; dt.evaluate's per-game means and
    normalized (R - random) / (expert - random)."""
    import minatar
    games, refs = ["minatar/breakout", "minatar/space_invaders"], [[0.0, 2.0], [1.0, 5.0]]
    pol = Scripted(dict(family="minatar", games=games, refs=refs))
    args = tiny_args(env="+".join(games), eval_episodes=2, eval_max_steps=120, seed=7)
    out = dt.evaluate(pol, args)
    assert len(pol.dones) <= 120
    res = common.evaluate(pol, "+".join(games), 2, seed=7 + 10_000, max_steps=120)
    for k, g in enumerate(games):
        for i in range(2):
            env = minatar.Environment(g.split("/")[1], sticky_action_prob=0.1,
                                      difficulty_ramping=True)
            env.seed(7 + 10_000 + i)
            env.reset()
            ret, n = 0.0, 0
            for t in range(120):
                r, done = env.act((t + 2 * k + i) % 6)
                ret, n = ret + r, n + 1
                if done:
                    break
            assert (res["returns"][2 * k + i], res["lengths"][2 * k + i]) == (ret, n), (g, i)
        R = res["returns"][2 * k:2 * k + 2]
        name = g.split("/")[1]
        lo, hi = refs[k]
        assert out[f"eval/{name}/return_mean"] == pytest.approx(R.mean())
        assert out[f"eval/{name}/normalized_score"] == pytest.approx(((R - lo) / (hi - lo)).mean())


def test_atari_env_preprocessing():
    """84x84x1 uint8 grayscale; frame skip 4 with the max of the last two frames; no-op starts
    (1..30, seeded); no sticky actions: the same seed and actions give the same frames."""
    import ale_py
    import gymnasium as gym
    env = make_datasets.GameEnv("atari/Breakout")
    frames = [env.reset(seed=3)[0]]
    rewards = []
    for a in (1, 3, 4, 0):
        f, r, done, truncated, _ = env.step(a)
        frames.append(f)
        rewards.append(r)
    assert all(f.shape == (84, 84, 1) and f.dtype == np.uint8 for f in frames)
    gym.register_envs(ale_py)
    raw = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0,
                   full_action_space=True, obs_type="grayscale")
    x, _ = raw.reset(seed=3)
    for _ in range(np.random.default_rng(3).integers(1, 31)):
        x, *_ = raw.step(0)

    def resize(x):
        t = torch.as_tensor(x, dtype=torch.float32)[None, None]
        return F.adaptive_avg_pool2d(t, (84, 84))[0, 0].round().numpy().astype(np.uint8)
    np.testing.assert_array_equal(frames[0][..., 0], resize(x))
    for a, f in zip((1, 3, 4, 0), frames[1:]):
        xs = [raw.step(a)[0] for _ in range(4)]
        np.testing.assert_array_equal(f[..., 0], resize(np.maximum(xs[-2], xs[-1])))
    again = make_datasets.GameEnv("atari/Breakout")
    np.testing.assert_array_equal(again.reset(seed=3)[0], frames[0])


def test_policy_windows_and_targets():
    """GamePolicy: the window holds the last K frames and (R, a, r) classes; with a target the
    return token is encode(target - rewards so far); the action is one of the top half of the
    model's action logits on that window; finished episodes are not forwarded."""
    args = tiny_args(context_len=3)
    model = noisy_model(args)
    stats = dict(family="minatar", games=["minatar/breakout"], refs=[[0, 1]])
    pol = dt.GamePolicy(model, args, stats)
    pol.targets = np.array([30.0, 5.0])
    pol.reset(2)
    rng = np.random.default_rng(0)
    rew = np.array([[1, 0], [0, 2], [1, 1], [0, -1], [1, 0]], np.float32)
    for t in range(5):
        obs = (rng.random((2, 10, 10, 10)) < 0.3).astype(np.uint8)
        act = pol(obs)
        window = (pol.obs, *pol.tok.unbind(-1))
        p = min(t, 2)
        logits = model(*(w[:, :p + 1] for w in window))[1][:, p]
        live = [0, 1] if t <= 3 else [0]  # episode 1 ends at step 3
        top = logits >= torch.quantile(logits, 0.5, dim=-1, keepdim=True)
        assert top[live, torch.as_tensor(act)[live]].all()
        assert torch.equal(pol.obs[:, p], torch.as_tensor(obs))
        left = np.array([30.0, 5.0]) - rew[:t].sum(0)
        assert pol.tok[live, p, 0].tolist() == [int(np.trunc(left[i])) + 20 for i in live]
        pol.observe(rew[t], np.array([False, t >= 3]))
    assert pol.tok[0, :, 2].tolist() == [3 if v < 0 else int(v > 0) for v in rew[2:, 0]]
    assert pol.live.tolist() == [True, False]


# ---- the script
def test_multi_game_and_fine_tune_smoke(tmp_path):
    """Two games in one run: per-game and mean evaluation, a plain checkpoint; fine-tuning it
    on a third game with half its data starts from its weights (lr 0 keeps them exactly)."""
    write_games(GAMES + ("minatar/space_invaders",))
    out = dt.main(TINY + ["--env", "+".join(GAMES), "--total-steps", "4", "--eval-every", "4"])
    assert {"eval/breakout/normalized_score", "eval/asterix/return_mean"} <= set(out)
    mean = np.mean([out["eval/breakout/normalized_score"], out["eval/asterix/normalized_score"]])
    assert out["eval/normalized_score"] == pytest.approx(mean)
    run = Path(out["run_dir"])
    lines = (run / "metrics.jsonl").read_text()
    assert all(f"losses/{k}_loss" in lines for k in ("return", "action", "reward", "total"))
    ck = common.load_checkpoint(run / "checkpoint.pt", "dt")
    assert ck["games"] == list(GAMES) and ck["family"] == "minatar"
    assert ck["refs"] == [[0.25, 4.25]] * 2 and ck["args"]["context_len"] == 4
    tuned = dt.main(TINY + ["--env", "minatar/space_invaders", "--checkpoint",
                            str(run / "checkpoint.pt"), "--data-fraction", "0.5",
                            "--total-steps", "2", "--lr", "0", "--embed-dim", "32"])
    ck2 = common.load_checkpoint(Path(tuned["run_dir"]) / "checkpoint.pt", "dt")
    assert ck2["games"] == ["minatar/space_invaders"] and ck2["args"]["embed_dim"] == 16
    for k, v in ck["model"].items():
        assert torch.equal(ck2["model"][k], v), k
    ev = dt.main(["--eval-only", "--checkpoint", str(run / "checkpoint.pt"), "--eval-episodes",
                  "2", "--eval-max-steps", "10", "--no-cuda", "--target-returns", "3"])
    assert "eval/breakout/return_mean" in ev


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown MinAtar game"):
        dt.main(TINY + ["--env", "minatar/pong"])
    with pytest.raises(ValueError, match="one family"):
        dt.main(TINY + ["--env", "minatar/breakout+atari/Pong"])
    bad = minatar_data("minatar/breakout", 20)
    bad["observations"] = np.zeros((20, 8, 8, 4), np.uint8)
    with pytest.raises(common.DatasetError, match="observations of shape"):
        dt.GameData({"minatar/breakout": bad}, tiny_args(), torch.device("cpu"))


def test_return_head_starts_at_the_log_prior(tmp_path):
    """Named deviation: a fresh MGDT's return-head bias is the log frequency of the training
    return classes, unseen classes at log(1e-9) (lr 0 keeps the initial weights)."""
    write_games()
    out = dt.main(TINY + ["--env", "+".join(GAMES), "--total-steps", "1", "--eval-every", "1",
                          "--lr", "0"])
    bias = common.load_checkpoint(Path(out["run_dir"]) / "checkpoint.pt", "dt")["model"][
        "predict_return.bias"]
    data = dt.GameData({g: common.load_dataset(g, "dqn") for g in GAMES}, tiny_args(), "cpu")
    freq = torch.bincount(data.returns, minlength=121).double() / len(data.returns)
    assert 0 < (freq > 0).sum() < 121
    torch.testing.assert_close(bias.double(), freq.clamp(min=1e-9).log(), atol=1e-5, rtol=0)
    assert bias[120].item() == pytest.approx(-20.7233, abs=1e-3)  # log(1e-9): R >= 100 unseen
