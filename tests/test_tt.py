"""Trajectory Transformer (tt.py): discretization, tokens, masks, cached planning, smoke runs."""
import numpy as np
import pytest
import torch

import common
import tt

OBS, ACT = 11, 3
D = OBS + ACT + 2


def tiny_gpt(seed=0, n_layer=2, n_embd=32, seq_len=10):
    torch.manual_seed(seed)
    return tt.GPT(OBS, ACT, 100, seq_len * D - 1, n_layer=n_layer, n_head=4, n_embd=n_embd, dropout=0.1).eval()


def random_disc(seed=0):
    rng = np.random.default_rng(seed)
    return tt.Discretizer(np.sort(rng.normal(size=(101, D)), 0).astype(np.float32))


@pytest.mark.parametrize("kind", ["quantile", "uniform"])
def test_discretizer_round_trip_below_one_bin(kind):
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(size=(5000, 3)), rng.exponential(size=(5000, 1))], 1).astype(np.float32)
    disc = tt.Discretizer.fit(data, 100, kind)
    x = torch.as_tensor(data)
    idx = disc.discretize(x)
    assert idx.min() >= 0 and idx.max() <= 99
    recon = disc.reconstruct(idx)
    width = (disc.th[1:] - disc.th[:-1]).gather(0, idx)                  # width of each value's bin
    err = (recon - x).abs()
    assert (err <= width + 1e-5).all()
    if kind == "uniform":                                                  # midpoints: half a bin
        assert (err <= width / 2 + 1e-5).all()
    # quantile bins hold about the same number of points each
    if kind == "quantile":
        counts = torch.bincount(idx[:, 0], minlength=100)
        assert counts.min() >= 30 and counts.max() <= 70
    # a slice of dimensions discretizes like the full vector
    assert torch.equal(disc.discretize(x[:, 2:], start=2), idx[:, 2:])


def test_expectation_of_one_hot_is_bin_midpoint():
    disc = random_disc()
    probs = torch.zeros(2, 101)
    probs[0, 7], probs[1, 100] = 1.0, 1.0                                   # a bin; the stop token
    e = disc.expectation(probs, D - 1)
    assert torch.allclose(e[0], (disc.th[7, D - 1] + disc.th[8, D - 1]) / 2)
    assert e[1] == 0                                                         # stop mass is dropped


def test_value_target_excludes_reward_and_penalizes_terminals():
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    data = dict(observations=np.zeros((5, OBS), np.float32), actions=np.zeros((5, ACT), np.float32),
                rewards=r, terminals=np.array([0, 0, 1, 0, 0], bool), timeouts=np.array([0, 0, 0, 0, 1], bool))
    joined, lengths = tt.build_transitions(data, 0.5, -100.0)
    assert list(lengths) == [3, 2]
    assert joined[2, D - 2] == -100.0                                        # reward at the true terminal
    np.testing.assert_allclose(joined[:3, D - 1], [2.0 + 0.5 * -100.0, -100.0, 0.0])
    np.testing.assert_allclose(joined[3:, D - 1], [5.0, 0.0])               # timeout: no penalty


def test_token_offsets_per_dimension_and_stop():
    m = tiny_gpt()
    idx = torch.randint(0, 100, (2, 2 * D + 3))
    idx[0, 5] = 100                                                          # stop token
    off = m.offset_tokens(idx)
    pos = torch.arange(idx.shape[1])
    expect = idx + (pos % D) * 100
    expect[0, 5] = 100 * D
    assert torch.equal(off, expect)
    assert off.max() < m.tok_emb.num_embeddings
    # a window that starts mid-transition (cache positions) offsets by its absolute position
    assert torch.equal(m.offset_tokens(idx[:, 4:], pos0=4), expect[:, 4:])


def test_value_columns_are_hidden_from_every_query():
    m = tiny_gpt()
    T = m.block_size
    assert not m.mask[:, D - 1::D].any()                                     # no query sees a value column
    assert m.mask[:, 0].all()                                                # every row attends somewhere
    x = torch.randint(0, 100, (2, T))
    y = x.clone()
    y[:, D - 1::D] = torch.randint(0, 100, y[:, D - 1::D].shape)            # change every value token
    with torch.no_grad():
        a, b = m(x), m(y)
    keep = torch.arange(T) % D != D - 1      # outputs AT value positions read their own input token
    assert torch.allclose(a[:, keep], b[:, keep], atol=1e-6)
    assert not torch.allclose(a[:, ~keep], b[:, ~keep], atol=1e-6)           # the test can fail


