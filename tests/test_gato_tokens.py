"""Tests of gato_tokens.py: Gato's tokenization invariants (arXiv 2205.06175, Sec. 2.1, App. B-C),
the timestep layout, batches, the KV-cached decoder and a smoke run with save / resume / eval-only."""
import math

import numpy as np
import pytest
import torch

import common
import gato_tokens as g

HALF_BIN = 1.0 / g.N_BINS  # half of a bin width (2 / 1024) in mu-law space


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: two intra-op threads make each call ~30x slower
    when the cores are busy (measured), so this module runs torch on one thread and restores it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mu_law_known_values():
    # F(x) = sgn(x) ln(1 + 100|x|) / ln(1 + 256 * 100)
    assert g.mu_law_encode(1.0) == pytest.approx(math.log(101) / math.log(25601), abs=1e-12)
    assert g.mu_law_encode(1.0) == pytest.approx(0.455, abs=1e-3)
    assert g.mu_law_encode(100.0) == pytest.approx(0.907, abs=1e-3)
    assert g.mu_law_encode(-100.0) == pytest.approx(-0.907, abs=1e-3)
    assert g.mu_law_encode(256.0) == pytest.approx(1.0, abs=1e-12)
    assert g.mu_law_encode(0.0) == 0.0
    x = np.array([-200.0, -3.0, -1e-3, 0.0, 2e-2, 7.5, 255.0])
    np.testing.assert_allclose(g.mu_law_decode(g.mu_law_encode(x)), x, rtol=1e-10, atol=1e-12)


def test_continuous_token_range_and_clamping():
    x = np.array([-1e9, -256.0, -300.0, -1.0, 0.0, 1e-6, 1.0, 255.9, 256.0, 1e9, np.inf, -np.inf])
    t = g.tokenize_continuous(x)
    assert t.dtype == np.int64 and t.shape == x.shape
    assert t.min() >= 32000 and t.max() < 33024
    assert t[0] == t[1] == t[2] == t[-1] == 32000            # |x| >= 256 clamps to the lowest bin
    assert t[8] == t[9] == t[10] == 33023                    # F = 1 goes into the last bin, not bin 1024
    assert t[4] == 32000 + 512                              # F(0) = 0 is the lower edge of bin 512
    assert (np.diff(g.tokenize_continuous(np.linspace(-300, 300, 10001))) >= 0).all()  # monotone
    # shape is kept (row-major flattening is the caller's reshape)
    assert g.tokenize_continuous(np.zeros((3, 4, 5))).shape == (3, 4, 5)


def test_round_trip_within_half_a_bin():
    rng = np.random.default_rng(0)
    mags = np.concatenate([np.logspace(-6, np.log10(255.99), 4000), rng.uniform(0, 256, 4000)])
    x = np.concatenate([mags, -mags, [0.0]])
    dec = g.detokenize_continuous(g.tokenize_continuous(x))
    err = np.abs(g.mu_law_encode(dec) - g.mu_law_encode(x))
    assert err.max() <= HALF_BIN + 1e-12
    # beyond |x| = 256 the value is clamped to the outermost bin centre
    big = g.detokenize_continuous(g.tokenize_continuous(np.array([300.0, -1e6])))
    top = g.mu_law_decode(1.0 - HALF_BIN)
    np.testing.assert_allclose(big, [top, -top])
    assert top < 256.0
    with pytest.raises(ValueError, match="continuous tokens"):
        g.detokenize_continuous(np.array([31999]))
    with pytest.raises(ValueError, match="continuous tokens"):
        g.detokenize_continuous(np.array([g.SEPARATOR]))


def test_discrete_range_errors():
    np.testing.assert_array_equal(g.tokenize_discrete([0, 5, 1023]), [0, 5, 1023])
    np.testing.assert_array_equal(g.tokenize_discrete(np.array([[1.0, 2.0]])), [[1, 2]])
    for bad in ([-1], [1024], [3, 5000]):
        with pytest.raises(ValueError, match=r"\[0, 1024\)"):
            g.tokenize_discrete(bad)
    with pytest.raises(ValueError, match="integers"):
        g.tokenize_discrete([0.5])


