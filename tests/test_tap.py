"""tap.py against the paper / official code: sizes, data targets, VQ-VAE losses and codebook,
causal encoding and decoding, the prior's conditioning, the planning objective and both planners
against hand-written references, and runs (resume, fresh prior, eval-only, two-file policy)."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import tap

TINY = ["--n-embd", "32", "--code-dim", "16", "--n-codes", "32", "--n-layer", "1",
        "--batch-size", "16", "--beam-width", "4", "--eval-episodes", "2", "--eval-max-steps", "4",
        "--no-cuda"]
GAMMA = 0.99


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models run faster, and in-process runs are bit-for-bit
    repeatable (the exact-resume comparison needs that; 2 threads may reorder reductions)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(**kw):
    base = dict(n_embd=32, code_dim=16, n_codes=32, n_layer=2, horizon=12, beam_width=6)
    return tap.Args(**{**base, **kw})


def tiny_models(obs_dim=11, act_dim=3, **kw):
    torch.manual_seed(0)
    args = tiny_args(**kw)
    vq, pr = tap.VQVAE(obs_dim, act_dim, args).eval(), tap.Prior(obs_dim, args).eval()
    vq.codebook.embedding.normal_()
    for pos in (vq.pos_emb, pr.pos_emb):  # zero at init: every step of a code would decode alike
        pos.data.normal_()
    return args, vq, pr


def stats16(r_mean=1.0, r_std=2.0, v_mean=50.0, v_std=10.0):
    mean, std = torch.zeros(16), torch.full((16,), 0.5)
    mean[11:14], std[11:14] = torch.tensor([0.3, -0.2, 0.1]), 10.0  # actions spread past [-1, 1]
    mean[-2], std[-2], mean[-1], std[-1] = r_mean, r_std, v_mean, v_std
    return dict(mean=mean, std=std)


def test_official_sizes_and_constants():
    args = tap.Args()
    assert (args.n_embd, args.n_layer, args.code_dim, args.n_codes, args.latent_step) == (
        512, 4, 512, 512, 3)  # official n_embd * n_head = 128 * 4, trajectory_embd, K
    assert (args.horizon, args.beam_width, args.batch_size, args.lr) == (15, 64, 512, 2e-4)
    assert (tap.SEQ_LEN, tap.N_HEAD, tap.DROPOUT, tap.EMA_DECAY, tap.ACTION_WEIGHT) == (
        24, 4, 0.1, 0.99, 5.0)
    assert (tap.DISCOUNT, tap.PENALTY, tap.N_EXPAND, tap.PROB_THRESHOLD, tap.PROB_WEIGHT) == (
        0.99, -100.0, 4, 0.05, 500.0)
    assert (tap.N_SAMPLES, tap.ROUNDS, tap.WEIGHT_DECAY, tap.GRAD_CLIP) == (4096, 2, 0.1, 1.0)
    # parameter counts of the official VQContinuousVAE / TransformerPrior on hopper (11 / 3),
    # from their layer shapes by hand: blocks 12 C^2 + 13 C, embed, pos 24 C, cast, mixing, ...
    assert sum(p.numel() for p in tap.VQVAE(11, 3, args).parameters()) == 25_781_265
    assert sum(p.numel() for p in tap.Prior(11, args).parameters()) == 13_145_088


def toy_data():
    """Two episodes: 5 steps ending in a true terminal, 4 steps ending in a timeout."""
    rng = np.random.default_rng(0)
    r = np.array([1, 2, 3, 4, 5, 1, 1, 1, 1], np.float32)
    term, tout = np.zeros(9, bool), np.zeros(9, bool)
    term[4], tout[8] = True, True
    return dict(observations=rng.normal(size=(9, 11)).astype(np.float32),
                actions=rng.normal(size=(9, 3)).astype(np.float32), rewards=r, terminals=term,
                timeouts=tout)


def test_chunks_targets_statistics_and_padding():
    data = toy_data()
    ch = tap.ChunkData(data, torch.device("cpu"))
    mean, std = ch.stats["mean"].numpy(), ch.stats["std"].numpy()
    # reward statistics of the raw rewards, BEFORE the -100 penalty (official): 19/9, sqrt(170)/9
    assert np.isclose(mean[-2], 19 / 9) and np.isclose(std[-2], np.sqrt(170) / 9)
    r1 = [1, 2, 3, 4, -100]  # the terminal reward replaced by -100
    values = [sum(GAMMA ** k * r1[t + 1 + k] for k in range(4 - t)) for t in range(5)]
    values += [sum(GAMMA ** k for k in range(3 - t)) for t in range(4)]  # R_t excludes r_t
    assert np.isclose(values[0], 2 + 0.99 * 3 + 0.99 ** 2 * 4 - 0.99 ** 3 * 100)
    assert np.isclose(mean[-1], np.mean(values)) and np.isclose(std[-1], np.std(values))
    assert np.allclose(mean[:11], data["observations"].mean(0), atol=1e-6)
    raw = ch.rows[:, :-1].numpy() * std + mean
    real = np.r_[0:5, 28:32]  # each episode followed by 23 padding rows
    assert np.allclose(raw[real, :11], data["observations"], atol=1e-5)
    assert np.allclose(raw[real, 11:14], data["actions"], atol=1e-5)
    assert np.allclose(raw[real, -2], [1, 2, 3, 4, -100, 1, 1, 1, 1], atol=1e-4)
    assert np.allclose(raw[real, -1], values, atol=1e-4)
    pad = np.setdiff1d(np.arange(len(raw)), real)
    assert np.allclose(raw[pad], 0.0, atol=1e-4), "padding is the normalized zero vector"
    assert (ch.rows[real, -1] == 0).all() and (ch.rows[pad, -1] == 1).all()
    assert ch.starts.tolist() == [0, 1, 2, 3, 28, 29, 30]  # every start but an episode's last
    x, mask = ch.sample(32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 24, 17) and torch.equal(mask, 1 - x[..., -1])


def test_straight_through_and_nearest_code():
    torch.manual_seed(0)
    cb = tap.EMACodebook(8, 4).eval()
    cb.embedding.copy_(torch.randn(8, 4))
    z = torch.randn(3, 5, 4, requires_grad=True)
    z_st, z_q, idx = cb(z)
    d = ((z.detach()[..., None, :] - cb.embedding) ** 2).sum(-1)
    assert torch.equal(idx, d.argmin(-1))
    assert torch.allclose(z_st, cb.embedding[idx]) and torch.equal(z_q, cb.embedding[idx])
    w = torch.randn_like(z)
    (z_st * w).sum().backward()
    assert torch.allclose(z.grad, w), "straight-through: the gradient passes unchanged"


def test_ema_codebook_update():
    K, D, g = 4, 3, 0.99
    cb = tap.EMACodebook(K, D)
    cb.embedding.copy_(torch.eye(K, D) * 10)
    cb.ema_w.copy_(cb.embedding)
    old = cb.embedding.clone()
    z = torch.tensor([[[9.0, 0.5, 0.0], [11.0, -0.5, 0.0], [0.2, 9.5, 0.0]]])  # 2 x code 0, 1 x 1
    cb.eval()(z)
    assert torch.equal(cb.embedding, old), "no EMA update in eval mode"
    _, z_q, _ = cb.train()(z)
    n0, n1 = g + (1 - g) * 2, g + (1 - g) * 1
    e0 = (g * old[0] + (1 - g) * (z[0, 0] + z[0, 1])) / n0
    e1 = (g * old[1] + (1 - g) * z[0, 2]) / n1
    assert torch.allclose(cb.embedding[0], e0, atol=1e-6)
    assert torch.allclose(cb.embedding[1], e1, atol=1e-6)
    assert torch.allclose(cb.embedding[2:], old[2:], atol=1e-6), "unused codes keep their vector"
    assert torch.allclose(cb.ema_count, torch.tensor([n0, n1, g, g]))
    assert torch.allclose(z_q[0, 2], e1, atol=1e-6), "z_q: the codes after the update"


def test_vq_loss_is_the_official_weighted_loss():
    torch.manual_seed(0)
    m = tap.VQVAE(11, 3, tiny_args()).train()
    x = torch.randn(4, 24, 17)
    x[..., -1] = 0.0
    x[1, 15:, -1] = 1.0  # padding after step 15 of chunk 1
    mask = 1 - x[..., -1]
    old = m.codebook.embedding.clone()
    torch.manual_seed(1)
    z_e = m.encode(x).detach()  # the same dropout draws as inside loss()
    torch.manual_seed(1)
    mse, bce, commit, out = m.loss(x, mask)
    o, y, msk = out.detach().double().numpy(), x.double().numpy(), mask.double().numpy()
    w = np.r_[np.ones(11), np.full(3, 5.0), 1.0, 1.0]  # actions x5
    assert np.isclose(mse.item(), ((o[..., :-1] - y[..., :-1]) ** 2 * w * msk[..., None]).mean())
    p = 1 / (1 + np.exp(-o[..., -1]))  # BCE on the done probability over all steps
    ref = -(y[..., -1] * np.log(p) + (1 - y[..., -1]) * np.log(1 - p)).mean()
    assert np.isclose(bce.item(), ref, rtol=1e-5)
    idx = ((z_e[..., None, :] - old) ** 2).sum(-1).argmin(-1)
    after = ((z_e - m.codebook.embedding[idx]) ** 2).mean().item()
    before = ((z_e - old[idx]) ** 2).mean().item()
    assert np.isclose(commit.item(), after, rtol=1e-6), "commitment to the updated codes"
    assert not np.isclose(after, before, rtol=1e-4)
    m.eval()  # no dropout, no EMA update: the reconstruction decodes (codes, the FIRST state)
    _, _, _, out = m.loss(x, mask)
    z_q = m.codebook.embedding[m.codebook.indices(m.encode(x))]
    assert torch.allclose(out, m.decode(z_q, x[:, 0, :11]), atol=1e-6)


def test_prior_loss_is_the_nll_of_the_frozen_encoder_codes():
    args, vq, pr = tiny_models()
    for p in pr.parameters():  # a sharper prior: wrong targets change the loss clearly
        p.data.mul_(3)
    x = torch.randn(3, 24, 17)
    with torch.no_grad():
        vq.codebook.embedding.copy_(vq.encode(torch.randn(4, 24, 17)).flatten(0, 1))  # 32 codes
        z_e = vq.encode(x)  # (3, 8, code_dim)
        codes = ((z_e[..., None, :] - vq.codebook.embedding) ** 2).sum(-1).argmin(-1)
        s = x[:, 0, :11]
        nll = [-torch.log_softmax(pr(codes[:, :j], s)[:, j], -1)[torch.arange(3), codes[:, j]]
               for j in range(8)]  # code j from codes < j, one prefix at a time
        assert len(codes.unique()) > 4
        assert np.isclose(tap.prior_loss(pr, vq, x).item(), torch.stack(nll).mean().item(),
                          rtol=1e-5)


def test_encoder_max_pools_every_L_steps_causally():
    args, m, _ = tiny_models()
    seen = {}
    m.encoder.register_forward_hook(lambda mod, i, out: seen.update(h=out))
    m.cast.register_forward_pre_hook(lambda mod, i: seen.update(pooled=i[0]))
    x = torch.randn(2, 24, 17)
    z = m.encode(x)
    assert z.shape == (2, 8, args.code_dim)
    assert torch.equal(seen["pooled"], seen["h"].view(2, 8, 3, -1).amax(2))  # window 3, stride 3
    x2 = x.clone()
    x2[:, 10] += 1.0  # step 10 lies in code 3 (steps 9..11)
    z2 = m.encode(x2)
    assert torch.allclose(z[:, :3], z2[:, :3], atol=1e-6) and not torch.allclose(z[:, 3], z2[:, 3])


def test_decoder_prefixes_state_residual_and_no_input_dropout():
    args, m, _ = tiny_models()
    idx, s = torch.randint(0, args.n_codes, (4, 8)), torch.randn(4, 11)
    full = m.decode_codes(idx, s)  # (4, 24, 17)
    assert full.shape == (4, 24, 17) and ((full[..., -1] > 0) & (full[..., -1] < 1)).all()
    for k in range(1, 8):  # a prefix of k codes decodes the first k L steps
        assert torch.allclose(m.decode_codes(idx[:, :k], s), full[:, : 3 * k], atol=1e-5), k
    idx2 = idx.clone()
    idx2[:, 3] = (idx2[:, 3] + 1) % args.n_codes
    other = m.decode_codes(idx2, s)
    assert torch.allclose(other[:, :9], full[:, :9], atol=1e-5)
    assert not torch.allclose(other[:, 9:12], full[:, 9:12])
    seen = {}
    m.predict.register_forward_hook(lambda mod, i, out: seen.update(raw=out))
    out = m.decode(m.codebook.embedding[idx], s)
    assert torch.allclose(out[..., :11], seen["raw"][..., :11] + s[:, None], atol=1e-6)  # s_0 +
    assert torch.equal(out[..., 11:], seen["raw"][..., 11:])
    calls = []
    m.drop.register_forward_hook(lambda *a: calls.append(1))
    m.train().decode(m.codebook.embedding[idx], s)
    assert calls == [], "the official decoder has no input dropout"
    m.encode(torch.randn(1, 24, 17))
    assert calls == [1]


def test_prior_adds_the_state_at_every_position_and_is_causal():
    args, _, p = tiny_models()
    idx, s = torch.randint(0, args.n_codes, (3, 5)), torch.randn(3, 11)
    seen = {}
    p.blocks[0].register_forward_pre_hook(lambda mod, i: seen.update(h=i[0]))
    logits = p(idx, s)  # (3, 6, K)
    assert logits.shape == (3, 6, args.n_codes)
    tok = torch.cat([torch.zeros(3, 1, args.n_embd), p.tok_emb.weight[idx]], 1)  # start, codes
    ref = tok + p.pos_emb[:, :6] + (s @ p.state_emb.weight.T + p.state_emb.bias)[:, None]
    assert torch.allclose(seen["h"], ref, atol=1e-6)
    idx2 = idx.clone()
    idx2[:, 3:] = (idx2[:, 3:] + 5) % args.n_codes
    logits2 = p(idx2, s)  # position j predicts code j from codes < j
    assert torch.allclose(logits[:, :4], logits2[:, :4], atol=1e-5)
    assert not torch.allclose(logits[:, 4:], logits2[:, 4:])


def test_cached_passes_equal_plain_passes():
    args, vq, pr = tiny_models()
    idx, s = torch.randint(0, args.n_codes, (3, 5)), torch.randn(3, 11)
    full, logits_full = vq.decode_codes(idx, s), pr(idx[:, :4], s)  # (3, 15, D), (3, 5, K)
    d_cache = p_cache = None
    for k in range(5):
        out, d_cache = tap.decode_next(vq, vq.codebook.embedding[idx[:, k]], s, d_cache)
        assert torch.allclose(out, full[:, 3 * k: 3 * k + 3], atol=1e-5), k
        lg, p_cache = tap.prior_next(pr, None if k == 0 else idx[:, k - 1], s, p_cache)
        assert torch.allclose(lg, logits_full[:, k], atol=1e-5), k


def hand_score(r, v, logp, n_codes, gamma=GAMMA, threshold=0.05, weight=500.0):
    """Official beam_with_prior score, written out: discounts gamma^1..gamma^T (cumprod)."""
    r, v, logp = (np.asarray(a, np.float64) for a in (r, v, logp))
    T = r.shape[1]
    ret = sum(gamma ** (i + 1) * r[:, i] for i in range(T - 1)) + gamma ** T * v
    return ret + weight * np.clip(logp, -1e5, n_codes * np.log(threshold))


def test_objective_matches_the_official_formula():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, -1.0, 0.0, 2.0, 1.0, -3.0]] * 2)
    v = torch.tensor([10.0, -4.0, 10.0, -4.0])
    cap = 5 * np.log(0.05)
    logp = torch.tensor([cap + 3.0, cap - 2.0, -1e6, 0.0])
    obj = tap.objective(r, v, logp, 5)
    ref = hand_score(r.numpy(), v.numpy(), logp.numpy(), 5)
    assert np.allclose(obj.numpy(), ref, rtol=1e-6)
    # written out for row 0: 0.99 (1 + 2 .99 + 3 .99^2 + 4 .99^3 + 5 .99^4) + .99^6 10 + 500 cap
    row0 = 0.99 * (1 + 2 * 0.99 + 3 * 0.99 ** 2 + 4 * 0.99 ** 3 + 5 * 0.99 ** 4) + 0.99 ** 6 * 10
    assert np.isclose(obj[0].item(), row0 + 500 * cap, rtol=1e-6)
    assert np.isclose(obj[2].item() - obj[0].item(), 500 * (-1e5 - cap), rtol=1e-6)  # floor


@torch.no_grad()
def reference_beam(P, s, threshold):
    """The official beam_with_prior for a batch of states: every prefix re-decoded from scratch,
    the plain prior, the hand-written score; the same random draws as Planner.beam."""
    args, E, n_plan = P.args, s.shape[0], P.n_plan
    idx, logp, n_beam = torch.zeros(E, 0, dtype=torch.long), torch.zeros(E), 1
    mean, std = P.mean.numpy(), P.std.numpy()
    for k in range(n_plan):
        n = args.beam_width * P.n_expand if k == 0 else P.n_expand
        codes, lp = P.draw(P.prior(idx, s.repeat_interleave(n_beam, 0))[:, -1], n)
        idx = torch.cat([idx.repeat_interleave(n, 0), codes.reshape(-1, 1)], 1)
        logp = logp.repeat_interleave(n) + lp.flatten()
        pred = P.vqvae.decode_codes(idx, s.repeat_interleave(n_beam * n, 0)).numpy()
        r, v = pred[..., -3] * std[-2] + mean[-2], pred[:, -1, -2] * std[-1] + mean[-1]
        score = hand_score(r, v, logp.numpy(), n_plan, threshold=threshold).reshape(E, -1)
        keep = args.beam_width if k < n_plan - 1 else 1
        top = np.argsort(-score, 1, kind="stable")[:, :keep]
        flat = torch.as_tensor((top + np.arange(E)[:, None] * n_beam * n).ravel())
        idx, logp, pred, n_beam = idx[flat], logp[flat], pred[flat.numpy()], keep
    return pred[:, 0], idx


@pytest.mark.parametrize("dedupe", [False, True])
def test_beam_equals_the_official_recomputation(dedupe):
    """Plain caches, and caches with duplicate candidates decoded once (the speed trick)."""
    args, vq, pr = tiny_models(beam_width=6, horizon=12)
    for p in pr.parameters():  # a sharper prior: log-likelihoods on both sides of the cap
        p.data.mul_(3)
    for p in vq.decoder.parameters():  # sharper attention: a wrong cache changes the plans
        p.data.mul_(3)
    P = tap.Planner(vq, pr, stats16(), args, n_expand=3, threshold=0.1, dedupe=dedupe)
    s = torch.randn(4, 11)
    P.gen.manual_seed(1)
    first, codes = P.beam(s)
    P.gen.manual_seed(1)
    ref_first, ref_codes = reference_beam(P, s, threshold=0.1)
    assert torch.equal(codes, ref_codes)
    assert np.allclose(first.numpy(), ref_first, atol=1e-4)
    P.gen.manual_seed(1)
    draws = P.draw(pr(torch.zeros(4, 0, dtype=torch.long), s)[:, -1], 18)[0]
    assert min(len(row.unique()) for row in draws) < 18, "duplicates to decode once"


@torch.no_grad()
def test_beam_picks_the_best_plan_by_the_hand_formula():
    """One code (H = 3): the beam must return the best of all 8 codes (all drawn: 64 draws)."""
    args, vq, pr = tiny_models(n_codes=8, horizon=3, beam_width=16)
    st = stats16()
    P = tap.Planner(vq, pr, st, args, threshold=1e-9)  # every drawn code above the cap
    s = torch.randn(1, 11)
    first, codes = P.beam(s)
    allc = vq.decode_codes(torch.arange(8)[:, None], s.expand(8, -1)).numpy()  # (8, 3, D)
    r = allc[..., -3] * st["std"][-2].item() + st["mean"][-2].item()
    v = allc[:, -1, -2] * st["std"][-1].item() + st["mean"][-1].item()
    ret = GAMMA * r[:, 0] + GAMMA ** 2 * r[:, 1] + GAMMA ** 3 * v
    assert codes.tolist() == [[int(ret.argmax())]]
    assert np.allclose(first[0].numpy(), allc[ret.argmax(), 0], atol=1e-5)


@torch.no_grad()
def test_sample_planner_two_rounds_ranked_by_return():
    args, vq, pr = tiny_models(horizon=6)
    for p in pr.parameters():  # a sharper prior: log-likelihoods on both sides of the cap
        p.data.mul_(3)
    P = tap.Planner(vq, pr, stats16(), args, threshold=0.3, n_samples=8, rounds=2)
    s = torch.randn(8, 11)
    P.gen.manual_seed(3)
    first, codes = P.sample(s)
    P.gen.manual_seed(3)  # the reference: the same draws, selection written out
    mean, std, E, M = P.mean.numpy(), P.std.numpy(), 8, 4
    picks = []
    for _ in range(2):
        idx, lp = P.draw(P.prior(torch.zeros(E, 0, dtype=torch.long), s)[:, -1], M)
        idx, logp = idx.reshape(-1, 1), lp.flatten()
        nxt, lp = P.draw(P.prior(idx, s.repeat_interleave(M, 0))[:, -1], 1)
        idx, logp = torch.cat([idx, nxt], 1), logp + lp[:, 0]
        pred = vq.decode_codes(idx, s.repeat_interleave(M, 0)).numpy()
        r, v = pred[..., -3] * std[-2] + mean[-2], pred[:, -1, -2] * std[-1] + mean[-1]
        ret = hand_score(r, v, logp.numpy(), 2, weight=0.0).reshape(E, M)
        obj = hand_score(r, v, logp.numpy(), 2, threshold=0.3).reshape(E, M)
        best = obj.argmax(1)  # within a round: return + likelihood bonus
        picks.append((ret[np.arange(E), best], obj[np.arange(E), best],
                      idx.view(E, M, 2)[np.arange(E), best], pred.reshape(E, M, 6, -1)[
                          np.arange(E), best, 0]))
    by_ret = np.stack([p[0] for p in picks], 1).argmax(1)  # across rounds: return alone
    by_obj = np.stack([p[1] for p in picks], 1).argmax(1)
    assert (by_ret != by_obj).any(), "the test needs a case where the two rankings differ"
    ref_codes = torch.stack([p[2] for p in picks], 1)[np.arange(E), by_ret]
    ref_first = np.stack([p[3] for p in picks], 1)[np.arange(E), by_ret]
    assert torch.equal(codes, ref_codes) and np.allclose(first.numpy(), ref_first, atol=1e-5)


@pytest.mark.parametrize("planner", ["beam", "sample"])
@torch.no_grad()
def test_first_action_is_the_decoded_first_action_of_its_codes(planner):
    args, vq, pr = tiny_models(planner=planner, n_codes=16, horizon=9, beam_width=4)
    vq.predict.bias.data[11:14] = 0.5  # decoded actions 0.5 std = 5 away from their mean
    st = stats16()
    P = tap.Planner(vq, pr, st, args, n_samples=16)
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    s = (torch.as_tensor(obs) - st["mean"][:11]) / st["std"][:11]
    P.gen.manual_seed(7)
    first, codes = P.beam(s) if planner == "beam" else P.sample(s)
    assert codes.shape == (5, 3)
    dec = vq.decode_codes(codes, s)[:, 0]  # (5, D): the first step its codes decode into
    assert torch.allclose(first, dec, atol=1e-5)
    P.gen.manual_seed(7)
    act = P(obs)
    ref = dec[:, 11:14].numpy() * st["std"][11:14].numpy() + st["mean"][11:14].numpy()
    assert isinstance(act, np.ndarray) and act.shape == (5, 3)
    assert np.allclose(act, ref, atol=1e-5)
    assert np.abs(act).max() > 1.0, "actions are not clamped (official)"


def test_optimizer_decays_linear_weights_only():
    _, vq, _ = tiny_models()
    opt = tap.make_optimizer(vq, tiny_args())
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"], opt.defaults["betas"]) == (
        0.1, 0.0, (0.9, 0.95))
    linear = {id(m.weight) for m in vq.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(vq.parameters()))


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A tiny run of both stages (20 VQ-VAE steps, 10 prior steps, evaluation), in a tmp dir."""
    d = tmp_path_factory.mktemp("tap")
    old = os.getcwd()
    os.chdir(d)
    base = ["--dataset-path", str(tiny_dataset()), *TINY]
    out = tap.main(base + ["--total-steps", "20", "--prior-steps", "10"])
    yield dict(base=base, dir=d, metrics=out)
    os.chdir(old)


