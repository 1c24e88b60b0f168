"""Tests of gato_tokens.py against Gato (arXiv 2205.06175): the tokens of Sec. 2.1 / App. B with
numbers worked out by hand from the paper's formulas, the layout and positions (Sec. 2.1, App.
C.3), the expert filter (Sec. 3.1), prompted batches and the loss mask (Sec. 2.1-2.3), the Sec. 2.4
context, the Sec. 4.1 score, the KV cache, and a run with resume, eval-only and load_policy."""
import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import gato_tokens as g

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (restored afterwards); it also
    makes the resume comparison below exact."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tokens (Sec. 2.1, App. B) ------------------------------------------------------------------
def test_token_ranges_and_constants():
    # text [0, 32000), discrete [0, 1024), continuous [32000, 33024); '|' right after the bins
    assert (g.TEXT_VOCAB, g.DISCRETE_VOCAB, g.CONT_OFFSET, g.N_BINS) == (32000, 1024, 32000, 1024)
    assert (g.MU, g.M) == (100.0, 256.0)
    assert g.SEPARATOR == 33024 and g.PAD == 33025 and g.VOCAB_SIZE == 33026


def test_mu_law_formula():
    # F(x) = sgn(x) ln(|x| mu + 1) / ln(M mu + 1), mu = 100, M = 256, written out by hand
    assert g.mu_law(1.0) == pytest.approx(math.log(101) / math.log(25601), abs=1e-12)
    assert g.mu_law(1.0) == pytest.approx(0.45467435446430504, abs=1e-12)
    assert g.mu_law(-3.0) == pytest.approx(-0.5622554527042607, abs=1e-12)
    assert g.mu_law(256.0) == pytest.approx(1.0, abs=1e-12) and g.mu_law(0.0) == 0.0
    assert g.inverse_mu_law(0.4541015625) == pytest.approx(0.9941448370964538, rel=1e-10)
    x = np.array([-200.0, -3.0, -1e-3, 0.0, 2e-2, 7.5, 255.0])
    np.testing.assert_allclose(g.inverse_mu_law(g.mu_law(x)), x, rtol=1e-10, atol=1e-12)


def test_continuous_tokens_by_hand():
    # already in [-1, 1]: binned directly, floor((x + 1) * 512) + 32000 (Sec. 2.1)
    direct = [0.5, -0.25, 1.0, -1.0, 0.0, 0.999, 0.3, 0.1, -0.2]
    np.testing.assert_array_equal(g.tokenize_continuous(direct),
                                  [32768, 32384, 33023, 32000, 32512, 33023, 32665, 32563, 32409])
    # not in [-1, 1]: mu-law first; 1.0 is now F(1) = 0.4547 -> bin 744
    squashed = [1.0, 0.5, 2.0, -3.0, 100.0, 256.0, 10.0, -0.01]
    np.testing.assert_array_equal(g.tokenize_continuous(squashed),
                                  [32744, 32710, 32779, 32224, 32976, 33023, 32860, 32477])
    assert g.needs_mu_law([0.3, -1.0, 1.0]) is False and g.needs_mu_law([0.3, 1.01]) is True
    # a field's decision can be fixed by the caller
    assert g.tokenize_continuous([0.5], squash=True)[0] == 32710
    assert g.tokenize_continuous([2.0], squash=False)[0] == 33023          # clipped to 1
    assert g.tokenize_continuous(np.zeros((3, 4, 5))).shape == (3, 4, 5)


def test_bin_edges_and_1024_clamp():
    k = np.array([0, 1, 511, 512, 1000, 1023])
    edges = -1.0 + k / 512.0                                  # left edge of bin k
    np.testing.assert_array_equal(g.discretize(edges), 32000 + k)
    np.testing.assert_array_equal(g.discretize(edges[1:] - 1e-9), 32000 + k[1:] - 1)
    assert g.discretize(1.0) == 33023 and g.discretize(5.0) == 33023  # never bin 1024 ('|')
    assert g.discretize(-7.0) == 32000
    big = g.tokenize_continuous(np.array([1e9, -1e9, np.inf]))
    np.testing.assert_array_equal(big, [33023, 32000, 33023])
    with pytest.raises(ValueError, match="NaN"):
        g.tokenize_continuous([np.nan])