def test_causality():
    m = tiny_gpt()
    x = torch.randint(0, 100, (2, 60))
    y = x.clone()
    y[:, 30:] = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.allclose(a[:, :30], b[:, :30], atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:], atol=1e-4)


def test_cached_logits_match_uncached_through_window_shifts_and_beam_ops():
    m = tiny_gpt(n_layer=4, n_embd=128)
    block = 5 * D - 1
    x = torch.randint(0, 100, (4, 3 * D + OBS))
    cached, full = tt.Stream(m, x.clone(), block, True), tt.Stream(m, x.clone(), block, False)
    worst, refills = 0.0, 0
    with torch.no_grad():
        for i in range(4 * D):                                               # crosses several window moves
            start = cached.cache.start if cached.cache is not None else None
            a, b = cached.logits(), full.logits()
            refills += int(cached.cache.start != start)
            worst = max(worst, (a - b).abs().max().item())
            tok = a.argmax(-1)
            cached.append(tok)
            full.append(tok)
            if i % 5 == 2:                                                   # beam selection + expansion
                idx = torch.tensor([3, 0, 0, 1])
                cached.select(idx)
                full.select(idx)
    assert worst < 1e-5
    assert refills >= 4                                                      # the sliding context was exercised


def test_cached_and_uncached_planning_return_the_same_plan():
    m = tiny_gpt(n_layer=2, n_embd=64)
    disc = random_disc()
    prefix = torch.randint(0, 100, (2, 5 * D + OBS))                         # 2 envs, full context
    out = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        out.append(tt.beam_plan(m, disc, prefix, horizon=3, beam_width=8, n_expand=2, use_cache=use_cache, gen=g))
    (p1, v1), (p2, v2) = out
    assert p1.shape == (2, 3, D)
    assert torch.equal(p1, p2)
    assert torch.allclose(v1, v2, atol=1e-5)
    assert torch.equal(p1[:, 0, :OBS], prefix[:, -OBS:])                     # the plan starts at the current obs
    g = torch.Generator().manual_seed(4)                                     # another seed, another plan
    p3, _ = tt.beam_plan(m, disc, prefix, horizon=3, beam_width=8, n_expand=2, gen=g)
    assert not torch.equal(p1, p3)


def test_filter_cdf_keeps_top_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    kept = tt.filter_cdf(logits, 0.6) > -1000
    assert kept.tolist() == [[True, False, False, False, False]]   # dropped mass 0.5 < 0.6; the next would pass it


def test_smoke_train_resume_eval(tiny_dataset, tmp_path, monkeypatch):
    path = str(tiny_dataset())
    base = ["--dataset-path", path, "--no-cuda", "--n-layer", "1", "--n-embd", "32", "--batch-size", "8",
            "--seq-len", "4", "--horizon", "2", "--beam-width", "4", "--eval-episodes", "2",
            "--max-episode-steps", "4", "--log-every", "2"]
    saves = []
    real_save = common.save_checkpoint

    def keep_copies(p, state):                                               # keep each intermediate checkpoint
        real_save(p, state)
        copy = tmp_path / f"ck{state['step']}.pt"
        real_save(copy, state)
        saves.append(copy)
    monkeypatch.setattr(tt.common, "save_checkpoint", keep_copies)

    full = tt.main(base + ["--total-steps", "6", "--save-every", "3", "--run-dir", str(tmp_path / "a")])
    assert np.isfinite(full["losses/loss"]) and np.isfinite(full["eval/normalized_score"])
    assert full["eval/length_mean"] == 4
    resumed = tt.main(base + ["--total-steps", "6", "--resume", str(tmp_path / "ck3.pt"), "--eval-episodes", "0",
                              "--run-dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert resumed["step"] == 6
    assert all(torch.equal(a[k], b[k]) for k in a)                           # exact resume

    ev = tt.main(["--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt"), "--no-cuda", "--no-kv-cache",
                  "--horizon", "2", "--beam-width", "4", "--eval-episodes", "1", "--max-episode-steps", "3",
                  "--run-dir", str(tmp_path / "c")])
    assert ev["eval/length_mean"] == 3
    with pytest.raises(ValueError, match="obs/act dims"):
        tt.main(["--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt"), "--env", "halfcheetah",
                 "--no-cuda", "--run-dir", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="--checkpoint"):
        tt.main(["--eval-only", "--no-cuda", "--run-dir", str(tmp_path / "e")])
    with pytest.raises(common.CheckpointError):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        tt.main(["--eval-only", "--checkpoint", str(bad), "--no-cuda", "--run-dir", str(tmp_path / "f")])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        tt.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--no-kv-cache" in out and "--discretizer" in out and "--time-budget-min" in out
