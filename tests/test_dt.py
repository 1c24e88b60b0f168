"""dt.py against the paper and the official code: literal constants, a hand-written official
forward and rollout, hand-computed data / loss / schedule numbers, a reference update loop,
resume, eval-only and the two-file policy (CPU, offline, tiny sizes)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import dt

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--embed-dim", "16", "--n-layer", "1", "--context-len", "4", "--batch-size", "8",
        "--eval-episodes", "2", "--eval-max-steps", "8", "--no-cuda"]


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    """One torch thread (bitwise resume / reference comparisons; the machine is shared), and
    runs/ folders written under tmp_path."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(n)


def tiny_args(**kw):
    base = dict(embed_dim=16, n_layer=2, n_head=2, context_len=5, dropout=0.0, cuda=False)
    return dt.check_args(dt.Args(**{**base, **kw}))


def noisy_model(args, obs_dim=3, act_dim=2, seed=0):
    """A model with every weight perturbed, so that a wrong mask or token shows clearly."""
    torch.manual_seed(seed)
    model = dt.DecisionTransformer(obs_dim, act_dim, args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def random_batch(args, B=2, obs_dim=3, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = args.context_len
    s, a = torch.randn(B, K, obs_dim, generator=g), torch.rand(B, K, act_dim, generator=g) * 2 - 1
    r = torch.rand(B, K, generator=g)
    t = torch.randint(0, 990, (B, 1), generator=g) + torch.arange(K)
    return s, a, r, t


def episodes(lengths, obs_dim=3, act_dim=2, seed=0):
    """D4RL-style dict whose observations encode (episode, step) in the first two columns."""
    rng = np.random.default_rng(seed)
    ep = np.concatenate([[e] * n for e, n in enumerate(lengths)])
    step = np.concatenate([np.arange(n) for n in lengths])
    obs = np.zeros((len(ep), obs_dim), np.float32)
    obs[:, 0], obs[:, 1] = ep, step
    return dict(observations=obs, rewards=rng.uniform(0, 3, len(ep)).astype(np.float32),
                actions=rng.uniform(-1, 1, (len(ep), act_dim)).astype(np.float32),
                terminals=np.zeros(len(ep), bool), timeouts=np.r_[step[1:] == 0, True])


# ---- the official config and model, literally
def test_official_config_and_parameter_count():
    """kzl/decision-transformer gym/experiment.py + seq_trainer.py defaults, and the parameter
    count of the hopper model (obs 11, act 3), counted by hand."""
    a = dt.check_args(dt.Args())
    assert (a.context_len, a.embed_dim, a.n_layer, a.n_head, a.dropout) == (20, 128, 3, 1, 0.1)
    assert (a.lr, a.warmup_steps, a.batch_size, a.total_steps) == (1e-4, 10_000, 64, 100_000)
    constants = (dt.WEIGHT_DECAY, dt.GRAD_CLIP, dt.REWARD_SCALE, dt.MAX_EP_LEN)
    assert constants == (1e-4, 0.25, 1000, 1000)
    assert dt.TARGET_RETURNS["hopper"] == (3600, 1800) and a.eval_episodes == 100
    assert dt.TARGET_RETURNS["halfcheetah"] == (12000, 6000)
    assert dt.TARGET_RETURNS["walker2d"] == (5000, 2500)
    d = 128
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    embed = 1000 * d + (1 * d + d) + (11 * d + d) + (3 * d + d) + 2 * d
    heads = 2 * d + (d * 3 + 3)  # ln_f, predict_action
    assert 3 * block + embed + heads == 726_019
    model = dt.DecisionTransformer(11, 3, a)
    assert sum(p.numel() for p in model.parameters()) == 726_019


def test_official_init():
    """The vendored GPT-2 initialises every Linear N(0, 0.02) with zero bias (no scaled residual
    init); the DT-level embeddings and heads keep PyTorch's defaults (embedding N(0, 1))."""
    torch.manual_seed(0)
    model = dt.DecisionTransformer(11, 3, dt.Args())
    for name, p in model.blocks.named_parameters():
        if "ln" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() - 0.02) < 0.0008 and abs(p.mean().item()) < 0.001, name
    assert abs(model.embed_timestep.weight.std().item() - 1.0) < 0.01
    bound = 1 / np.sqrt(11)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert model.embed_state.weight.abs().max() <= bound and model.embed_state.weight.std() > 0.1


def _lin(x, m):
    return x @ m.weight.T + m.bias


def _ln(x, m):
    return F.layer_norm(x, m.weight.shape, m.weight, m.bias, 1e-5)


def official_forward(model, states, actions, rtg, timesteps, attention_mask):
    """The official DecisionTransformer.forward + its vendored GPT-2, written out by hand:
    (R, s, a) stacked per step, one timestep embedding for the three, embed_ln, left padding
    masked by (1 - mask) * -1e4, causal mask by -1e4, action read at the state token."""
    B, K = states.shape[:2]
    d = model.embed_ln.weight.shape[0]
    time = model.embed_timestep.weight[timesteps]
    R = _lin(rtg[..., None], model.embed_return) + time
    s = _lin(states, model.embed_state) + time
    a = _lin(actions, model.embed_action) + time
    x = _ln(torch.stack((R, s, a), dim=1).permute(0, 2, 1, 3).reshape(B, 3 * K, d), model.embed_ln)
    mask = torch.stack([attention_mask] * 3, dim=1).permute(0, 2, 1).reshape(B, 3 * K)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0
    causal = torch.tril(torch.ones(3 * K, 3 * K)).bool()
    for blk in model.blocks:
        H = blk.n_head
        q, k, v = (z.reshape(B, 3 * K, H, d // H).permute(0, 2, 1, 3)
                   for z in _lin(_ln(x, blk.ln1), blk.qkv).split(d, dim=2))
        w = torch.where(causal, q @ k.transpose(-1, -2) / (d // H) ** 0.5, torch.tensor(-1e4))
        y = ((w + pad).softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, 3 * K, d)
        x = x + _lin(y, blk.proj)
        x = x + _lin(torch.relu(_lin(_ln(x, blk.ln2), blk.mlp[0])), blk.mlp[2])
    x = _ln(x, model.ln_f).reshape(B, K, 3, d).permute(0, 2, 1, 3)
    return torch.tanh(_lin(x[:, 1], model.predict_action[0]))                # (B, K, act)


def test_forward_equals_official_full_and_padded_windows():
    """Full windows: equal to the official forward. Short windows: dt.py's right padding (with
    garbage in the pads) gives the official left-padded, masked predictions for the real steps."""
    args = tiny_args()
    model = noisy_model(args)
    s, a, r, t = random_batch(args, B=3)
    K = args.context_len
    torch.testing.assert_close(model(s, a, r, t), official_forward(model, s, a, r, t,
                               torch.ones(3, K)), atol=1e-5, rtol=1e-5)
    for n in range(1, K):
        right = [torch.cat([x[:, :n], 7 * torch.ones_like(x[:, n:])], 1) for x in (s, a, r)]
        ours = model(*right, torch.cat([t[:, :n], t[:, :K - n]], 1))[:, :n]
        left = [torch.cat([torch.zeros_like(x[:, n:]), x[:, :n]], 1) for x in (s, a, r, t)]
        mask = torch.cat([torch.zeros(3, K - n), torch.ones(3, n)], 1)
        ref = official_forward(model, *left, mask)[:, K - n:]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_token_layout_shared_timestep():
    """Per step (R, s, a); each token = its modality's embedding + the same timestep embedding,
    before embed_ln."""
    args = tiny_args()
    model = noisy_model(args)
    s, a, r, t = random_batch(args)
    seen = {}
    model.embed_ln.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    model(s, a, r, t)
    x = seen["x"]                                                          # (B, 3K, d)
    time = model.embed_timestep.weight[t]
    R = _lin(r[..., None], model.embed_return)
    tok = {"R": R + time, "s": _lin(s, model.embed_state) + time,
           "a": _lin(a, model.embed_action) + time}
    for j, name in enumerate("Rsa"):
        torch.testing.assert_close(x[:, j::3], tok[name])


def test_predict_last_equals_forward():
    args = tiny_args()
    model = noisy_model(args)
    s, a, r, t = random_batch(args, B=3)
    for n in range(1, args.context_len + 1):
        w = (s[:, :n], a[:, :n], r[:, :n], t[:, :n])
        torch.testing.assert_close(model.predict_last(*w), model(*w)[:, -1])


def test_dropout_law_and_scale():
    """dt.dropout (CPU: 16-bit draws): each element dropped with probability p (to 2^-16, within
    5 standard deviations on 2M draws), neighbours independently (p^2), kept ones scaled by
    1 / (1 - p), fresh draws per call; eval: the identity."""
    x = torch.randn(2_000_000)
    for p in (0.1, 0.5):
        y = dt.dropout(x, p, training=True)
        dropped = (y == 0).double().mean().item()
        assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5, (p, dropped)
        both = ((y[:-1] == 0) & (y[1:] == 0)).double().mean().item()
        assert abs(both - p * p) < 5 * (p * p / x.numel()) ** 0.5, (p, both)
        torch.testing.assert_close(y[y != 0], x[y != 0] / (1 - p))
        assert dt.dropout(x, p, training=False) is x
    assert not (dt.dropout(x[:1000], 0.1, True) == dt.dropout(x[:1000], 0.1, True)).all()


def test_dropout_places(monkeypatch):
    """Training dropout (GPT-2 / DT): on the embedded tokens, on the attention weights and on each
    residual branch (before its add), all with p; a dropout that drops everything makes every
    block the identity on its rows. Shapes: B=2, K=5 steps -> T = 3K - 1 = 14 tokens (a_K's is
    left out), the last block's rows are the K states."""
    args = tiny_args(dropout=0.3)
    model = noisy_model(args).train()
    seen = []

    def drop_all(x, p, training):
        seen.append((tuple(x.shape), p, training))
        return torch.zeros_like(x)

    monkeypatch.setattr(dt, "dropout", drop_all)
    x = torch.randn(2, 14, 16)
    for block in model.blocks:
        torch.testing.assert_close(block(x), x)
        torch.testing.assert_close(block(x, slice(1, None, 3)), x[:, 1::3])
    seen.clear()
    model(*random_batch(args))
    att, tok = [(2, 2, 14, 14), (2, 14, 16), (2, 14, 16)], [(2, 15, 16)]
    assert seen == [(shape, 0.3, True) for shape in
                    tok + att + [(2, 2, 5, 14), (2, 5, 16), (2, 5, 16)]]


def test_attention_paths_equal(monkeypatch):
    """The written-out attention (CPU training with dropout) == the fused SDPA one (evaluation,
    CUDA), here with dropout replaced by the identity; with a frame mask (MGDT) too."""
    args = tiny_args(dropout=0.3)
    block = noisy_model(args).blocks[0]
    x = torch.randn(2, 14, 16)
    mask = torch.ones(14, 14, dtype=torch.bool).tril() | (torch.arange(14)[:, None] < 4)
    fused = [block.eval()(x), block(x, slice(1, None, 3)), block(x, mask=mask)]
    monkeypatch.setattr(dt, "dropout", lambda x, p, training: x)
    written = [block.train()(x), block(x, slice(1, None, 3)), block(x, mask=mask)]
    for a, b in zip(fused, written):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_causality_and_read_tokens():
    """Step j's tokens change nothing before j; a_j is predicted without a_j but with R_j."""
    args = tiny_args()
    model = noisy_model(args)
    s, a, r, t = random_batch(args)
    act = model(s, a, r, t)
    j = 2
    s2, a2, r2 = s.clone(), a.clone(), r.clone()
    s2[:, j:] += 1.0
    a2[:, j:] = -a2[:, j:]
    r2[:, j:] = r2[:, j:] + 1.0
    act2 = model(s2, a2, r2, t)
    torch.testing.assert_close(act2[:, :j], act[:, :j])
    a3 = a.clone()
    a3[:, j] = -a3[:, j]
    act3 = model(s, a3, r, t)
    torch.testing.assert_close(act3[:, j], act[:, j])
    r4 = r.clone()
    r4[:, j] = r4[:, j] + 1.0
    act4 = model(s, a, r4, t)
    assert (act4[:, j] - act[:, j]).abs().max() > 1e-3


# ---- data
def test_returns_to_go_state_stats_and_timesteps():
    """Hand numbers: R_t = sum_{k>=t} r_k / 1000; states (x - mean) / (std + 1e-6) with the
    population std over all rows (a constant column divides by 1e-6, not 0); timesteps cut
    at 999."""
    data = dict(observations=np.array([[0, 5], [1, 5], [2, 5], [3, 5], [4, 5]], np.float32),
                actions=np.zeros((5, 1), np.float32),
                rewards=np.array([1, 2, 3, 10, 20], np.float32),
                terminals=np.array([0, 0, 1, 0, 0], bool), timeouts=np.array([0, 0, 0, 0, 1], bool))
    d = dt.TrajectoryData(data, tiny_args(), torch.device("cpu"))
    torch.testing.assert_close(d.rtg, torch.tensor([0.006, 0.005, 0.003, 0.030, 0.020]))
    torch.testing.assert_close(d.state_mean, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(d.state_std, torch.tensor([2 ** 0.5 + 1e-6, 1e-6]))
    torch.testing.assert_close(d.states[:, 0], (torch.arange(5.0) - 2) / (2 ** 0.5 + 1e-6))
    assert torch.all(d.states[:, 1] == 0)
    assert d.timesteps.tolist() == [0, 1, 2, 0, 1] and d.lengths.tolist() == [3, 2]
    long = dt.TrajectoryData(episodes([1003]), tiny_args(), torch.device("cpu"))
    assert long.timesteps[[0, 998, 999, 1000, 1002]].tolist() == [0, 998, 999, 999, 999]


def test_sampling_proportional_to_length_uniform_starts():
    """Episodes drawn with probability len / sum(len) (3, 7, 12 -> 3/22, 7/22, 12/22), window
    start uniform over all len steps (the last one too)."""
    args = tiny_args(context_len=6)
    data = dt.TrajectoryData(episodes((3, 7, 12)), args, torch.device("cpu"))
    s, *_ = data.sample(40_000, 6, torch.Generator().manual_seed(0))
    raw = s[:, 0] * data.state_std + data.state_mean
    ep, start = raw[:, 0].round().long(), raw[:, 1].round().long()
    freq = torch.bincount(ep, minlength=3) / len(ep)
    assert torch.allclose(freq, torch.tensor([3, 7, 12]) / 22, atol=0.01), freq
    starts = torch.bincount(start[ep == 2], minlength=12) / (ep == 2).sum()
    assert torch.allclose(starts, torch.full((12,), 1 / 12), atol=0.01), starts


def test_windows_right_padded_with_mask():
    """A window is consecutive steps of one episode; pads follow the real steps, are zero, and
    the mask marks exactly min(K, len - start) real steps."""
    args = tiny_args(context_len=6)
    data = dt.TrajectoryData(episodes((3, 7, 12)), args, torch.device("cpu"))
    s, a, r, t, mask = data.sample(256, 6, torch.Generator().manual_seed(1))
    raw = s * data.state_std + data.state_mean
    saw_pad = False
    for b in range(256):
        ep, t0 = int(raw[b, 0, 0].round()), int(raw[b, 0, 1].round())
        n = min(6, (3, 7, 12)[ep] - t0)
        assert mask[b].tolist() == [True] * n + [False] * (6 - n)
        assert torch.allclose(raw[b, :n, 1], torch.arange(t0, t0 + n).float(), atol=1e-4)
        assert (raw[b, :n, 0].round() == ep).all() and t[b, :n].tolist() == list(range(t0, t0 + n))
        for x in (s, a, r, t):
            assert torch.all(x[b, n:] == 0)
        saw_pad |= n < 6
    assert saw_pad


# ---- loss, optimiser, update
def test_loss_masks_padding_hand_numbers():
    """MSE over the real steps only: ((.1^2 + .2^2) / 2 + (.2^2 + .9^2) / 2) / 2 = 0.225."""
    pred = torch.tensor([[[0.1, 0.2], [0.3, -0.4], [0.9, 0.9]]])
    actions = torch.tensor([[[0.0, 0.0], [0.5, 0.5], [-5.0, -5.0]]])  # step 2 is padding
    mask = torch.tensor([[True, True, False]])
    out = dt.loss_fn(pred, actions, mask)
    assert out["action_loss"].item() == pytest.approx(0.225, abs=1e-7)
    assert out["total_loss"].item() == pytest.approx(0.225, abs=1e-7)


def test_optimizer_warmup_schedule():
    """AdamW(lr, weight decay 1e-4); lr * min((step + 1) / 10000, 1) (official LambdaLR)."""
    opt, sched = dt.make_optimizer(torch.nn.Linear(2, 2), dt.Args())
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 1e-4
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-8)
    lrs = [1e-4 * sched.lr_lambdas[0](k) for k in (0, 4999, 9998, 9999, 50_000)]
    assert lrs == pytest.approx([1e-8, 5e-5, 0.9999e-4, 1e-4, 1e-4])


def test_optimizer_decay_schedule():
    """--decay-steps d (README's MGDT runs): lr * min((s + 1) / warmup, 1, (total - s) / d), linear
    to 0 at update `total`; d = 0 (DT's default): no decay, also past the end (--resume)."""
    args = dt.Args(total_steps=100, warmup_steps=10, decay_steps=20)
    f = dt.make_optimizer(torch.nn.Linear(2, 2), args)[1].lr_lambdas[0]
    assert [f(s) for s in (0, 9, 79, 80, 90, 99, 100)] == pytest.approx([.1, 1, 1, 1, .5, .05, 0])
    f = dt.make_optimizer(torch.nn.Linear(2, 2), dt.Args(total_steps=100, warmup_steps=1))[1]
    assert [f.lr_lambdas[0](s) for s in (0, 99, 100, 150)] == [1, 1, 1, 1]


def synthetic_hopper(path, lengths=(5, 9, 3, 14, 7, 2, 11, 6, 4, 10)):
    d = episodes(lengths, obs_dim=11, act_dim=3, seed=1)
    d["observations"] = np.random.default_rng(2).normal(size=d["observations"].shape).astype("f4")
    common.save_npz(path, d)
    return str(path)


def test_update_equals_reference_loop(tmp_path):
    """Three updates of main() == a loop written from the official trainer: masked MSE,
    zero_grad, backward, clip_grad_norm_(0.25) after backward, AdamW(wd 1e-4) with the lr
    of step k = lr * min((k + 1) / warmup, 1), on the same batches."""
    path = synthetic_hopper(tmp_path / "syn.npz")
    flags = ["--dataset-path", path, "--embed-dim", "16", "--n-layer", "1", "--n-head", "2",
             "--context-len", "4", "--batch-size", "8", "--total-steps", "3", "--lr", "1e-2",
             "--warmup-steps", "2", "--dropout", "0", "--eval-episodes", "1",
             "--eval-max-steps", "2", "--no-cuda"]
    out = dt.main(flags)
    args = common.parse_args(dt.Args, flags)
    common.set_seed(0)
    data = dt.TrajectoryData(common.load_dataset("hopper", path=path), args, torch.device("cpu"))
    model = dt.DecisionTransformer(11, 3, args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4, fused=True)  # 1 ulp
    gen, norms = torch.Generator().manual_seed(0), []
    for k in range(3):
        s, a, r, t, mask = data.sample(8, 4, gen)
        pred = model(s, a, r, t)
        loss = ((pred[mask] - a[mask]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25))
        opt.param_groups[0]["lr"] = 1e-2 * min((k + 1) / 2, 1)
        opt.step()
    assert min(norms) > 0.25 and (~mask).any()  # clipping and padding both matter here
    saved = common.load_checkpoint(Path(out["run_dir"]) / "checkpoint.pt", "dt")["model"]
    for name, p in model.state_dict().items():
        torch.testing.assert_close(saved[name], p, atol=1e-7, rtol=0, msg=name)


# ---- policy (Algorithm 1)
def official_rollout(model, obs, rewards, mean, std, target, K):
    """The official evaluate_episode_rtg + get_action for one episode: growing histories, the
    current action 0, the last K steps left-padded with a mask, R_{t+1} = R_t - r_t / 1000."""
    states, actions, rtg, times, out = [obs[0]], [], [target / 1000], [0], []
    for t in range(len(obs)):
        S = ((torch.tensor(np.array(states)) - mean) / std)[-K:]
        A = torch.stack(actions + [torch.zeros(2)])[-K:]
        R, T = torch.tensor(rtg, dtype=torch.float32)[-K:], torch.tensor(times)[-K:]
        n = len(S)
        padded = [torch.cat([torch.zeros(K - n, *x.shape[1:], dtype=x.dtype), x])[None]
                  for x in (S, A, R, T)]
        mask = torch.cat([torch.zeros(K - n), torch.ones(n)])[None]
        action = official_forward(model, *padded, mask)[0, -1]
        actions.append(action)
        out.append(action)
        if t + 1 < len(obs):
            rtg.append(rtg[-1] - rewards[t] / 1000)
            times.append(t + 1)
            states.append(obs[t + 1])
    return torch.stack(out)


def test_policy_equals_official_rollout():
    """Two episodes at once, K = 3, 7 steps: DTPolicy's actions == the official rollout's
    (target 3600, reward decrement, timesteps, state normalisation, window shift)."""
    args = tiny_args(context_len=3)
    model = noisy_model(args)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2, 7, 3)).astype(np.float32)
    rew = rng.uniform(-2, 5, size=(2, 7)).astype(np.float32) * 100
    mean, std = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5])
    pol = dt.DTPolicy(model, args, mean, std, target=3600.0)
    pol.reset(2)
    ours = []
    for t in range(7):
        ours.append(torch.as_tensor(pol(obs[:, t])))
        pol.observe(rew[:, t], np.zeros(2, bool))
    for e in range(2):
        ref = official_rollout(model, obs[e], rew[e], mean, std, 3600.0, 3)
        torch.testing.assert_close(torch.stack(ours)[:, e], ref, atol=1e-5, rtol=1e-5)
    assert pol.timesteps[0].tolist() == [4, 5, 6]
    torch.testing.assert_close(pol.returns[0], torch.tensor(3.6 - np.cumsum(rew[0])[3:6] / 1000,
                                                            dtype=torch.float32))


