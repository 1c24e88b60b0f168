"""Tests of ad.py: Dark Room dynamics, source histories, windows, causality, the KV cache, runs."""
import numpy as np
import pytest
import torch

import ad
import common

torch.set_num_threads(1)


def _rollout(env, actions):
    env.reset()
    out = []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((tuple(int(v) for v in obs), r, term, trunc))
    return out


def test_darkroom_corners_noop_goal_reward_and_horizon():
    env = ad.DarkRoom(goal=(0, 4), size=9, max_steps=20)
    obs, _ = env.reset(seed=0)
    assert tuple(obs) == (4, 4)                        # reset to the centre
    steps = _rollout(env, [4] + [0] * 6 + [3] * 2 + [4] * 11)
    assert steps[0][:2] == ((4, 4), 0.0)               # no-op stays put
    assert [s[0] for s in steps[1:5]] == [(3, 4), (2, 4), (1, 4), (0, 4)]
    assert steps[4][1] == 1.0 and steps[5][1] == 1.0 and steps[6][0] == (0, 4)  # left wall: stays, reward again
    assert steps[7][0] == (0, 3) and steps[7][1] == 0.0 and steps[8][0] == (0, 2)
    assert [s[3] for s in steps] == [False] * 19 + [True]  # horizon: truncated exactly at step 20
    assert not any(s[2] for s in steps)
    corner = _rollout(env, [1] * 6 + [2] * 6)          # right / up into the (8, 8) corner
    assert corner[5][0] == (8, 4) and corner[-1][0] == (8, 8)
    low = _rollout(env, [3] * 6)                       # down into the bottom wall
    assert low[-1][0] == (4, 0)


def test_hard_and_key_to_door_rewards():
    hard = ad.DarkRoomHard(goal=(9, 8))
    steps = _rollout(hard, [1, 4, 4, 0, 1])           # reach the goal, stay, leave, come back
    assert [s[1] for s in steps] == [1.0, 0.0, 0.0, 0.0, 0.0]
    k2d = ad.DarkKeyToDoor(key=(5, 4), door=(3, 4))
    steps = _rollout(k2d, [0, 1, 1, 0, 0, 0, 0, 1, 0] + [4] * 41)  # door before key: nothing
    assert [s[1] for s in steps[:9]] == [0, 0, 1, 0, 1, 0, 0, 0, 0] and steps[0][0] == (3, 4)
    assert sum(s[1] for s in steps) == 2.0 and steps[-1][3] and len(steps) == 50


def test_batch_env_matches_gym_env_and_optimal_returns():
    rng = np.random.default_rng(0)
    goals = ad.all_tasks("darkroom", 9)
    batch = ad.BatchDarkRoom("darkroom", goals)
    acts = rng.integers(0, 5, (20, len(goals)))
    batch.reset()
    ret_b = sum(batch.step(a)[1] for a in acts)
    for i in rng.choice(len(goals), 5, replace=False):
        steps = _rollout(ad.DarkRoom(goal=tuple(goals[i])), acts[:, i])
        assert sum(s[1] for s in steps) == ret_b[i]
    # scripted optimal policy: straight to the goal, then no-op; matches optimal_returns everywhere
    batch.reset()
    ret = np.zeros(len(goals))
    for _ in range(20):
        dx, dy = np.sign(goals - batch.pos).T
        a = np.where(dx < 0, 0, np.where(dx > 0, 1, np.where(dy > 0, 2, np.where(dy < 0, 3, 4))))
        ret += batch.step(a)[1]
    np.testing.assert_allclose(ret, batch.optimal_returns())
    assert abs(ret.mean() - 16.5) < 0.1


def test_source_histories_improve():
    goals = ad.all_tasks("darkroom", 9)[::7]
    h = ad.q_learning(ad.BatchDarkRoom("darkroom", np.repeat(goals, 2, 0)), 150, np.random.default_rng(0),
                      eps_decay=0.3)
    ret = h["rewards"].sum(-1)                       # (N, E)
    assert ret[:, :10].mean() < 2.0 and ret[:, -20:].mean() > 12.0
    assert h["observations"].shape == (len(goals) * 2, 150, 20, 2)
    assert (h["observations"][:, :, 0] == 4).all()  # every episode starts at the centre


def test_windows_cross_episode_boundaries():
    goals = ad.all_tasks("darkroom", 9)[:3]
    h = ad.q_learning(ad.BatchDarkRoom("darkroom", goals), 12, np.random.default_rng(0))
    s = ad.WindowSampler(h, ctx=3, device=torch.device("cpu"))
    obs, pa, pr, act, mask = s.sample(64, np.random.default_rng(1))
    assert obs.shape == (64, 60, 2) and act.shape == (64, 60)
    assert mask[:, 20:].all() and mask.shape == (64, 60)
    assert (~mask[:, :20]).any() and mask[:, :20].any()  # first episode trained only at history starts
    assert ((pa[:, 0] == ad.N_ACTIONS) == mask[:, 0]).all()  # history start <=> 'none' previous action
    assert (obs[:, ::20] == 4).all()                  # windows start at episode starts
    assert (act[:, 19] == pa[:, 20]).all()            # the previous action crosses the boundary
    assert (pa[:, 1:] == act[:, :-1]).all()
    flat_obs = torch.as_tensor(h["observations"]).reshape(3, -1, 2)
    flat_r = torch.as_tensor(h["rewards"]).reshape(3, -1)
    hit = [(obs[b] == flat_obs[i, j:j + 60]).all() and (pr[b, 1:] == flat_r[i, j:j + 59]).all()
           for b in range(8) for i in range(3) for j in range(0, 12 * 20 - 59, 20)]
    assert sum(hit) >= 8                              # each window is a real slice of one history