def test_image_patches_and_normalization():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    img[:16, :16] = 0
    img[:16, 16:32] = 255
    patches, pos = g.tokenize_image(img)
    assert patches.shape == (2 * 3, 16 * 16 * 3)             # (H/16 * W/16, 16*16*C)
    np.testing.assert_allclose(patches[0], -0.25)            # 0 -> -1, divided by sqrt(16) = 4
    np.testing.assert_allclose(patches[1], 0.25)             # 255 -> +1, / 4
    assert np.abs(patches).max() <= 0.25 + 1e-7
    # raster order: patch 4 is row 1, column 1
    expect = (img[16:32, 16:32].astype(np.float32) / 255 * 2 - 1) / 4
    np.testing.assert_allclose(patches[4], expect.reshape(-1), rtol=1e-6)
    # quantized (128 bins) row / column intervals of each patch
    np.testing.assert_array_equal(pos[0], [0, 64, 0, 42])
    np.testing.assert_array_equal(pos[5], [64, 128, 85, 128])
    assert pos.min() >= 0 and pos.max() <= 128
    with pytest.raises(ValueError, match="multiple of the 16x16"):
        g.tokenize_image(np.zeros((20, 32, 3), np.uint8))


def test_layout_nested_observation_separator_and_mask():
    tok = lambda s: [ord(c) for c in s]                      # any text tokenizer callable
    obs = {"b": {"y": np.array([0.5, -0.5]), "x": np.array([3, 7])}, "a": "hi"}
    out = g.layout_timestep(obs, np.array([0.1, -0.2, 0.3]), text_tokenizer=tok)
    # keys in sorted order: a (text), b.x (discrete), b.y (continuous); then '|', then the action
    expect = np.concatenate([tok("hi"), [3, 7], g.tokenize_continuous([0.5, -0.5]), [g.SEPARATOR],
                             g.tokenize_continuous([0.1, -0.2, 0.3])])
    np.testing.assert_array_equal(out["tokens"], expect)
    assert int(np.flatnonzero(out["tokens"] == g.SEPARATOR)[0]) == 6   # after the 6 observation tokens
    np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 0, 0, 0, 0, 1, 1, 1])  # text + action only
    np.testing.assert_array_equal(out["local_pos"], np.arange(10))
    # a discrete action and an image observation
    img = np.zeros((16, 32, 3), np.uint8)
    out = g.layout_timestep({"img": img, "z": np.array([1.0])}, np.array([4]))
    assert list(out["tokens"][:2]) == [g.IMAGE_PATCH] * 2 and out["tokens"][3] == g.SEPARATOR
    assert out["tokens"][-1] == 4 and len(out["patches"]) == 1 and out["patches"][0].shape == (2, 768)
    np.testing.assert_array_equal(out["loss_mask"], [0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="text_tokenizer"):
        g.layout_timestep({"t": "no tokenizer"}, np.array([0.0]))
    with pytest.raises(ValueError, match=r"\[0, 32000\)"):
        g.layout_timestep({"t": "x"}, np.array([0.0]), text_tokenizer=lambda s: [40000])


def _fake_data(n_eps=10, length=20, obs_dim=3, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    n = n_eps * length
    rewards = np.repeat(np.arange(n_eps, dtype=np.float32), length) / length  # episode i returns i
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    return dict(observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
                actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                rewards=rewards, terminals=np.zeros(n, bool), timeouts=timeouts)


def test_expert_filter_and_vectorized_layout():
    assert g.expert_return([1, 5, 3, 9, 1], window=2) == pytest.approx(6.0)   # max of windowed means
    assert g.expert_return([1, 5, 3], window=10) == pytest.approx(3.0)
    data = _fake_data()
    args = g.Args(filter_window=1)
    task = g.Task("fake", data, args)
    assert task.expert_return == pytest.approx(9.0)
    assert task.n_kept == 2                                  # returns 0..9: keep >= 0.8 * 9 = 7.2
    np.testing.assert_array_equal(task.starts // 20, [8, 9])
    i = int(task.starts[0]) + 4
    ref = g.layout_timestep(data["observations"][i], data["actions"][i])
    np.testing.assert_array_equal(task.tokens[i], ref["tokens"])
    np.testing.assert_array_equal(task.step_mask, ref["loss_mask"].astype(bool))


def test_sample_batch_prompts_and_masks():
    data = _fake_data(n_eps=6, length=12)
    args = g.Args(filter_frac=0.0, seq_len=24, batch_size=8, prompt_prob=0.25)  # 6 tokens / step, 4 steps
    task = g.Task("fake", data, args)
    tok, pos, tgt = g.sample_batch([task], args, np.random.default_rng(0))
    assert tok.shape == pos.shape == (8, 24)
    flat_targets = tok[:, 1:].reshape(-1)[tgt]
    assert ((flat_targets >= 32000) & (flat_targets < 33024)).all()   # targets: action tokens only
    n_act_targets = (np.tile(task.step_mask, 4)[1:]).sum() * 8
    assert len(tgt) == n_act_targets                          # every action token is a target
    np.testing.assert_array_equal(pos[0], np.tile(np.arange(6), 4))
    # a prompted sequence (rows 0..1) is [prompt step, episode steps]; prompts from the end are an
    # episode's last timestep: check the prompt row is a real timestep of the dataset
    rows = {tuple(r) for r in task.tokens}
    for b in range(8):
        for s in range(4):
            assert tuple(tok[b, 6 * s: 6 * s + 6]) in rows


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    args = g.Args(n_layer=2, n_embd=32, n_head=4, dropout=0.0, vocab="action")
    model = g.GatoModel(args).eval()
    tok = torch.randint(32000, 33024, (3, 10))
    pos = torch.arange(10).repeat(3, 1)
    with torch.no_grad():
        full = model(tok, pos)
        caches = [[None, None] for _ in model.blocks]
        h = [model(tok[:, :7], pos[:, :7], caches)]
        for j in range(7, 10):
            h.append(model(tok[:, j:j + 1], pos[:, j:j + 1], caches))
    torch.testing.assert_close(torch.cat(h, 1), full, atol=1e-5, rtol=1e-5)
    # the policy's cached action generation gives the same greedy actions as recomputing the context
    meta = dict(n_obs=3, n_act=4, n_t=8, prompt=g.tokenize_continuous(np.linspace(-1, 1, 16)))
    a = dataclasses_replace(args, seq_len=24, temperature=0.0)
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    acts = []
    for cache in (True, False):
        pol = g.GatoPolicy(model, meta, a, torch.device("cpu"), torch.Generator(), kv_cache=cache)
        pol.reset(5)
        acts.append(np.stack([pol(obs) for _ in range(3)]))
    np.testing.assert_array_equal(acts[0], acts[1])
    assert acts[0].shape == (3, 5, 4) and np.abs(acts[0]).max() <= 1.0
    full_model = g.GatoModel(dataclasses_replace(args, vocab="full"))
    assert full_model.tok_emb.num_embeddings == g.VOCAB_SIZE and model.tok_emb.num_embeddings == 1026


def dataclasses_replace(a, **kw):
    import dataclasses
    return dataclasses.replace(a, **kw)


TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "48", "--batch-size", "4",
        "--vocab", "action", "--eval-episodes", "2", "--max-episode-steps", "5", "--log-every", "5",
        "--warmup-steps", "100", "--lr", "1e-3", "--no-cuda", "--dropout", "0.1", "--filter-frac", "0.0"]


def test_smoke_resume_eval_only(tiny_dataset, tmp_path):
    # random-action datasets need no ARS run: quick to generate; the filter is off (--filter-frac 0)
    paths = [str(tiny_dataset("hopper", "random", 1000)), str(tiny_dataset("halfcheetah", "random", 1000))]
    base = TINY + ["--dataset-path", *paths]
    full = g.main(base + ["--total-steps", "12", "--eval-every", "12", "--run-dir", str(tmp_path / "a")])
    for env in ("hopper", "halfcheetah"):
        assert np.isfinite(full[f"eval/{env}/return_mean"])
    half = g.main(base + ["--total-steps", "6", "--eval-every", "6", "--run-dir", str(tmp_path / "b")])
    res = g.main(base + ["--total-steps", "12", "--eval-every", "12", "--resume", half["checkpoint"],
                         "--run-dir", str(tmp_path / "c")])
    sa = common.load_checkpoint(full["checkpoint"])["model"]
    sc = common.load_checkpoint(res["checkpoint"])["model"]
    for k in sa:                                             # 12 straight == 6 + save + resume 6
        torch.testing.assert_close(sa[k], sc[k], rtol=0, atol=0)
    ev = g.main(["--eval-only", "--checkpoint", full["checkpoint"], "--envs", "halfcheetah", "--eval-episodes", "2",
                 "--max-episode-steps", "5", "--no-cuda", "--temperature", "0"])
    assert "eval/halfcheetah/return_mean" in ev and "eval/hopper/return_mean" not in ev
    with pytest.raises(ValueError, match="trained on"):
        g.main(["--eval-only", "--checkpoint", full["checkpoint"], "--envs", "walker2d", "--no-cuda"])
    with pytest.raises(ValueError, match="one file per task"):
        g.main(TINY + ["--dataset-path", paths[0], "--total-steps", "1"])
    with pytest.raises(ValueError, match="another env"):   # hopper data given for halfcheetah
        g.main(TINY + ["--dataset-path", paths[1], paths[0], "--total-steps", "1", "--run-dir", str(tmp_path / "d")])