def test_policy_skips_finished_episodes():
    """A finished episode gets no forward pass and action 0; the others act as if nothing ended."""
    args = tiny_args(context_len=3)
    model = noisy_model(args)
    pols = [dt.DTPolicy(model, args, torch.zeros(3), torch.ones(3), 3600.0) for _ in range(2)]
    rows = []
    model.embed_ln.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    for pol in pols:
        pol.reset(3)
    rng = np.random.default_rng(0)
    for step in range(5):
        obs, rew = rng.normal(size=(3, 3)).astype(np.float32), rng.uniform(0, 5, 3)
        full = pols[0](obs)
        rows.clear()
        masked = pols[1](obs)
        seen = set(rows)
        if step >= 2:  # episode 1 ended at step 1
            assert seen == {2} and np.all(masked[1] == 0)
            np.testing.assert_allclose(masked[[0, 2]], full[[0, 2]], atol=1e-6)
        else:
            np.testing.assert_allclose(masked, full, atol=1e-6)
        pols[0].observe(rew, np.zeros(3, bool))
        pols[1].observe(rew, np.array([False, step >= 1, False]))


# ---- the script: resume, eval-only, checkpoints, the two-file policy, errors
def _no_numpy(x):
    if isinstance(x, dict):
        return all(_no_numpy(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_no_numpy(v) for v in x)
    return not isinstance(x, (np.ndarray, np.generic))


def test_resume_eval_only_and_checkpoint(tiny_dataset, tmp_path):
    """12 updates straight == 6 + --resume to 12 (bitwise, 1 thread); --eval-only rebuilds the
    model from the checkpoint alone and repeats the last evaluation; the checkpoint is plain."""
    flags = TINY + ["--dataset-path", str(tiny_dataset("hopper", "medium")), "--eval-every", "6"]
    straight = dt.main(flags + ["--total-steps", "12"])
    half = dt.main(flags + ["--total-steps", "6"])
    ck_half = Path(half["run_dir"]) / "checkpoint.pt"
    resumed = dt.main(["--resume", str(ck_half), "--total-steps", "12", "--eval-episodes", "2",
                       "--eval-max-steps", "8", "--no-cuda"])
    a = common.load_checkpoint(Path(straight["run_dir"]) / "checkpoint.pt", "dt")
    b = common.load_checkpoint(ck_half, "dt")
    assert a["step"] == b["step"] == 12 and _no_numpy(a)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["eval/return_mean"] == straight["eval/return_mean"]
    assert set(straight) >= {"eval/target3600/normalized_score", "eval/target1800/return_mean"}
    lines = (Path(straight["run_dir"]) / "metrics.jsonl").read_text()
    assert "losses/action_loss" in lines and "eval/normalized_score" in lines
    ev = dt.main(["--eval-only", "--checkpoint", str(Path(straight["run_dir"]) / "checkpoint.pt"),
                  "--eval-episodes", "2", "--eval-max-steps", "8", "--no-cuda"])
    assert ev["eval/return_mean"] == pytest.approx(straight["eval/return_mean"], abs=1e-9)


def test_resume_a_decayed_run_to_more_updates(tiny_dataset):
    """A run whose rate decayed to 0, resumed to a larger --total-steps, trains from its first
    resumed update (at the new schedule's rate, not the saved 0)."""
    flags = TINY + ["--dataset-path", str(tiny_dataset("hopper", "medium")), "--eval-every", "6",
                    "--warmup-steps", "0", "--decay-steps", "3", "--dropout", "0"]
    ck = Path(dt.main(flags + ["--total-steps", "6"])["run_dir"]) / "checkpoint.pt"
    before = common.load_checkpoint(ck, "dt")["model"]
    dt.main(["--resume", str(ck), "--total-steps", "7", "--eval-every", "7", "--no-cuda"])
    after = common.load_checkpoint(ck, "dt")
    assert after["step"] == 7
    assert any(not torch.equal(before[k], after["model"][k]) for k in before)


def test_load_policy_two_files(tiny_dataset, tmp_path):
    """Copy only dt.py and common.py, load the checkpoint there, act in Hopper-v5: finite
    actions of shape (3,), equal to the same policy's actions in this process."""
    flags = TINY + ["--dataset-path", str(tiny_dataset("hopper", "medium")), "--total-steps", "3"]
    ckpt = Path(dt.main(flags)["run_dir"]).resolve() / "checkpoint.pt"
    work = tmp_path / "two_files"
    work.mkdir()
    for f in ("dt.py", "common.py"):
        shutil.copy(ROOT / f, work / f)
    script = (
        "import json, sys\nimport gymnasium as gym\nimport numpy as np\n"
        "from dt import load_policy\n"
        "policy = load_policy(sys.argv[1])\nenv = gym.make('Hopper-v5')\n"
        "obs, _ = env.reset(seed=0)\npolicy.reset(1)\nacts = []\n"
        "for _ in range(5):\n    act = policy(obs[None].astype(np.float32))[0]\n"
        "    obs, r, term, trunc, _ = env.step(act)\n    acts.append(act.tolist())\n"
        "    policy.observe(np.array([r], np.float32), np.array([term or trunc]))\n"
        "print(json.dumps(acts))\n")
    (work / "act.py").write_text(script)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "act.py", str(ckpt)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = np.array(json.loads(res.stdout.strip().splitlines()[-1]))
    assert theirs.shape == (5, 3) and np.isfinite(theirs).all()
    policy = dt.load_policy(ckpt)
    env_ = common.make_env("hopper")
    obs, _ = env_.reset(seed=0)
    policy.reset(1)
    for act in theirs:
        mine = policy(obs[None].astype(np.float32))[0]
        np.testing.assert_allclose(mine, act, atol=1e-5)
        obs, r, term, trunc, _ = env_.step(act)
        policy.observe(np.array([r], np.float32), np.array([term or trunc]))


def test_bad_input_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError):
        dt.main(TINY + ["--eval-only", "--checkpoint", str(bad)])
    with pytest.raises(ValueError, match="--checkpoint"):
        dt.main(TINY + ["--eval-only"])
    with pytest.raises(ValueError, match="--data-fraction"):
        dt.main(TINY + ["--data-fraction", "0"])
    with pytest.raises(ValueError, match="--decay-steps"):
        dt.main(TINY + ["--decay-steps", "-1"])
    with pytest.raises(ValueError, match="divisible"):
        dt.main(["--embed-dim", "10", "--n-head", "3"])
    with pytest.raises(ValueError, match="--target-returns"):
        dt.main(["--env", "InvertedPendulum-v5"])