def test_detokenize_through_bin_centres():
    assert g.bin_centers(32768) == 0.5009765625                     # (768 + 0.5) / 512 - 1
    assert g.detokenize_continuous(32768, squash=False) == 0.5009765625
    assert g.detokenize_continuous(32744, squash=True) == pytest.approx(0.9941448370964538)
    a = np.random.default_rng(0).uniform(-1, 1, 5000)
    err = np.abs(g.detokenize_continuous(g.tokenize_continuous(a), squash=False) - a)
    assert err.max() <= 1 / 1024 + 1e-12                            # half a bin, not ~0.01
    for bad in ([31999], [g.SEPARATOR]):
        with pytest.raises(ValueError, match="continuous tokens"):
            g.detokenize_continuous(np.array(bad), squash=False)


def test_discrete_and_text():
    np.testing.assert_array_equal(g.tokenize_discrete([0, 5, 1023]), [0, 5, 1023])
    for bad in ([-1], [1024], [0.5]):
        with pytest.raises(ValueError, match=r"\[0, 1024\)"):
            g.tokenize_discrete(bad)
    np.testing.assert_array_equal(g.tokenize_text("ab", lambda s: [ord(c) for c in s]), [97, 98])
    with pytest.raises(ValueError, match="text_tokenizer"):
        g.tokenize_text("x", None)
    with pytest.raises(ValueError, match=r"\[0, 32000\)"):
        g.tokenize_text("x", lambda s: [32000])


def test_image_patches_normalisation_and_order():
    img = np.zeros((32, 48, 3), np.uint8)
    img[:16, 16:32] = 255
    img[16:, :16] = 51
    img[16 + 2, 16 + 5, 1] = 255                         # one pixel of patch 4 (row 1, col 1)
    p = g.image_patches(img)
    assert p.shape == (6, 16 * 16 * 3)                    # raster order of 2 x 3 patches
    np.testing.assert_allclose(p[0], -0.25)               # 0 -> -1, / sqrt(16) = 4
    np.testing.assert_allclose(p[1], 0.25)                # 255 -> +1, / 4
    np.testing.assert_allclose(p[3], -0.15, atol=1e-6)    # 51 -> 51/255*2-1 = -0.6, / 4
    assert p[4][(2 * 16 + 5) * 3 + 1] == 0.25 and np.count_nonzero(p[4] != -0.25) == 1
    with pytest.raises(ValueError, match="multiple of the 16x16"):
        g.image_patches(np.zeros((20, 32, 3), np.uint8))


def test_patch_intervals_and_positions():
    iv = g.patch_intervals(32, 48)                        # 2 rows, 3 columns of patches
    np.testing.assert_array_equal(iv, [[0, 64, 0, 42], [0, 64, 42, 85], [0, 64, 85, 128],
                                       [64, 128, 0, 42], [64, 128, 42, 85], [64, 128, 85, 128]])
    # evaluation: the rounded mean of the interval (App. C.3): 21, 63.5 -> 64, 106.5 -> 107
    np.testing.assert_array_equal(g.patch_positions(iv)[:3], [[32, 21], [32, 64], [32, 107]])
    # training: uniform over [from, to)
    rng = np.random.default_rng(0)
    draws = np.stack([g.patch_positions(iv, rng) for _ in range(3000)])   # (3000, 6, 2)
    assert (draws[:, :, 0] >= iv[:, 0]).all() and (draws[:, :, 0] < iv[:, 1]).all()
    assert set(draws[:, 2, 1]) == set(range(85, 128))


# ---- layout (Sec. 2.1) and local positions (App. C.3) -------------------------------------------
TOK = lambda s: [ord(c) for c in s]  # noqa: E731  any text tokenizer callable


