"""Decision Transformer / Multi-Game DT invariants and smoke runs (CPU, offline, tiny sizes)."""
import dataclasses

import numpy as np
import pytest
import torch

import common
import dt

TINY = ["--embed-dim", "16", "--n-layer", "1", "--context-len", "4", "--batch-size", "8",
        "--eval-episodes", "2", "--eval-max-steps", "8", "--log-every", "5", "--no-cuda"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the test machine is shared, and resume equivalence is checked bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(**kw):
    base = dict(embed_dim=16, n_layer=2, n_head=2, context_len=5, dropout=0.0, max_ep_len=50, cuda=False)
    base.update(kw)
    return dt.check_args(dt.Args(**base))


def synthetic_data(lengths=(3, 7, 12), obs_dim=3, act_dim=2):
    """Episodes whose rows encode (episode, step), so windows can be checked exactly."""
    rows = []
    for e, n in enumerate(lengths):
        for t in range(n):
            rows.append((e, t, t == n - 1))
    obs = np.array([[e, t] + [0.0] * (obs_dim - 2) for e, t, _ in rows], dtype=np.float32)
    acts = np.array([[e / 10, t / 100] + [0.0] * (act_dim - 2) for e, t, _ in rows], dtype=np.float32)
    return dict(observations=obs, actions=acts, rewards=np.ones(len(rows), np.float32),
                terminals=np.zeros(len(rows), bool), timeouts=np.array([r[2] for r in rows]))


def random_batch(args, B=2, obs_dim=3, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = args.context_len
    s, a = torch.randn(B, K, obs_dim, generator=g), torch.rand(B, K, act_dim, generator=g) * 2 - 1
    r = torch.randint(0, args.return_bins, (B, K), generator=g) if args.return_bins else torch.rand(B, K, generator=g)
    t = torch.arange(K).expand(B, K) + 3
    return s, a, r, t


@pytest.mark.parametrize("bins", [0, 6])
def test_token_order_interleaved(bins):
    """Tokens are interleaved per step: (R, s, a) for DT, (s, R, a) for MGDT; the timestep
    embedding is shared by the three tokens of a step."""
    args = tiny_args(return_bins=bins)
    model = dt.DecisionTransformer(3, 2, args).eval()
    s, a, r, t = random_batch(args)
    seen = {}
    model.embed_ln.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    model(s, a, r, t)
    x = seen["x"]  # (B, 3K, d) before the LayerNorm
    assert x.shape == (2, 3 * args.context_len, args.embed_dim)
    time_emb = model.embed_timestep(t)
    ret = model.embed_return(r) if bins else model.embed_return(r.unsqueeze(-1))
    expected = {"R": ret + time_emb, "s": model.embed_state(s) + time_emb, "a": model.embed_action(a) + time_emb}
    order = ("s", "R", "a") if bins else ("R", "s", "a")
    for j, name in enumerate(order):
        torch.testing.assert_close(x[:, j::3], expected[name])


@pytest.mark.parametrize("bins", [0, 6])
def test_predict_last_equals_full_forward(bins):
    """The inference path (sequence cut after the read token, one query in the last block) gives
    the full forward's numbers at the final step, for every context length."""
    args = tiny_args(return_bins=bins)
    model = dt.DecisionTransformer(3, 2, args).eval()
    s, a, r, t = random_batch(args, B=3)
    for n in range(1, args.context_len + 1):
        act, logits = model(s[:, :n], a[:, :n], r[:, :n], t[:, :n])
        torch.testing.assert_close(model.predict_last(s[:, :n], a[:, :n], r[:, :n], t[:, :n], token=1), act[:, -1])
        if bins:
            torch.testing.assert_close(model.predict_last(s[:, :n], a[:, :n], r[:, :n], t[:, :n], token=0),
                                       logits[:, -1])


@pytest.mark.parametrize("bins", [0, 6])
def test_causality(bins):
    """Changing step j's tokens leaves every prediction of steps < j unchanged; DT's action at step t
    ignores a_t but sees R_t and s_t; MGDT's return logits at t ignore R_t and a_t."""
    args = tiny_args(return_bins=bins)
    model = dt.DecisionTransformer(3, 2, args).eval()
    s, a, r, t = random_batch(args)
    act, logits = model(s, a, r, t)
    j = 2
    s2, a2, r2 = s.clone(), a.clone(), r.clone()
    s2[:, j:] += 1.0
    a2[:, j:] = -a2[:, j:]
    r2[:, j:] = (r2[:, j:] + 1) % bins if bins else r2[:, j:] + 1.0
    act2, logits2 = model(s2, a2, r2, t)
    torch.testing.assert_close(act2[:, :j], act[:, :j])
    assert not torch.allclose(act2[:, j], act[:, j])
    # the action at step j does not depend on a_j (it is read before a_j is taken) ...
    a3 = a.clone()
    a3[:, j] = -a3[:, j]
    torch.testing.assert_close(model(s, a3, r, t)[0][:, j], act[:, j])
    # ... but depends on R_j (DT: R_j comes before s_j; MGDT: R_j before a_j)
    r3 = r.clone()
    r3[:, j] = (r3[:, j] + 1) % bins if bins else r3[:, j] + 1.0
    act3, logits3 = model(s, a, r3, t)
    assert not torch.allclose(act3[:, j], act[:, j])
    if bins:
        torch.testing.assert_close(logits2[:, :j], logits[:, :j])
        torch.testing.assert_close(logits3[:, j], logits[:, j])  # P(R_j | s_j, history) excludes R_j


def test_sampling_windows_and_padding_mask():
    """Windows are consecutive rows of one episode, right-padded with zeros; the mask is built from
    the episode length (before padding); padded values change no real prediction nor the loss."""
    args = tiny_args(context_len=6)
    data = dt.TrajectoryData(synthetic_data(), args, torch.device("cpu"))
    assert data.n_episodes == 3 and data.lengths.tolist() == [3, 7, 12]
    # returns-to-go: all rewards 1, so R_t = (len - t) * scale
    torch.testing.assert_close(data.rtg[:3], torch.tensor([3.0, 2.0, 1.0]) * args.reward_scale)
    g = torch.Generator().manual_seed(0)
    s, a, r, t, mask = data.sample(256, 6, g)
    f32 = lambda x: torch.as_tensor(x, dtype=torch.float32)
    raw = s * f32(data.state_std) + f32(data.state_mean)
    lengths = torch.tensor([3, 7, 12])
    saw_padding = False
    for b in range(256):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()  # right padding: real steps first
        ep, t0 = int(raw[b, 0, 0].round()), int(raw[b, 0, 1].round())
        assert n == min(6, int(lengths[ep]) - t0)  # mask from the window length
        torch.testing.assert_close(raw[b, :n, 1], torch.arange(t0, t0 + n, dtype=torch.float32), atol=1e-3, rtol=0)
        assert (raw[b, :n, 0].round() == ep).all()
        assert t[b, :n].tolist() == list(range(t0, t0 + n))
        assert (s[b, n:] == 0).all() and (a[b, n:] == 0).all() and (r[b, n:] == 0).all() and (t[b, n:] == 0).all()
        saw_padding |= n < 6
    assert saw_padding
    # garbage in the padded steps changes no prediction on real steps
    model = dt.DecisionTransformer(3, 2, args).eval()
    pred, _ = model(s, a, r, t)
    pad = ~mask
    s2 = torch.where(pad[..., None], torch.randn_like(s) * 5, s)
    a2 = torch.where(pad[..., None], torch.rand_like(a), a)
    r2 = torch.where(pad, torch.randn_like(r), r)
    pred2, _ = model(s2, a2, r2, t)
    torch.testing.assert_close(pred2[mask], pred[mask])


def test_return_bins_edges():
    """MGDT bins: R_low -> 0, R_high -> N-1 (not N), clamping outside, centres round-trip."""
    bins = dt.ReturnBins(-0.5, 1.5, 8)  # width 0.25
    R = torch.tensor([-0.5, -0.5 + 0.25, -0.5 + 0.25 - 1e-4, 1.5, 1.5 - 1e-4, 1.25, 1.25 - 1e-4, 9.0, -9.0])
    assert bins.encode(R).tolist() == [0, 1, 0, 7, 7, 7, 6, 7, 0]
    assert bins.encode(bins.centers()).tolist() == list(range(8))
    torch.testing.assert_close(bins.normalized_centers(), (bins.centers() + 0.5) / 2.0)
    with pytest.raises(ValueError, match="R_high > R_low"):
        dt.ReturnBins(1.0, 1.0, 4)
    args = tiny_args(return_bins=10)
    data = dt.TrajectoryData(synthetic_data(), args, torch.device("cpu"))
    assert data.rtg_bins.max() == 9 and data.rtg_bins.min() == 0  # the dataset's max R is in the top bin
    assert data.rtg_bins[data.rtg.argmax()] == 9 and data.rtg_bins[data.rtg.argmin()] == 0


def test_expert_sampling_prefers_high_returns():
    """Sec. 3.4: with kappa > 0 the sampled return shifts toward high bins; kappa = 0 samples P."""
    bins = dt.ReturnBins(0.0, 1.0, 8)
    logits = torch.full((4000, 8), -30.0)
    logits[:, 2] = logits[:, 5] = 0.0  # the model says: bin 2 or bin 5, equally likely
    g = torch.Generator().manual_seed(0)
    plain = dt.sample_expert_return(logits, 0.0 * bins.normalized_centers(), g)
    expert = dt.sample_expert_return(logits, 10.0 * bins.normalized_centers(), g)
    assert set(plain.unique().tolist()) == {2, 5} and set(expert.unique().tolist()) <= {2, 5}
    assert 0.4 < (plain == 5).float().mean() < 0.6
    p5 = 1 / (1 + np.exp(-10.0 * 3 / 8))  # exp(kappa * 3/8) : 1
    assert abs((expert == 5).float().mean().item() - p5) < 0.02


def test_policy_return_to_go_and_window():
    """Evaluation: R_0 = target * scale, R_{t+1} = R_t - r_t * scale (in observe); the preallocated
    window shifts once full; each action equals a fresh forward over the last K steps."""
    args = tiny_args(context_len=3)
    model = dt.DecisionTransformer(3, 2, args).eval()
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    pol = dt.DTPolicy(model, args, mean, std, torch.device("cpu"), target=3600.0)
    pol.reset(2)
    buf = pol.states
    rng = np.random.default_rng(0)
    hist_s, hist_r, hist_a = [], [], []
    R = np.array([3.6, 3.6])
    for step in range(6):
        obs = rng.normal(size=(2, 3)).astype(np.float32)
        act = pol(obs)
        hist_s.append(obs); hist_r.append(R.copy()); hist_a.append(act.clone())
        lo = max(0, step + 1 - 3)  # reference: recompute over the last K steps from scratch
        S = torch.tensor(np.stack(hist_s[lo:], 1)); Rr = torch.tensor(np.stack(hist_r[lo:], 1), dtype=torch.float32)
        A = torch.stack(hist_a[lo:], 1).clone(); A[:, -1] = 0.0
        T = torch.arange(lo, step + 1).expand(2, -1)
        ref = model(S, A, Rr, T)[0][:, -1]
        torch.testing.assert_close(act, ref)
        rew = rng.uniform(0, 5, size=2).astype(np.float32)
        pol.observe(rew, np.zeros(2, bool))
        R = R - rew * args.reward_scale
        torch.testing.assert_close(pol.next_return, torch.tensor(R, dtype=torch.float32))
    assert pol.states is buf  # no reallocation / growing concatenation
    assert pol.timesteps[0].tolist() == [3, 4, 5]


@pytest.mark.parametrize("bins", [0, 6])
def test_policy_skips_finished_episodes(bins):
    """Once observe() reports an episode done, its row gets no forward pass (action 0) and the
    live episodes' actions are exactly those of a policy that never saw a done."""
    args = tiny_args(return_bins=bins, context_len=3)
    model = dt.DecisionTransformer(3, 2, args).eval()
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    rb = dt.ReturnBins(-1.0, 1.0, bins) if bins else None
    pols = [dt.DTPolicy(model, args, mean, std, torch.device("cpu"), None if bins else 3600.0, rb, seed=0)
            for _ in range(2)]
    rows_seen = []
    model.embed_ln.register_forward_hook(lambda m, inp, out: rows_seen.append(inp[0].shape[0]))
    for pol in pols:
        pol.reset(3)
    rng = np.random.default_rng(0)
    for step in range(5):
        obs, rew = rng.normal(size=(3, 3)).astype(np.float32), rng.uniform(0, 5, size=3).astype(np.float32)
        rows_seen.clear()
        full, masked = pols[0](obs), pols[1](obs)
        if step >= 2:  # episode 1 ended at step 1
            assert rows_seen[len(rows_seen) // 2:] == [2] * (len(rows_seen) // 2)
            assert torch.all(masked[1] == 0)
            if not bins:  # (MGDT samples returns for fewer rows, so its random stream differs)
                torch.testing.assert_close(masked[[0, 2]], full[[0, 2]])
        else:
            torch.testing.assert_close(masked, full)
        pols[0].observe(rew, np.zeros(3, bool))
        pols[1].observe(rew, np.array([False, step >= 1, False]))


def test_mgdt_loss_is_action_loss_plus_weighted_return_loss():
    args = tiny_args(return_bins=6, return_loss_weight=0.25)
    model = dt.DecisionTransformer(3, 2, args)
    opt, sched = dt.make_optimizer(model, args)
    s, a, r, t = random_batch(args)
    out = dt.train_step(model, model, opt, sched, (s, a, r, t, torch.ones(2, args.context_len, dtype=torch.bool)), args)
    torch.testing.assert_close(out["total_loss"], out["action_loss"] + 0.25 * out["return_loss"])


def test_smoke_resume_and_eval_only(tiny_dataset, tmp_path):
    """The script trains, checkpoints and evaluates; N straight == N/2 + save + resume N/2
    (bitwise, CPU, same seed); --eval-only reproduces the final evaluation; bad input errors clearly."""
    path = str(tiny_dataset("hopper", "medium"))
    common_args = TINY + ["--dataset-path", path, "--eval-every", "1000"]
    straight = dt.main(common_args + ["--total-steps", "12", "--run-dir", str(tmp_path / "a")])
    assert np.isfinite(straight["normalized_score"]) and set(straight["eval"]) == {"target3600", "target1800"}
    dt.main(common_args + ["--total-steps", "6", "--run-dir", str(tmp_path / "b")])
    resumed = dt.main(common_args + ["--total-steps", "12", "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ca["step"] == cb["step"] == 12
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert resumed["return_mean"] == straight["return_mean"]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert any("losses/action_loss" in l for l in lines) and any("eval/normalized_score" in l for l in lines)

    ev = dt.main(TINY + ["--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt")])
    assert ev["return_mean"] == pytest.approx(straight["return_mean"]) and ev["step"] == 12
    with pytest.raises(ValueError, match="--env hopper"):
        dt.main(TINY + ["--env", "halfcheetah", "--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt")])
    with pytest.raises(ValueError, match="embed-dim 16"):
        dt.main(TINY[2:] + ["--eval-only", "--checkpoint", str(tmp_path / "a" / "checkpoint.pt")])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError):
        dt.main(TINY + ["--eval-only", "--checkpoint", str(bad)])
    with pytest.raises(ValueError, match="--checkpoint"):
        dt.main(TINY + ["--eval-only"])
    with pytest.raises(ValueError, match="--return-loss-weight"):
        dt.main(TINY + ["--return-bins", "8", "--return-loss-weight", "-1"])


def test_smoke_mgdt(tiny_dataset, tmp_path):
    """MGDT mode trains on return bins + actions and evaluates with expert inference (no targets)."""
    path = str(tiny_dataset("hopper", "medium"))
    out = dt.main(TINY + ["--dataset-path", path, "--total-steps", "10", "--return-bins", "12",
                          "--run-dir", str(tmp_path / "m")])
    assert set(out["eval"]) == {"expert"} and np.isfinite(out["return_mean"])
    lines = (tmp_path / "m" / "metrics.jsonl").read_text()
    assert "losses/return_loss" in lines
    ck = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=False)
    lo, hi = ck["return_range"]
    assert hi > lo and ck["args"]["return_bins"] == 12
