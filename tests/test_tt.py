"""Trajectory Transformer (tt.py): discretization, tokens, masks, loss, planner, cache, runs."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import common
import tt

OBS, ACT = 11, 3
D = OBS + ACT + 2


def tiny_gpt(seed=0, n_layer=2, n_embd=32):
    torch.manual_seed(seed)
    return tt.GPT(OBS, ACT, n_layer, n_embd).eval()


def random_disc(seed=0):
    rng = np.random.default_rng(seed)
    return tt.Discretizer(np.sort(rng.normal(size=(101, D)), 0))


@pytest.fixture
def one_thread():
    """Training reductions (embedding / layer-norm backward) are not bitwise reproducible with 2
    threads; with one they are, so exact-resume comparisons run with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- data (Sec. 3.1)
@pytest.mark.parametrize("kind", ["quantile", "uniform"])
def test_discretizer_round_trip_below_one_bin(kind):
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(size=(5000, 3)), rng.exponential(size=(5000, 1))], 1)
    disc = tt.Discretizer.fit(data, 100, kind)
    x = torch.as_tensor(data)
    idx = disc.discretize(x)
    assert idx.min() >= 0 and idx.max() <= 99
    recon = disc.reconstruct(idx)
    width = (disc.th[1:] - disc.th[:-1]).gather(0, idx)                  # width of each bin
    err = (recon - x).abs()
    assert (err <= width + 1e-9).all()
    assert torch.equal(disc.discretize(recon), idx)                     # official _test
    if kind == "uniform":
        assert (err <= width / 2 + 1e-9).all()
    else:                                                                # equal counts per bin
        counts = torch.bincount(idx[:, 0], minlength=100)
        assert counts.min() >= 49 and counts.max() <= 51
    assert torch.equal(disc.discretize(x[:, 2:], start=2), idx[:, 2:])


def test_expectation_of_one_hot_is_bin_midpoint():
    disc = random_disc()
    probs = torch.zeros(2, 101)
    probs[0, 7], probs[1, 100] = 1.0, 1.0                                # a bin; the stop token
    e = disc.expectation(probs, D - 1)
    assert torch.allclose(e[0].double(), (disc.th[7, D - 1] + disc.th[8, D - 1]) / 2)
    assert e[1] == 0                                                     # stop mass is dropped


def test_value_target_excludes_reward_and_penalizes_terminals():
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    data = dict(observations=np.zeros((5, OBS), np.float32), actions=np.zeros((5, ACT), np.float32),
                rewards=r, terminals=np.array([0, 0, 1, 0, 0], bool),
                timeouts=np.array([0, 0, 0, 0, 1], bool))
    joined, lengths = tt.build_transitions(data)
    assert list(lengths) == [3, 2]
    assert joined[2, D - 2] == -100.0                                    # true terminal
    np.testing.assert_allclose(joined[:3, D - 1], [2.0 + 0.99 * -100.0, -100.0, 0.0])
    np.testing.assert_allclose(joined[3:, D - 1], [5.0, 0.0])           # timeout: no penalty


# ----------------------------------------------------------------------------- model (Sec. 3.2)
def test_embedding_offsets_per_dimension_and_stop():
    m = tiny_gpt()
    idx = torch.randint(0, 100, (2, 2 * D + 3))
    idx[0, 5] = 100                                                      # stop token
    expect = idx + (torch.arange(idx.shape[1]) % D) * 100
    expect[0, 5] = 100 * D
    want = m.tok_emb.weight[expect] + m.pos_emb[:idx.shape[1]]
    assert torch.equal(m.embed(idx), want)
    assert torch.equal(m.embed(idx[:, 4:], pos0=4), want[:, 4:])        # absolute positions


def test_value_columns_are_hidden_from_every_query():
    m = tiny_gpt()
    T = m.block_size
    assert not m.mask[:, D - 1::D].any()
    assert m.mask[:, 0].all()
    x = torch.randint(0, 100, (2, T))
    y = x.clone()
    y[:, D - 1::D] = torch.randint(0, 100, y[:, D - 1::D].shape)        # every value token
    with torch.no_grad():
        a, b = m(x), m(y)
    keep = torch.arange(T) % D != D - 1      # outputs AT value positions read their own token
    assert torch.allclose(a[:, keep], b[:, keep], atol=1e-6)
    assert not torch.allclose(a[:, ~keep], b[:, ~keep], atol=1e-6)


def test_causality():
    m = tiny_gpt()
    x = torch.randint(0, 100, (2, 60))
    y = x.clone()
    y[:, 30:] = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.allclose(a[:, :30], b[:, :30], atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:], atol=1e-4)


# ----------------------------------------------------------------------------- planner (Sec. 3.3)
def test_cached_logits_match_uncached_through_window_slides_and_beam_ops():
    m = tiny_gpt(n_layer=4, n_embd=128)
    block = 5 * D - 1
    x = torch.randint(0, 100, (4, 3 * D + OBS))
    cached, plain = tt.CachedStream(m, x.clone(), block), tt.Stream(m, x.clone(), block)
    worst, refills = 0.0, 0
    with torch.no_grad():
        for i in range(4 * D):                                           # several slides
            start = cached.start
            a, b = cached.logits(), plain.logits()
            refills += int(cached.start != start)
            worst = max(worst, (a - b).abs().max().item())
            tok = a.argmax(-1)
            cached.append(tok)
            plain.append(tok)
            if i % 5 == 2:                                               # selection + expansion
                idx = torch.tensor([3, 0, 0, 1])
                cached.select(idx)
                plain.select(idx)
    assert worst < 1e-5
    assert refills >= 4