def test_layout_sorted_keys_separator_mask_positions():
    obs = {"b": {"y": np.array([[0.5, -0.5]]), "x": np.array([[3, 7]])}, "a": "hi"}
    act = np.array([[0.1, -0.2, 0.3]])
    out = g.layout_timestep(obs, act, text_tokenizer=TOK)
    # keys sorted: a (text), b/x (discrete), b/y (continuous); '|'; the action binned directly
    np.testing.assert_array_equal(out["tokens"][0], [104, 105, 3, 7, 32768, 32256, 33024,
                                                     32563, 32409, 32665])
    np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out["local_pos"], [0, 1, 2, 3, 4, 5, 512, 513, 513, 513])
    rev = {"a": "hi", "b": {"x": np.array([[3, 7]]), "y": np.array([[0.5, -0.5]])}}
    np.testing.assert_array_equal(g.layout_timestep(rev, act, text_tokenizer=TOK)["tokens"],
                                  out["tokens"])
    idx = g.layout_timestep(obs, act, text_tokenizer=TOK, action_positions="index")
    np.testing.assert_array_equal(idx["local_pos"], np.arange(10))
    part = g.layout_timestep(obs, None, text_tokenizer=TOK)            # while acting: up to '|'
    np.testing.assert_array_equal(part["tokens"], out["tokens"][:, :7])
    # images: placeholders in key order, patches aside; a discrete action
    img = np.zeros((2, 16, 32, 3), np.uint8)
    out = g.layout_timestep({"z": np.array([[5.0], [6.0]]), "img": img}, np.array([[4], [9]]))
    np.testing.assert_array_equal(out["tokens"][:, :2], -1)
    np.testing.assert_array_equal(out["tokens"][:, 3:], [[33024, 4], [33024, 9]])
    assert out["patches"][0].shape == (2, 2, 768)


def test_mu_law_rule_is_per_field_in_a_task():
    data = _fake_data()
    task = g.Task("fake", data, g.Args(filter_frac=0.0))
    assert task.squash == {"observation": True, "action": False}
    a = data["actions"].astype(np.float64)
    np.testing.assert_array_equal(task.tokens[:, -2:], 32000 + np.floor((a + 1) * 512))
    i = 37                                                # the layout of one row, batched or not
    one = g.layout_timestep(data["observations"][i:i + 1], data["actions"][i:i + 1], task.squash)
    np.testing.assert_array_equal(task.tokens[i], one["tokens"][0])


# ---- data: the expert filter (Sec. 3.1) and prompted batches (Sec. 2.3) -------------------------
def _fake_data(n_eps=10, length=20, obs_dim=3, act_dim=2, seed=0):
    """Episode i returns i; observation 0 / 1 = episode / step + 2 (distinct tokens per row)."""
    rng = np.random.default_rng(seed)
    n = n_eps * length
    obs = rng.normal(size=(n, obs_dim))
    obs[:, 0] = np.repeat(np.arange(n_eps), length) + 2
    obs[:, 1] = np.tile(np.arange(length), n_eps) + 2
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    return dict(observations=obs.astype(np.float32),
                actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                rewards=np.repeat(np.arange(n_eps, dtype=np.float32), length) / length,
                terminals=np.zeros(n, bool), timeouts=timeouts)