def _model(seed=0, ctx=2):
    torch.manual_seed(seed)
    m = ad.ADTransformer(size=9, seq_len=ctx * 20, d=32, n_layers=2, n_heads=2, dropout=0.0, attn_dropout=0.0)
    with torch.no_grad():
        for p in m.parameters():                       # larger weights: non-trivial action distributions
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_causality():
    m = _model()
    obs = torch.randint(0, 9, (2, 40, 2))
    pa, pr = torch.randint(0, 6, (2, 40)), torch.randint(0, 2, (2, 40)).float()
    base = m(obs, pa, pr)
    obs2, pa2, pr2 = obs.clone(), pa.clone(), pr.clone()
    obs2[:, 25], pa2[:, 25], pr2[:, 25] = (obs[:, 25] + 3) % 9, (pa[:, 25] + 1) % 6, 1 - pr[:, 25]
    out = m(obs2, pa2, pr2)
    torch.testing.assert_close(out[:, :25], base[:, :25])
    assert (out[:, 25:] - base[:, 25:]).abs().amax() > 1e-4


def test_cache_prefill_and_steps_equal_full_forward():
    m = _model()
    obs = torch.randint(0, 9, (3, 40, 2))
    pa, pr = torch.randint(0, 6, (3, 40)), torch.randint(0, 2, (3, 40)).float()
    full = m(obs, pa, pr)
    cache = m.new_cache(3, torch.device("cpu"))
    pre = m(obs[:, :15], pa[:, :15], pr[:, :15], cache=cache, start=0)
    steps = [m(obs[:, i:i + 1], pa[:, i:i + 1], pr[:, i:i + 1], cache=cache, start=i) for i in range(15, 40)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argmax", [False, True])
def test_cached_and_uncached_in_context_rollouts_agree(argmax):
    m = _model(ctx=2)
    tasks = ad.all_tasks("darkroom", 9)[::10]
    # 5 episodes with a 2-episode window: the window slides (and the cache is rebuilt) 3 times
    r1, a1 = ad.in_context_returns(m, "darkroom", tasks, 5, 2, seed=3, argmax=argmax, use_cache=True, return_actions=True)
    r2, a2 = ad.in_context_returns(m, "darkroom", tasks, 5, 2, seed=3, argmax=argmax, use_cache=False, return_actions=True)
    assert a1.shape == (len(tasks), 100)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(r1, r2)
    if not argmax:
        assert len(np.unique(a1)) > 1
        _, a3 = ad.in_context_returns(m, "darkroom", tasks, 5, 2, seed=4, return_actions=True)
        assert (a3 != a1).any()                       # the seed matters for sampled actions


TINY = ["--n-train-tasks", "6", "--n-test-tasks", "2", "--histories-per-task", "1", "--source-episodes", "16",
        "--subsample", "2", "--context-episodes", "2", "--n-layers", "1", "--n-heads", "2", "--d-model", "16",
        "--batch-size", "4", "--eval-episodes", "3", "--eval-repeats", "1", "--expert-episodes", "3",
        "--eval-every", "0", "--no-cuda", "--warmup-steps", "2"]


def test_smoke_resume_and_eval_only(tmp_path, monkeypatch):
    straight = ad.main(TINY + ["--total-steps", "6", "--ed-steps", "4", "--run-dir", str(tmp_path / "a")])
    for f in ("in_context.csv", "in_context.md", "checkpoint.pt", "args.json", "metrics.jsonl"):
        assert (tmp_path / "a" / f).exists()
    assert len(straight["AD_curve"]) == 3 and straight["optimal"] > straight["random"]
    lines = (tmp_path / "a" / "in_context.csv").read_text().splitlines()
    assert lines[0].startswith("episode,AD,ED") and len(lines) == 4

    # interrupt (Ctrl-C) before AD step 4: a checkpoint is saved; resuming finishes identically
    orig, calls = ad.WindowSampler.sample, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(self, *a, **k)
    monkeypatch.setattr(ad.WindowSampler, "sample", flaky)
    part = ad.main(TINY + ["--total-steps", "6", "--ed-steps", "4", "--run-dir", str(tmp_path / "b")])
    assert part["interrupted"]
    monkeypatch.setattr(ad.WindowSampler, "sample", orig)
    resumed = ad.main(TINY + ["--total-steps", "6", "--ed-steps", "4", "--resume", part["checkpoint"]])
    a = common.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = common.load_checkpoint(resumed["checkpoint"])
    assert b["AD"]["step"] == 6 and b["ED"]["step"] == 4
    for k in ("AD", "ED"):
        for name, t in a[k]["model"].items():
            torch.testing.assert_close(b[k]["model"][name], t, rtol=0, atol=0)
    assert resumed["AD_curve"] == straight["AD_curve"]

    ev = ad.main(TINY + ["--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt"),
                         "--run-dir", str(tmp_path / "c")])
    assert ev["AD_curve"] == straight["AD_curve"] and ev["ED_curve"] == straight["ED_curve"]
    with pytest.raises(ValueError, match="--n-layers 1"):  # a checkpoint of another architecture
        ad.main(TINY + ["--n-layers", "2", "--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt"),
                              "--run-dir", str(tmp_path / "d")])


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown --env"):
        ad.main(["--env", "hopper", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="must not exceed"):
        ad.main(["--n-train-tasks", "80", "--n-test-tasks", "16", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--eval-only needs --checkpoint"):
        ad.main(["--eval-only", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--q-eps-decay"):
        ad.main(["--q-eps-decay", "-1", "--run-dir", str(tmp_path)])