def test_cached_and_uncached_planning_return_the_same_plan():
    m = tiny_gpt(n_layer=2, n_embd=64)
    disc = random_disc()
    prefix = torch.randint(0, 100, (2, 5 * D + OBS))                     # 2 envs, full context
    out = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        out.append(tt.beam_plan(m, disc, prefix, horizon=3, beam_width=8, use_cache=use_cache,
                                gen=g))
    (p1, v1), (p2, v2) = out
    assert p1.shape == (2, 3, D)
    assert torch.equal(p1, p2)
    assert torch.allclose(v1, v2, atol=1e-5)
    assert torch.equal(p1[:, 0, :OBS], prefix[:, -OBS:])                 # starts at the obs
    g = torch.Generator().manual_seed(4)
    p3, _ = tt.beam_plan(m, disc, prefix, horizon=3, beam_width=8, gen=g)
    assert not torch.equal(p1, p3)


def test_filter_cdf_keeps_top_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    kept = tt.filter_cdf(logits, 0.6) > -1000
    assert kept.tolist() == [[True, False, False, False, False]]


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """Three tiny runs: 6 updates straight; 3 updates; those 3 resumed to 6 (one thread)."""
    root = tmp_path_factory.mktemp("tt_runs")
    cwd, n = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)   # exact comparisons need one thread (see the one_thread fixture)
    try:
        base = ["--dataset-path", str(tiny_dataset()), "--no-cuda", "--n-layer", "1",
                "--n-embd", "32", "--batch-size", "8", "--horizon", "2", "--beam-width", "4",
                "--eval-max-steps", "4", "--log-every", "2"]
        full = tt.main(base + ["--total-steps", "6", "--eval-episodes", "2"])
        half = tt.main(base + ["--total-steps", "3", "--eval-episodes", "0", "--exp-name", "h"])
        resumed = tt.main(base + ["--total-steps", "6", "--eval-episodes", "0",
                                  "--resume", half["checkpoint"]])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(n)
    return dict(full=full, half=half, resumed=resumed, root=root)


def test_smoke_train_resume_eval(runs, tmp_path, monkeypatch):
    full, resumed = runs["full"], runs["resumed"]
    assert np.isfinite(full["eval/normalized_score"]) and full["eval/length_mean"] == 4
    a, b = common.load_checkpoint(full["checkpoint"], "tt"), common.load_checkpoint(
        resumed["checkpoint"], "tt")
    assert a["step"] == b["step"] == 6 and resumed["checkpoint"] == runs["half"]["checkpoint"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])   # exact resume
    assert a["scheduler"] == b["scheduler"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert isinstance(a["thresholds"], torch.Tensor) and isinstance(a["obs_dim"], int)
    monkeypatch.chdir(tmp_path)
    ev = tt.main(["--eval-only", "--checkpoint", full["checkpoint"], "--no-cuda",
                  "--no-kv-cache", "--eval-episodes", "1", "--eval-max-steps", "3"])
    assert ev["eval/length_mean"] == 3
    with pytest.raises(ValueError, match="--checkpoint"):
        tt.main(["--eval-only", "--no-cuda"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError):
        tt.main(["--eval-only", "--checkpoint", str(bad), "--no-cuda"])
    with pytest.raises(ValueError, match="plan-freq"):
        tt.main(["--eval-only", "--checkpoint", full["checkpoint"], "--plan-freq", "3"])


def test_load_policy_from_two_copied_files(runs, tmp_path, data_dir):
    """README's example: copy tt.py and common.py, load a checkpoint, act in Hopper."""
    for f in ("tt.py", "common.py"):
        shutil.copy(os.path.join(os.path.dirname(tt.__file__), f), tmp_path / f)
    script = textwrap.dedent(f"""
        import json, gymnasium, torch
        torch.set_num_threads(1)
        from tt import load_policy
        policy = load_policy({runs["full"]["checkpoint"]!r})
        env = gymnasium.make("Hopper-v5")
        obs, _ = env.reset(seed=0)
        policy.reset(1)
        acts = []
        for _ in range(3):
            act = policy(obs[None])[0]
            obs, r, term, trunc, _ = env.step(act)
            policy.observe([r], [term or trunc])
            acts.append(act.tolist())
        print(json.dumps(acts))""")
    env = dict(os.environ, SEQRL_DATA_DIR=str(data_dir), PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=120,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    acts = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    assert acts.shape == (3, ACT) and np.isfinite(acts).all()
    import gymnasium
    policy, env = tt.load_policy(runs["full"]["checkpoint"]), gymnasium.make("Hopper-v5")
    obs, _ = env.reset(seed=0)
    policy.reset(1)
    for want in acts:
        act = policy(obs[None])[0]
        np.testing.assert_allclose(act, want, atol=1e-5)
        obs, r, term, trunc, _ = env.step(act)
        policy.observe([r], [term or trunc])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        tt.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--no-kv-cache" in out and "--discretizer" in out and "--schedule-epochs" in out