def test_expert_return_window_and_filter():
    # W = min(1000, 0.1 N): N = 20 -> W = 2; N = 30000 -> W = 1000; N = 5 -> W = 1
    assert g.expert_return(np.arange(20.0)) == pytest.approx(18.5)
    assert g.expert_return(np.arange(30000.0)) == pytest.approx(29499.5)
    assert g.expert_return([1.0, 5.0, 3.0, 9.0, 2.0]) == pytest.approx(9.0)
    r = np.array([2.0, 9.0, 9.5, 10.0, 2.0] * 4)            # N = 20: W = 2, expert = 9.75
    np.testing.assert_array_equal(g.keep_episodes(r, g.expert_return(r), 0.8)[:5],
                                  [False, True, True, True, False])      # >= 7.8 kept
    np.testing.assert_array_equal(g.keep_episodes([7.99, 8.0, 9.0], 10.0, 0.8), [0, 1, 1])
    with pytest.raises(common.DatasetError, match="expert return -5.0"):
        g.keep_episodes([-9.0, -5.0], -5.0, 0.8, "halfcheetah")
    task = g.Task("fake", _fake_data(), g.Args())            # returns 0..9, W = 1, keep >= 7.2
    np.testing.assert_array_equal(task.starts // 20, [8, 9])
    assert task.expert_return == pytest.approx(9.0)


def _row_steps(task, row, length=16):
    """(episode, step) of each whole timestep of a batch row."""
    lookup = {tuple(t): i for i, t in enumerate(task.tokens)}
    steps = [lookup[tuple(row[j: j + task.n_t])] for j in range(0, len(row), task.n_t)]
    return [divmod(s, length) for s in steps]


def test_prompt_rate_placement_and_end_sampling():
    data = _fake_data(n_eps=8, length=16)
    args = g.Args(filter_frac=0.5, seq_len=48, batch_size=16)   # 6 tokens / step: 8 steps, p = 4
    task = g.Task("fake", data, args)                            # keeps episodes 4..7
    gen = torch.Generator().manual_seed(0)
    split, end_first, end_second, episodes = 0, 0, 0, set()
    for _ in range(40):
        tok, pos, _ = g.sample_batch([task], args, gen)
        np.testing.assert_array_equal(pos, np.tile(task.local_pos, (16, 8)))
        for b in range(16):
            steps = _row_steps(task, tok[b])
            assert all(e >= 4 for e, _ in steps)                 # only kept episodes
            contiguous = [steps[i + 1] == (steps[i][0], steps[i][1] + 1) for i in range(7)]
            if b >= 4:                                           # 75%: one episode window
                assert all(contiguous)
                continue
            assert all(contiguous[:3]) and all(contiguous[4:])   # [prompt 4 | window 4]
            split += not contiguous[3]
            episodes |= {steps[0][0]}
            end_first += steps[3][1] == 15
            end_second += steps[7][1] == 15
    assert split >= 150                                          # of 160 prompted rows
    assert 0.4 < end_first / 160 < 0.7                           # half the prompts end episodes
    assert end_second / 160 < 0.2                                # windows seldom do
    assert episodes == {4, 5, 6, 7}                              # prompts from any kept one


def test_loss_mask_only_actions_shifted_by_one():
    data = _fake_data(n_eps=4, length=5)                        # 5-step episodes: padding
    args = g.Args(filter_frac=0.0, seq_len=40, batch_size=6, n_layer=1, n_embd=16, n_head=2,
                  dropout=0.0, vocab="action")
    task = g.Task("fake", data, args)
    tok, pos, tgt = g.sample_batch([task], args, torch.Generator().manual_seed(1))
    is_action = (tok >= 32000) & (tok < 33024) & (np.arange(40) % 6 >= 4)  # slots 4, 5 of a step
    want = np.flatnonzero(is_action[:, 1:].reshape(-1))         # prediction t -> token t + 1
    np.testing.assert_array_equal(tgt, want)
    torch.manual_seed(0)
    model = g.GatoModel(args)
    t, p = torch.as_tensor(tok), torch.as_tensor(pos)
    logits = model(t, p)[:, :-1] @ model.tok_emb.weight[:1024].T  # (B, L-1, 1024) bins
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024)[want],
                                            t[:, 1:].reshape(-1)[want] - 32000)
    torch.testing.assert_close(model.loss(model(t, p), t, torch.as_tensor(tgt)), ref)


