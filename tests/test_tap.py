"""tap.py: VQ straight-through + EMA codebook, causal decoding of code prefixes, prior
causality, the planner's objective and actions, and smoke runs with save / resume / eval-only."""
import math

import numpy as np
import pytest
import torch

import common
import tap

TINY = ["--n-embd", "32", "--code-dim", "16", "--n-codes", "32", "--n-layer", "1", "--n-head", "2",
        "--prior-n-embd", "32", "--prior-n-layer", "1", "--batch-size", "16", "--beam-width", "4",
        "--n-expand", "2", "--n-samples", "8", "--eval-episodes", "2", "--max-episode-steps", "4",
        "--log-every", "5"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run much faster (and steadier on a busy machine) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(**kw):
    a = tap.Args(n_embd=32, code_dim=16, n_codes=32, n_layer=2, n_head=2, prior_n_embd=32, prior_n_layer=2)
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_straight_through_gradient_and_quantized_values():
    torch.manual_seed(0)
    cb = tap.EMACodebook(8, 4, decay=0.99).eval()
    cb.embedding.copy_(torch.randn(8, 4))
    z = torch.randn(3, 5, 4, requires_grad=True)
    z_st, z_q, idx = cb(z)
    # forward: the nearest codebook vector
    d = ((z.detach()[..., None, :] - cb.embedding) ** 2).sum(-1)
    assert torch.equal(idx, d.argmin(-1))
    assert torch.allclose(z_st, cb.embedding[idx]) and torch.allclose(z_q, cb.embedding[idx])
    # backward: identity to the encoder output (straight-through), no gradient into the codebook
    w = torch.randn_like(z)
    (z_st * w).sum().backward()
    assert torch.allclose(z.grad, w)
    assert not cb.embedding.requires_grad


def test_ema_codebook_update():
    K, D, decay = 4, 3, 0.9
    cb = tap.EMACodebook(K, D, decay)
    cb.embedding.copy_(torch.eye(K, D) * 10)
    cb.ema_w.copy_(cb.embedding)
    old = cb.embedding.clone()
    z = torch.tensor([[[9.0, 0.5, 0.0], [11.0, -0.5, 0.0], [0.2, 9.5, 0.0]]])  # 2 x code 0, 1 x code 1
    cb.eval()(z)
    assert torch.equal(cb.embedding, old), "no EMA update in eval mode"
    cb.train()(z)
    cnt0, cnt1 = decay + (1 - decay) * 2, decay + (1 - decay) * 1
    w0 = decay * old[0] + (1 - decay) * (z[0, 0] + z[0, 1])
    w1 = decay * old[1] + (1 - decay) * z[0, 2]
    assert torch.allclose(cb.embedding[0], w0 / cnt0, atol=1e-6)
    assert torch.allclose(cb.embedding[1], w1 / cnt1, atol=1e-6)
    assert torch.allclose(cb.embedding[2:], old[2:], atol=1e-6), "unused codes keep their vector"
    assert torch.allclose(cb.ema_count, torch.tensor([cnt0, cnt1, decay, decay]))


def test_decoding_a_code_prefix_equals_prefix_of_full_decoding():
    torch.manual_seed(0)
    a = tiny_args()
    m = tap.VQVAE(11, 3, a).eval()
    m.codebook.embedding.normal_()
    idx = torch.randint(0, a.n_codes, (4, a.seq_len // a.latent_step))
    s = torch.randn(4, 11)
    full = m.decode_codes(idx, s)  # (4, 24, 17)
    assert full.shape == (4, a.seq_len, 11 + 3 + 3)
    for k in range(1, idx.shape[1]):
        part = m.decode_codes(idx[:, :k], s)
        assert torch.allclose(part, full[:, : k * a.latent_step], atol=1e-5), k
    # and a later code never changes earlier steps
    idx2 = idx.clone()
    idx2[:, 3] = (idx2[:, 3] + 1) % a.n_codes
    other = m.decode_codes(idx2, s)
    assert torch.allclose(other[:, :9], full[:, :9], atol=1e-5) and not torch.allclose(other[:, 9:12], full[:, 9:12])


def test_encoder_is_causal_per_code():
    torch.manual_seed(0)
    a = tiny_args()
    m = tap.VQVAE(11, 3, a).eval()
    x = torch.randn(2, a.seq_len, 17)
    z = m.encode(x)  # (2, 8, code_dim)
    x2 = x.clone()
    x2[:, 10] += 1.0  # step 10 lies in code 3 (steps 9..11)
    z2 = m.encode(x2)
    assert torch.allclose(z[:, :3], z2[:, :3], atol=1e-6)
    assert not torch.allclose(z[:, 3], z2[:, 3])


def test_prior_is_causal_and_state_conditioned():
    torch.manual_seed(0)
    a = tiny_args()
    p = tap.Prior(11, a).eval()
    idx = torch.randint(0, a.n_codes, (3, 6))
    s = torch.randn(3, 11)
    logits = p(idx, s)  # (3, 7, K)
    assert logits.shape == (3, 7, a.n_codes)
    idx2 = idx.clone()
    idx2[:, 4:] = (idx2[:, 4:] + 5) % a.n_codes
    logits2 = p(idx2, s)
    # position j predicts code j from codes < j: positions 0..4 must not see codes 4, 5
    assert torch.allclose(logits[:, :5], logits2[:, :5], atol=1e-5)
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])
    assert torch.allclose(p(idx[:, :2], s), logits[:, :3], atol=1e-5)  # incremental == full
    assert not torch.allclose(p(idx, s + 1.0)[:, 0], logits[:, 0]), "the state conditions every position"


def test_objective_clamps_prior_log_likelihood():
    stats = {"mean": torch.zeros(17), "std": torch.ones(17)}
    pred = torch.zeros(3, 6, 17)
    pred[..., -3] = 1.0  # reward 1 at every step
    pred[:, -1, -2] = 10.0  # terminal value
    cap = 5 * math.log(0.05)
    logp = torch.tensor([cap + 3.0, cap, cap - 2.0])
    obj = tap.plan_objective(pred, logp, stats, 0.9, 5, 0.05, 500.0)
    ret = sum(0.9 ** t for t in range(6)) + 0.9 ** 6 * 10.0
    # above the threshold the bonus is capped (same objective); below it, -500 per nat
    assert torch.allclose(obj, torch.tensor([ret + 500 * cap, ret + 500 * cap, ret + 500 * (cap - 2.0)]))


@pytest.mark.parametrize("planner", ["beam", "sample"])
def test_planner_returns_valid_actions(planner):
    torch.manual_seed(0)
    a = tiny_args(planner=planner, beam_width=4, n_expand=3, n_samples=8)
    vq, pr = tap.VQVAE(11, 3, a), tap.Prior(11, a)
    vq.codebook.embedding.normal_()
    stats = dict(mean=np.zeros(16, np.float32), std=np.full(16, 3.0, np.float32))  # actions spread past the bounds
    low, high = -np.ones(3) * 0.5, np.ones(3)
    P = tap.Planner(vq, pr, stats, a, low, high, torch.device("cpu"))
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    act = P(obs)
    assert act.shape == (5, 3) and torch.isfinite(act).all()
    assert (act >= torch.tensor(low, dtype=torch.float32)).all() and (act <= 1.0).all()
    assert not vq.training and not pr.training
    # the plan is one of the candidates: its first action equals the decoded first action of its codes
    s = (torch.as_tensor(obs) - P.stats["mean"][:11]) / P.stats["std"][:11]
    plan = P.beam(s) if planner == "beam" else P.sample(s)
    assert plan.shape == (5, 17)


def test_cached_decoder_and_prior_match_full_passes():
    torch.manual_seed(0)
    a = tiny_args()
    vq, pr = tap.VQVAE(11, 3, a).eval(), tap.Prior(11, a).eval()
    vq.codebook.embedding.normal_()
    idx, s = torch.randint(0, a.n_codes, (3, 5)), torch.randn(3, 11)
    full = vq.decode_codes(idx, s)
    logits_full = pr(idx[:, :4], s)  # (3, 5, K)
    d_cache = p_cache = None
    for k in range(5):
        out, d_cache = vq.decode_next(vq.codebook.embedding[idx[:, k]], s, d_cache)
        assert torch.allclose(out, full[:, 3 * k: 3 * k + 3], atol=1e-5), k
        lg, p_cache = pr.next_logits(None if k == 0 else idx[:, k - 1], s, p_cache)
        assert torch.allclose(lg, logits_full[:, k], atol=1e-5), k


def reference_beam(P, s):
    """The official beam_with_prior, re-decoding every prefix from scratch (no caches)."""
    a, E = P.a, s.shape[0]
    idx, logp, n_beam = torch.zeros(E, 0, dtype=torch.long), torch.zeros(E, 1), 1
    for k in range(P.n_plan):
        n = a.beam_width * a.n_expand if k == 0 else a.n_expand
        codes, lp = P._draw(P.prior(idx, s.repeat_interleave(n_beam, 0))[:, -1], n)
        idx = torch.cat([idx.repeat_interleave(n, 0), codes.reshape(-1, 1)], 1)
        logp = (logp.reshape(-1, 1) + lp).reshape(E, -1)
        pred = P.vqvae.decode_codes(idx, s.repeat_interleave(n_beam * n, 0))
        score = tap.plan_objective(pred, logp.reshape(-1), P.stats, a.discount, P.n_plan, a.prob_threshold,
                                   a.prob_weight)
        top = score.view(E, -1).topk(a.beam_width if k < P.n_plan - 1 else 1, 1).indices
        flat = (top + torch.arange(E)[:, None] * (n_beam * n)).reshape(-1)
        idx, logp, pred, n_beam = idx[flat], logp.gather(1, top), pred[flat], top.shape[1]
    return pred[:, 0]


def test_cached_beam_search_equals_official_recomputation():
    torch.manual_seed(0)
    a = tiny_args(beam_width=6, n_expand=3, horizon=12, prob_threshold=0.2)
    vq, pr = tap.VQVAE(11, 3, a), tap.Prior(11, a)
    vq.codebook.embedding.normal_()
    for p in pr.parameters():  # a peaked prior, so the likelihood cap matters
        p.data.mul_(20)
    stats = dict(mean=np.zeros(16, np.float32), std=np.ones(16, np.float32))
    P = tap.Planner(vq, pr, stats, a, -np.ones(3), np.ones(3), torch.device("cpu"))
    s = torch.randn(4, 11)
    P.gen.manual_seed(1)
    fast = P.beam(s)
    P.gen.manual_seed(1)
    ref = reference_beam(P, s)
    assert torch.allclose(fast, ref, atol=1e-4)


def test_beam_keeps_the_best_objective():
    """With a flat prior (every candidate above the cap), the beam returns the candidate of highest return."""
    torch.manual_seed(0)
    a = tiny_args(beam_width=64, n_expand=1, horizon=3, n_codes=32, prob_threshold=1e-9)
    vq, pr = tap.VQVAE(11, 3, a).eval(), tap.Prior(11, a).eval()
    vq.codebook.embedding.normal_()
    stats = dict(mean=np.zeros(16, np.float32), std=np.ones(16, np.float32))
    P = tap.Planner(vq, pr, stats, a, -np.ones(3), np.ones(3), torch.device("cpu"))
    s = torch.randn(1, 11)
    first = P.beam(s)  # (1, D)
    allc = vq.decode_codes(torch.arange(32)[:, None], s.expand(32, -1))  # every 1-code plan, (32, 3, D)
    obj = tap.plan_objective(allc, torch.zeros(32), P.stats, a.discount, 1, a.prob_threshold, a.prob_weight)
    chosen = (allc[:, 0] - first).abs().sum(1).argmin()
    assert torch.allclose(allc[chosen, 0], first[0], atol=1e-5)
    # 64 prior samples over 32 codes: the chosen plan is one of the best few (the best unless it was never drawn)
    assert (obj > obj[chosen] + 1e-5).sum() <= 3


def test_chunks_value_target_and_padding(tiny_dataset):
    a = tiny_args()
    data = common.load_dataset("hopper", path=tiny_dataset())
    ch = tap.ChunkData(data, a, torch.device("cpu"))
    ep = common.split_episodes(data)[0]
    n, mean, std = len(ep["rewards"]), ch.stats["mean"], ch.stats["std"]
    raw = ch.joined[:n].numpy() * std + mean
    r = ep["rewards"].astype(np.float64).copy()
    if ep["terminals"][-1]:
        r[-1] = -100.0
    v0 = sum(0.99 ** k * r[1 + k] for k in range(n - 1))  # R_0 excludes r_0 (TT)
    assert np.isclose(raw[0, -1], v0, rtol=1e-4, atol=1e-3) and np.isclose(raw[-1, -1], 0.0, atol=1e-3)
    assert np.allclose(raw[:, -2], r, atol=1e-3)
    assert (ch.done[:n] == 0).all() and (ch.done[n: n + a.seq_len - 1] == 1).all()
    g = torch.Generator().manual_seed(0)
    x, mask = ch.sample(32, g)
    assert x.shape == (32, a.seq_len, 11 + 3 + 3) and torch.equal(mask, 1 - x[..., -1])


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """One tiny run of both stages (20 VQ-VAE steps, 10 prior steps) with a final evaluation."""
    d = tmp_path_factory.mktemp("tap")
    base = ["--dataset-path", str(tiny_dataset()), *TINY]
    m = tap.main(base + ["--total-steps", "20", "--prior-steps", "10", "--run-dir", str(d / "a")])
    return dict(base=base, dir=d, metrics=m)


def test_smoke_both_stages_then_exact_resume(trained):
    base, d, a = trained["base"], trained["dir"], trained["metrics"]
    assert a["vq_step"] == 20 and a["prior_step"] == 10
    assert np.isfinite(a["eval/return_mean"]) and np.isfinite(a["losses/prior_nll"])
    assert (d / "a" / "metrics.jsonl").exists() and (d / "a" / "args.json").exists()
    # 10 VQ-VAE steps, save, then resume to 20 VQ-VAE + 10 prior steps == the straight run (same seed, CPU)
    tap.main(base + ["--stage", "vqvae", "--total-steps", "10", "--run-dir", str(d / "b")])
    b = tap.main(base + ["--total-steps", "20", "--prior-steps", "10", "--resume", str(d / "b" / "checkpoint.pt"),
                         "--run-dir", str(d / "b2")])
    sa = torch.load(a["checkpoint"], weights_only=False)
    sb = torch.load(b["checkpoint"], weights_only=False)
    assert (sb["vq_step"], sb["prior_step"]) == (20, 10)
    for part in ("vqvae", "prior"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    assert b["eval/return_mean"] == a["eval/return_mean"]


def test_prior_stage_alone_and_eval_only(trained, tmp_path):
    base, a = trained["base"], trained["metrics"]
    m = tap.main(base + ["--stage", "prior", "--prior-steps", "5", "--checkpoint", a["checkpoint"],
                         "--run-dir", str(tmp_path / "p")])
    assert m["prior_step"] == 5 and np.isfinite(m["eval/return_mean"])
    sa = torch.load(a["checkpoint"], weights_only=False)
    sp = torch.load(m["checkpoint"], weights_only=False)
    assert all(torch.equal(v, sp["vqvae"][k]) for k, v in sa["vqvae"].items()), "the prior stage keeps the VQ-VAE"
    e = tap.main(base + ["--eval-only", "--checkpoint", m["checkpoint"], "--planner", "sample"])
    assert np.isfinite(e["eval/normalized_score"])


def test_bad_inputs_fail_clearly(trained, tmp_path):
    with pytest.raises(ValueError, match="--stage"):
        tap.main(["--stage", "nope"])
    with pytest.raises(ValueError, match="--checkpoint"):
        tap.main(["--stage", "prior"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError):
        tap.main(["--eval-only", "--checkpoint", str(bad)])
    with pytest.raises(ValueError, match="obs/act dims"):
        tap.main(["--eval-only", "--checkpoint", trained["metrics"]["checkpoint"], "--env", "halfcheetah"])