def test_resume_is_exact(trained):
    base, a = trained["base"], trained["metrics"]
    assert a["step"] == 30 and np.isfinite(a["eval/return_mean"])
    half = tap.main(base + ["--stage", "vqvae", "--total-steps", "10"])
    b = tap.main(base + ["--total-steps", "20", "--prior-steps", "10", "--resume",
                         half["checkpoint"]])
    sa, sb = (common.load_checkpoint(x["checkpoint"], "tap") for x in (a, b))
    assert sb["step"] == 30
    for part in ("vqvae", "prior"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    assert b["eval/return_mean"] == a["eval/return_mean"]


def test_stage_prior_trains_a_fresh_prior(trained, tmp_path):
    ckpt = common.load_checkpoint(trained["metrics"]["checkpoint"], "tap")
    ckpt["prior"] = {k: torch.full_like(v, 7.0) for k, v in ckpt["prior"].items()}
    marked = tmp_path / "marked.pt"
    torch.save(ckpt, marked)
    m = tap.main(trained["base"][:2] + ["--stage", "prior", "--prior-steps", "2", "--checkpoint",
                                        str(marked), "--batch-size", "8", "--no-cuda",
                                        "--eval-episodes", "1", "--eval-max-steps", "2"])
    out = common.load_checkpoint(m["checkpoint"], "tap")
    assert out["step"] == 2 and out["args"]["n_embd"] == 32, "architecture from the checkpoint"
    assert all(torch.equal(v, out["vqvae"][k]) for k, v in ckpt["vqvae"].items())
    assert all((v - 7.0).abs().min() > 1.0 for v in out["prior"].values()), "not the old prior"


def test_eval_only_takes_the_architecture_from_the_checkpoint(trained):
    m = tap.main(["--eval-only", "--checkpoint", trained["metrics"]["checkpoint"],
                  "--eval-episodes", "2", "--eval-max-steps", "3", "--planner", "sample",
                  "--no-cuda"])
    assert np.isfinite(m["eval/normalized_score"])


def test_load_policy_in_a_folder_with_two_files(trained, tmp_path):
    """README's example: copy tap.py and common.py, load a checkpoint, act in the env."""
    root = Path(tap.__file__).parent
    for name in ("tap.py", "common.py"):
        shutil.copy(root / name, tmp_path / name)
    ckpt = trained["metrics"]["checkpoint"]
    script = textwrap.dedent(f"""
        import gymnasium, numpy as np
        from tap import load_policy
        policy = load_policy({ckpt!r})
        env = gymnasium.make("Hopper-v5")
        obs, _ = env.reset(seed=0)
        acts = []
        for _ in range(3):
            act = policy(obs[None].astype(np.float32))[0]
            acts.append(act)
            obs, r, term, trunc, _ = env.step(act)
        np.save("acts.npy", np.array(acts))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", SEQRL_DATA_DIR=os.environ["SEQRL_DATA_DIR"])
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=120)
    acts = np.load(tmp_path / "acts.npy")
    policy = tap.load_policy(ckpt)
    e = common.make_env("hopper")
    obs, _ = e.reset(seed=0)
    for i in range(3):
        act = policy(obs[None].astype(np.float32))[0]
        assert act.shape == (3,) and np.isfinite(act).all()
        assert np.allclose(act, acts[i], atol=1e-5)
        obs, *_ = e.step(act)


def test_bad_inputs_fail_clearly(trained, tmp_path):
    with pytest.raises(ValueError, match="--stage"):
        tap.main(["--stage", "nope"])
    with pytest.raises(ValueError, match="--planner"):
        tap.main(["--planner", "nope"])
    with pytest.raises(ValueError, match="--checkpoint"):
        tap.main(["--stage", "prior"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError):
        tap.main(["--eval-only", "--checkpoint", str(bad)])
    policy = tap.load_policy(trained["metrics"]["checkpoint"])
    with pytest.raises(ValueError, match="trained on"):
        policy(np.zeros((1, 17), np.float32))
    with pytest.raises(ValueError, match="--horizon"):
        tap.load_policy(trained["metrics"]["checkpoint"], horizon=30)