# ---- model (App. C.1) and control (Sec. 2.4) ----------------------------------------------------
def test_shared_embedding_and_parameter_count():
    with torch.device("meta"):
        full = g.GatoModel(g.Args())
    # 79M setting, one table for input and output: 33026*768 + 514*768 + 8 * 7,087,872 + 1536
    assert sum(p.numel() for p in full.parameters()) == 82_463_232
    model = g.GatoModel(g.Args(n_layer=1, n_embd=16, n_head=2, vocab="action"))
    assert model.tok_emb.num_embeddings == 1026
    h = torch.randn(3, 16)
    torch.testing.assert_close(model.logits(h), h @ model.tok_emb.weight[:1024].T)


def test_causal_attention():
    torch.manual_seed(0)
    model = g.GatoModel(g.Args(n_layer=2, n_embd=16, n_head=2, dropout=0.0, vocab="action"))
    tok, pos = torch.randint(32000, 33024, (2, 9)), torch.arange(9).repeat(2, 1)
    later = tok.clone()
    later[:, 6:] = 32000 + (later[:, 6:] - 31999) % 1024          # change tokens 6.. only
    with torch.no_grad():
        a, b = model(tok, pos), model(later, pos)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def _meta(n_obs=3, n_act=2, steps=6):
    n_t = n_obs + 1 + n_act
    prompt = 32000 + np.arange(steps * n_t).reshape(steps, n_t) % 1024
    prompt[:, n_obs] = g.SEPARATOR
    return dict(n_obs=n_obs, n_act=n_act, n_t=n_t, prompt=torch.tensor(prompt),
                squash_obs=True, squash_act=False, random_return=0.0, expert_return=1.0)


def test_eval_prompt_and_sliding_context():
    data = _fake_data()
    args = g.Args(filter_frac=0.0, seq_len=30, eval_episodes=1, eval_max_steps=1)  # 5 steps fit
    meta = g.task_meta(g.Task("hopper", data, args), args)
    prompt = meta["prompt"].numpy()
    steps = _row_steps(g.Task("fake", data, args), prompt.reshape(-1), 20)
    assert [s for _, s in steps] == [0, 1, 2, 3, 4]            # the first floor(L / n_t) steps
    torch.manual_seed(0)
    model = g.GatoModel(dataclasses.replace(args, n_layer=1, n_embd=16, n_head=2)).eval()
    pol = g.GatoPolicy(model, meta, dataclasses.replace(args, temperature=0.0))
    pol.reset(2)
    obs = data["observations"][:2]
    tok, pos = pol.context(obs)
    cur = g.layout_timestep(obs, None, pol.squash)["tokens"]
    np.testing.assert_array_equal(tok, np.concatenate([np.tile(prompt[1:].reshape(-1), (2, 1)),
                                                       cur], 1))   # 4 prompt steps + '|'
    np.testing.assert_array_equal(pos, np.r_[np.tile(pol.step_pos, 4), pol.step_pos[:4]])
    act = pol(obs)
    tok, _ = pol.context(obs)
    np.testing.assert_array_equal(tok[:, :18], np.tile(prompt[2:].reshape(-1), (2, 1)))
    np.testing.assert_array_equal(tok[:, 18:22], cur)           # then the step just taken
    np.testing.assert_array_equal(g.tokenize_continuous(act, squash=False), tok[:, 22:24])


@pytest.mark.parametrize("positions", ["shared", "index"])
def test_kv_cache_equals_full_forward(positions):
    torch.manual_seed(0)
    args = g.Args(n_layer=2, n_embd=32, n_head=4, dropout=0.0, vocab="action", seq_len=24,
                  temperature=0.0, action_positions=positions)
    model = g.GatoModel(args).eval()
    tok, pos = torch.randint(32000, 33024, (3, 10)), torch.arange(10).repeat(3, 1)
    with torch.no_grad():
        caches = [[None, None] for _ in model.blocks]
        h = [model(tok[:, :7], pos[:, :7], caches)] + [
            model(tok[:, j:j + 1], pos[:, j:j + 1], caches) for j in range(7, 10)]
        torch.testing.assert_close(torch.cat(h, 1), model(tok, pos), atol=1e-5, rtol=1e-5)
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    acts = []
    for cache in (True, False):
        pol = g.GatoPolicy(model, _meta(n_act=4), args, kv_cache=cache)
        pol.reset(5)
        acts.append(np.stack([pol(obs) for _ in range(3)]))
    np.testing.assert_array_equal(acts[0], acts[1])
    assert acts[0].shape == (3, 5, 4) and np.abs(acts[0]).max() < 1.0


