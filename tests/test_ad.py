"""Tests of ad.py: Dark Room rules and optimal returns (brute force), the task split, the source's
epsilon schedule, tokens / loss mask of the training windows against hand-built ones, the same
tokens at evaluation, causality across episodes, the key-value cache, history validation, and a
run with Ctrl-C + resume, --eval-only and a two-file load_policy script."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ad
import common

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _rollout(env, actions):
    env.reset(seed=0)
    out = []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((tuple(int(v) for v in obs), r, term, trunc))
    return out


def test_darkroom_rules_literal():
    env = ad.DarkRoom(task=(0, 4))
    obs, _ = env.reset(seed=0)
    assert tuple(obs) == (4, 4) and env.action_space.n == 5            # centre of 9x9, 5 actions
    steps = _rollout(env, [4] + [0] * 6 + [3] * 2 + [4] * 11)
    assert steps[0][:2] == ((4, 4), 0.0)                               # no-op stays put
    assert [s[0] for s in steps[1:5]] == [(3, 4), (2, 4), (1, 4), (0, 4)]
    assert [s[1] for s in steps[:9]] == [0, 0, 0, 0, 1, 1, 1, 0, 0]     # reward on every goal step
    assert steps[6][0] == (0, 4) and steps[7][0] == (0, 3)             # left wall, then down
    assert [s[3] for s in steps] == [False] * 19 + [True]              # 20 steps, truncated
    assert not any(s[2] for s in steps)
    corner = _rollout(env, [1] * 6 + [2] * 6)                          # right / up: (8, 8)
    assert corner[5][0] == (8, 4) and corner[-1][0] == (8, 8)
    assert _rollout(env, [3] * 6)[-1][0] == (4, 0)                     # down to the wall


def test_hard_and_key_to_door_rules_literal():
    hard = ad.DarkRoom(task=(9, 8), variant="darkroom-hard")
    assert tuple(hard.reset()[0]) == (8, 8)                            # centre of 17x17
    assert [s[1] for s in _rollout(hard, [1, 4, 4, 0, 1])] == [1, 0, 0, 0, 0]  # reward once
    assert len(_rollout(hard, [4] * 20)) == 20 and _rollout(hard, [4] * 20)[-1][3]
    k2d = ad.DarkRoom(task=(5, 4, 3, 4), variant="key-to-door")       # key (5, 4), door (3, 4)
    steps = _rollout(k2d, [0, 1, 1, 0, 0, 0, 0, 1, 0] + [4] * 41)     # door before key: nothing
    assert [s[1] for s in steps[:9]] == [0, 0, 1, 0, 1, 0, 0, 0, 0] and steps[0][0] == (3, 4)
    assert sum(s[1] for s in steps) == 2 and [s[3] for s in steps] == [False] * 49 + [True]


def _brute_force_optimal(variant, size, T, task):
    """Independent dynamic programming over (stage, x, y) and time: the best return."""
    X, Y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    V = np.zeros((3, size, size))
    for _ in range(T):
        new = np.full_like(V, -1.0)
        for s in range(3):
            for dx, dy in [(-1, 0), (1, 0), (0, 1), (0, -1), (0, 0)]:
                nx, ny = np.clip(X + dx, 0, size - 1), np.clip(Y + dy, 0, size - 1)
                on_a = (nx == task[0]) & (ny == task[1])
                if variant == "darkroom":
                    r, s2 = on_a * 1.0, np.full_like(nx, s)
                elif variant == "darkroom-hard":
                    r = on_a * float(s == 0)
                    s2 = s + r.astype(int)
                else:
                    r = on_a * float(s == 0) + (nx == task[2]) * (ny == task[3]) * float(s == 1)
                    s2 = s + r.astype(int)
                new[s] = np.maximum(new[s], r + V[s2, nx, ny])
        V = new
    return V[0, size // 2, size // 2]


def test_optimal_returns_by_brute_force():
    goals = ad.all_tasks("darkroom")
    assert len(goals) == 81
    brute = np.array([_brute_force_optimal("darkroom", 9, 20, g) for g in goals])
    assert brute.sum() == 1340 and abs(brute.mean() - 16.5) < 0.05    # the paper: 16.5
    np.testing.assert_array_equal(ad.BatchDarkRoom("darkroom", goals).optimal_returns(), brute)
    for variant, size, T, tasks in [("darkroom-hard", 17, 20, [(0, 0), (16, 16), (8, 8), (3, 12)]),
                                    ("key-to-door", 9, 50, [(4, 4, 0, 0), (0, 0, 8, 8),
                                                            (8, 0, 0, 8), (2, 5, 4, 4)])]:
        brute = [_brute_force_optimal(variant, size, T, t) for t in tasks]
        np.testing.assert_array_equal(ad.BatchDarkRoom(variant, tasks).optimal_returns(), brute)


def test_batch_env_matches_gym_env():
    rng = np.random.default_rng(0)
    for variant in ("darkroom", "darkroom-hard", "key-to-door"):
        tasks = ad.all_tasks(variant)[rng.choice(len(ad.all_tasks(variant)), 6, replace=False)]
        batch, T = ad.BatchDarkRoom(variant, tasks), ad.ENV_CONFIG[variant]["max_steps"]
        acts = rng.integers(0, 5, (T, 6))
        batch.reset()
        ret = sum(batch.step(a)[1] for a in acts)
        for i in range(6):
            assert sum(s[1] for s in _rollout(ad.DarkRoom(tasks[i], variant), acts[:, i])) == ret[i]


def test_task_split_65_16_disjoint():
    train, test = ad.task_split(ad.Args())
    assert train.shape == (65, 2) and test.shape == (16, 2)
    cells = {tuple(t) for t in train.tolist()} | {tuple(t) for t in test.tolist()}
    assert len(cells) == 81                       # disjoint, no duplicates, all 81 goals
    train1, _ = ad.task_split(ad.Args(seed=1))
    assert not np.array_equal(train, train1)      # seeded
    assert len(ad.all_tasks("key-to-door")) == 81 * 80


def test_epsilon_schedule_literal_and_wired(monkeypatch):
    eps = [ad.epsilon(e, 240, 0.2) for e in (0, 12, 24, 48, 100, 239)]
    np.testing.assert_allclose(eps, [1.0, 0.7625, 0.525, 0.05, 0.05, 0.05])
    calls, orig = [], ad.epsilon
    monkeypatch.setattr(ad, "epsilon", lambda *a: calls.append(a) or orig(*a))
    ad.q_learning(ad.BatchDarkRoom("darkroom", [(0, 0)]), 7, np.random.default_rng(0), 0.3)
    assert calls == [(e, 7, 0.3) for e in range(7)]


def test_source_histories_improve_from_uniform():
    goals = np.repeat(ad.all_tasks("darkroom"), 2, 0)
    h = ad.q_learning(ad.BatchDarkRoom("darkroom", goals), 150, np.random.default_rng(0), 0.3)
    assert h["observations"].shape == (162, 150, 20, 2)
    assert (h["observations"][:, :, 0] == 4).all()                    # every episode: the centre
    freq = np.bincount(h["actions"][:, 0].ravel(), minlength=5) / h["actions"][:, 0].size
    assert np.abs(freq - 0.2).max() < 0.03                            # epsilon 1: uniform
    ret = h["rewards"].sum(-1)
    assert ret[:, :10].mean() < 2.0 and ret[:, -20:].mean() > 13.0


def _tiny_history():
    """H=1, E=3 episodes of T=2 steps: obs (e, t), actions and rewards written out."""
    obs = np.array([[[[0, 0], [0, 1]], [[1, 0], [1, 1]], [[2, 0], [2, 1]]]])
    return dict(observations=obs, actions=np.array([[[0, 1], [2, 3], [4, 0]]]),
                rewards=np.array([[[0, 1], [1, 0], [0, 1]]], dtype=np.float32))


def test_window_tokens_and_loss_mask_hand_built():
    # window start -> obs x, prev_a, prev_r, actions, mask (the first episode only at e0 = 0)
    want = {0: ([0, 0, 1, 1], [5, 0, 1, 2], [0, 0, 1, 1], [0, 1, 2, 3], [1, 1, 1, 1]),
            1: ([1, 1, 2, 2], [1, 2, 3, 4], [1, 1, 0, 0], [2, 3, 4, 0], [0, 0, 1, 1])}
    sampler = ad.WindowSampler(_tiny_history(), 2, torch.device("cpu"))
    obs, pa, pr, act, mask = sampler.sample(64, torch.Generator().manual_seed(0))
    assert obs.shape == (64, 4, 2) and set(obs[:, 0, 0].tolist()) == {0, 1}
    for b in range(64):
        x, a, r, y, m = want[int(obs[b, 0, 0])]
        assert obs[b, :, 0].tolist() == x and obs[b, :, 1].tolist() == [0, 1, 0, 1]
        assert pa[b].tolist() == a and pr[b].tolist() == r and act[b].tolist() == y
        assert mask[b].tolist() == [bool(v) for v in m]
    ed = ad.WindowSampler(_tiny_history(), 2, torch.device("cpu"), last=2)  # ED: last 2 episodes
    assert (ed.sample(16, torch.Generator().manual_seed(0))[0][:, 0, 0] == 1).all()


def _model(seed=0, ctx=2, T=20, post_norm=True):
    torch.manual_seed(seed)
    m = ad.ADTransformer(9, ctx * T, d=32, n_layers=2, n_heads=2, ff_dim=64, dropout=0.0,
                         attn_dropout=0.0, post_norm=post_norm)
    with torch.no_grad():
        for p in m.parameters():  # larger weights: non-trivial action distributions
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_loss_is_masked_mean_cross_entropy():
    m = _model(T=2)
    batch = ad.WindowSampler(_tiny_history(), 2, "cpu").sample(8, torch.Generator().manual_seed(1))
    obs, pa, pr, act, mask = batch
    logits = m(obs, pa, pr).detach().numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, act.numpy()[..., None], -1)[..., 0]
    want = nll[mask.numpy()].mean()
    assert abs(ad.ad_loss(m, batch).item() - want) < 1e-5
    other = act.clone()
    other[~mask] = (other[~mask] + 1) % 5                              # outside the mask: no effect
    assert abs(ad.ad_loss(m, (obs, pa, pr, other, mask)).item() - want) < 1e-5


@pytest.mark.parametrize("post_norm", [True, False])
def test_causal_but_attends_across_episodes(post_norm):
    m = _model(post_norm=post_norm)
    obs, pa, pr = torch.randint(0, 9, (2, 40, 2)), torch.randint(0, 6, (2, 40)), torch.rand(2, 40)
    base = m(obs, pa, pr)
    for i in (25, 5):
        obs2, pa2, pr2 = obs.clone(), pa.clone(), pr.clone()
        obs2[:, i], pa2[:, i], pr2[:, i] = (obs[:, i] + 3) % 9, (pa[:, i] + 1) % 6, pr[:, i] + 1
        out = m(obs2, pa2, pr2)
        torch.testing.assert_close(out[:, :i], base[:, :i])             # no look-ahead
        j = max(i, 20)                                                  # episode 2 sees episode 1
        assert (out[:, j:] - base[:, j:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("post_norm", [True, False])
def test_cache_prefill_and_steps_equal_full_forward(post_norm):
    m = _model(post_norm=post_norm)
    obs, pa, pr = torch.randint(0, 9, (3, 40, 2)), torch.randint(0, 6, (3, 40)), torch.rand(3, 40)
    cache = m.new_cache(3, "cpu")
    out = [m(obs[:, :15], pa[:, :15], pr[:, :15], cache, 0)]
    out += [m(obs[:, i:i + 1], pa[:, i:i + 1], pr[:, i:i + 1], cache, i) for i in range(15, 40)]
    torch.testing.assert_close(torch.cat(out, 1), m(obs, pa, pr), rtol=1e-4, atol=1e-5)


def test_evaluation_tokens_equal_training_tokens():
    """The policy's window after an in-context rollout == the sampler's window of that history."""
    m, task = _model(), np.array([[8, 4]])  # this model walks right: rewards at the wall
    for n_ep, e0 in ((2, 0), (3, 1)):                                  # (3, 1): the window slid
        policy = ad.InContextPolicy(m, ctx=2, use_cache=False, seed=5)
        ret, acts = ad.in_context_returns(policy, "darkroom", task, n_ep)
        env, obs, rew = ad.BatchDarkRoom("darkroom", task), [], []
        for e in range(n_ep):
            obs.append([env.reset()[0]])
            for t in range(20):
                o, r, _ = env.step(acts[:, e, t])
                obs[-1].append(o[0])
                rew.append(r[0])
        h = dict(observations=np.array([[o[:20] for o in obs]]), actions=acts,
                 rewards=np.array(rew, dtype=np.float32).reshape(1, n_ep, 20))
        assert ret.sum() == h["rewards"].sum() and (h["rewards"][0, :, -1] > 0).all()
        s = ad.WindowSampler(h, 2, "cpu")
        window = slice(e0 * 20, e0 * 20 + 40)
        obs, prev_a, prev_r = policy.win
        assert obs[0].tolist() == s.obs[0, window].tolist()
        assert prev_a[0].tolist() == s.prev_a[0, window].tolist()
        assert prev_r[0].tolist() == s.prev_r[0, window].tolist()


@pytest.mark.parametrize("argmax", [False, True])
def test_cached_and_uncached_in_context_rollouts_agree(argmax):
    m, tasks = _model(), ad.all_tasks("darkroom")[::10]
    # 5 episodes with a 2-episode window: the window slides (and the cache is rebuilt) 3 times
    out = [ad.in_context_returns(ad.InContextPolicy(m, 2, cache, argmax, seed=3), "darkroom",
                                 tasks, 5) for cache in (True, False)]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    np.testing.assert_array_equal(out[0][0], out[1][0])
    if not argmax:
        assert len(np.unique(out[0][1])) > 1
        other = ad.in_context_returns(ad.InContextPolicy(m, 2, seed=4), "darkroom", tasks, 5)
        assert (other[1] != out[0][1]).any()                           # the seed matters


def test_paper_model_size_literal():
    # embeddings 9*64*2 + 6*64 + (64+64) + 80*64; per block qkv 64*192+192, proj 64*64+64,
    # FF 64*2048+2048 + 2048*64+64, two LayerNorms 2*128; head 64*5+5
    m = ad.make_model(ad.Args())
    assert sum(p.numel() for p in m.parameters()) == 1_131_717
    blk, x = m.blocks[0].eval(), torch.randn(2, 5, 64)
    q, k, v = blk.qkv(x).view(2, 5, 3, 4, 16).permute(2, 0, 3, 1, 4)   # by hand: 4 heads of 16
    att = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(5, 5).triu(1).bool(), -1e9)
    y = blk.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64))
    h = blk.ln1(x + y)                                                 # post-norm: LN(x + f(x))
    torch.testing.assert_close(blk(x), blk.ln2(h + blk.ff(h)), rtol=1e-4, atol=1e-5)
    pre = ad.make_model(ad.Args(post_norm=False))                      # pre-norm: + a final LN
    assert sum(p.numel() for p in pre.parameters()) == 1_131_717 + 128
    assert m.seq_len == 80 and len(m.blocks) == 4 and m.blocks[0].n_heads == 4


def test_validate_histories_named_errors():
    args = ad.Args(split=(6, 2))
    train, test = ad.task_split(args)
    h = ad.q_learning(ad.BatchDarkRoom("darkroom", train), 8, np.random.default_rng(0))
    h["tasks"] = train
    ok = ad.validate_histories(dict(h), args, test, "h.npz")
    assert ok["observations"].dtype == np.int64
    ad.validate_histories({**h, "observations": h["observations"].astype(np.float32)}, args, test,
                          "h.npz")                                     # integral floats are fine
    bad = {"NaN": {**h, "rewards": np.where(h["rewards"] == 0, np.nan, 1)},
           "truncated": {**h, "observations": h["observations"] + 0.5},
           "another env": {**h, "rewards": 1 - h["rewards"]},
           "leaks": {**h, "tasks": np.concatenate([train[:-1], test[:1]])},
           "missing": {k: v for k, v in h.items() if k != "tasks"}}
    for match, hist in bad.items():
        with pytest.raises(ad.HistoryError, match=match):
            ad.validate_histories(hist, args, test, "h.npz")
    hard = ad.q_learning(ad.BatchDarkRoom("darkroom-hard", train), 8, np.random.default_rng(0))
    with pytest.raises(ad.HistoryError, match="another env"):          # 17x17 histories
        ad.validate_histories({**hard, "tasks": train}, args, test, "h.npz")


TINY = ["--split", "6", "2", "--histories-per-task", "1", "--source-episodes", "32",
        "--subsample", "2", "--context-episodes", "2", "--n-layers", "1", "--n-heads", "2",
        "--d-model", "16", "--ff-dim", "32", "--batch-size", "4", "--eval-episodes", "3",
        "--eval-every", "3", "--no-cuda", "--total-steps", "6"]


def test_run_ctrl_c_resume_eval_only_and_held_out_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen, orig_eval, starts, orig = [], ad.in_context_returns, set(), ad.WindowSampler.sample
    monkeypatch.setattr(ad, "in_context_returns", lambda p, v, t, *a, **k: seen.append(
        np.array(t)) or orig_eval(p, v, t, *a, **k))
    monkeypatch.setattr(ad.WindowSampler, "sample", lambda self, *a: starts.add(
        (self.lo, self.hi)) or orig(self, *a))
    straight = ad.main(TINY)
    assert starts == {(0, 14), (8, 14)}  # 16 kept episodes, windows of 2: AD all, ED the last 8
    folder = Path(straight["run_dir"])
    for f in ("in_context.csv", "in_context.md", "checkpoint.pt", "args.json", "metrics.jsonl"):
        assert (folder / f).exists()
    lines = (folder / "in_context.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["episode", "AD", "ED"] and len(lines) == 4
    assert "source (kept episodes)" in lines[0] and "source (raw)" in lines[0]
    train, test = ad.task_split(ad.Args(split=(6, 2)))
    np.testing.assert_array_equal(seen[-3], np.repeat(test, 4, 0))   # AD, ED: held-out tasks
    np.testing.assert_array_equal(seen[-2], np.repeat(test, 4, 0))
    with np.load(next(Path(os.environ["SEQRL_DATA_DIR"]).glob("ad-darkroom-*split6_2*"))) as f:
        assert {tuple(t) for t in f["tasks"].tolist()} <= {tuple(t) for t in train.tolist()}
    assert any("eval/return_mean" in json.loads(x) for x in open(folder / "metrics.jsonl"))

    calls = {"n": 0}

    def ctrl_c(self, *a):  # Ctrl-C during update 2 (its AD batch): the update ends, then a save
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return orig(self, *a)
    monkeypatch.setattr(ad.WindowSampler, "sample", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        ad.main(TINY)
    assert stop.value.code == 130
    monkeypatch.setattr(ad.WindowSampler, "sample", orig)
    part = max(Path("runs").iterdir(), key=lambda p: p.stat().st_mtime) / "checkpoint.pt"
    assert common.load_checkpoint(part)["step"] == 2
    resumed = ad.main(TINY + ["--resume", str(part)])
    a, b = common.load_checkpoint(folder / "checkpoint.pt"), common.load_checkpoint(part)
    assert b["step"] == 6
    for k in ("AD_model", "ED_model"):
        for name, t in a[k].items():
            torch.testing.assert_close(b[k][name], t, rtol=0, atol=0)
    for k in ("AD", "ED"):
        np.testing.assert_array_equal(resumed[k], straight[k])
    ev = ad.main(["--eval-only", "--checkpoint", str(folder / "checkpoint.pt"),
                  "--eval-episodes", "3"])
    for k in ("AD", "ED", "source (kept episodes)"):
        np.testing.assert_array_equal(ev[k], straight[k])

    # the two-file example: ad.py + common.py alone, load_policy, act on a Dark Room env
    for f in ("ad.py", "common.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    script = ("import sys, numpy as np\nfrom ad import DarkRoom, load_policy\n"
              "policy, env, acts = load_policy(sys.argv[1]), DarkRoom((2, 7)), []\n"
              "policy.reset(1)\nfor ep in range(3):\n    obs, _ = env.reset(seed=0)\n"
              "    for t in range(20):\n        act = policy(obs[None])[0]\n"
              "        obs, r, term, trunc, _ = env.step(act)\n        acts.append(int(act))\n"
              "        policy.observe(np.array([r]), np.array([term or trunc]))\nprint(acts)\n")
    (tmp_path / "act.py").write_text(script)
    out = subprocess.run([sys.executable, "act.py", str(folder / "checkpoint.pt")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    acts = json.loads(out.stdout.strip().splitlines()[-1])
    policy = ad.load_policy(folder / "checkpoint.pt")
    _, mine = orig_eval(policy, "darkroom", np.array([[2, 7]]), 3)
    assert len(acts) == 60 and acts == mine.ravel().tolist()


def test_bad_arguments_are_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, match in [(["--env", "hopper"], "unknown --env"),
                        (["--split", "80", "16"], "asks more"),
                        (["--split", "65"], "two numbers"),
                        (["--context-episodes", "0"], "context-episodes"),
                        (["--eval-only"], "--eval-only needs --checkpoint"),
                        (["--q-eps-decay", "-1"], "q-eps-decay")]:
        with pytest.raises(ValueError, match=match):
            ad.main(argv)
    with pytest.raises(common.CheckpointError):
        ad.main(["--eval-only", "--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(ValueError, match="lockstep"):
        policy = ad.InContextPolicy(_model(), 2)
        policy.reset(2)
        policy(np.zeros((2, 2)))
        policy.observe(np.zeros(2), np.array([True, False]))