def test_gato_score_subtracts_random():
    np.testing.assert_allclose(g.gato_score([60.0, 180.0, -20.0], -20.0, 180.0), [40, 100, 0])


# ---- a run: training, resume, eval-only, and load_policy from two copied files -------------------
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "48", "--batch-size",
        "4", "--vocab", "action", "--eval-episodes", "2", "--eval-max-steps", "5", "--warmup-steps",
        "100", "--lr", "1e-3", "--no-cuda", "--dropout", "0.1", "--filter-frac", "0.0"]

SCRIPT = """import sys, gymnasium, numpy as np
from gato_tokens import load_policy
policy = load_policy(sys.argv[1], env="hopper", temperature=0.0)
env = gymnasium.make("Hopper-v5")
obs, _ = env.reset(seed=0)
policy.reset(1)
acts = []
for _ in range(6):
    acts.append(policy(obs[None].astype(np.float32))[0])
    obs, r, term, trunc, _ = env.step(acts[-1])
np.save(sys.argv[2], np.array(acts))
"""


def test_run_resume_eval_only_and_load_policy(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                  # runs/ goes here
    paths = ",".join(str(tiny_dataset(e, "random", 1000)) for e in ("hopper", "halfcheetah"))
    base = TINY + ["--dataset-path", paths]
    full = g.main(base + ["--total-steps", "12", "--eval-every", "12"])
    ckpt = str(Path(full["checkpoint"]).resolve())
    assert np.isfinite([full["eval/hopper/gato_score"], full["eval/halfcheetah/return_mean"]]).all()
    half = g.main(base + ["--total-steps", "6", "--eval-every", "6"])
    res = g.main(base + ["--total-steps", "12", "--eval-every", "12",
                         "--resume", half["checkpoint"]])
    sa, sc = (common.load_checkpoint(r["checkpoint"])["model"] for r in (full, res))
    for k in sa:                                                 # 12 straight == 6 + resume 6
        torch.testing.assert_close(sa[k], sc[k], rtol=0, atol=0)
    ev = g.main(["--eval-only", "--checkpoint", full["checkpoint"], "--env", "halfcheetah",
                 "--eval-episodes", "2", "--eval-max-steps", "5", "--no-cuda",
                 "--temperature", "0"])
    assert "eval/halfcheetah/gato_score" in ev and "eval/hopper/gato_score" not in ev
    with pytest.raises(ValueError, match="learned hopper"):
        g.main(["--eval-only", "--checkpoint", full["checkpoint"], "--env", "walker2d"])
    with pytest.raises(ValueError, match="one per task"):
        g.main(TINY + ["--dataset-path", paths.split(",")[0], "--total-steps", "1"])
    # README's "copy two files and act": only gato_tokens.py and common.py, in a fresh folder
    work = tmp_path / "two_files"
    work.mkdir()
    for f in ("gato_tokens.py", "common.py"):
        shutil.copy(ROOT / f, work / f)
    (work / "act.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", SEQRL_DATA_DIR=str(common.data_dir()))
    subprocess.run([sys.executable, "act.py", ckpt, str(tmp_path / "a.npy")],
                   cwd=work, env=env, check=True, timeout=120)
    outside = np.load(tmp_path / "a.npy")
    policy = g.load_policy(ckpt, env="hopper", temperature=0.0)
    e = common.make_env("hopper")
    obs, _ = e.reset(seed=0)
    policy.reset(1)
    inside = []
    for _ in range(6):
        inside.append(policy(obs[None].astype(np.float32))[0])
        obs, *_ = e.step(inside[-1])
    assert outside.shape == (6, 3) and np.isfinite(outside).all()
    np.testing.assert_allclose(outside, np.array(inside), atol=1e-5)
