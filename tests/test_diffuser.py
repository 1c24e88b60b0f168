"""Tests of diffuser.py: schedule, x0 parameterization, inpainting, guidance, EMA, model sizes,
dataset targets, and smoke runs (train / resume / eval-only). CPU, offline, tiny models."""
import json

import numpy as np
import pytest
import torch

import common
import diffuser as D

CPU = torch.device("cpu")
TINY = ["--dim", "16", "--dim-mults", "1", "2", "--horizon", "8", "--batch-size", "8", "--no-cuda",
        "--n-plans", "3", "--ema-start", "0", "--ema-every", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def tiny_planner(warm=0, scale=0.1, n_plans=3, horizon=8, obs_dim=11, act_dim=3):
    torch.manual_seed(0)
    args = D.resolve_defaults(D.Args(dim=16, dim_mults=(1, 2), horizon=horizon, n_plans=n_plans,
                                     warm_start_steps=warm, guide_scale=scale))
    model, value, diff = D.build(args, obs_dim, act_dim, CPU)
    D_ = obs_dim + act_dim
    mean = np.linspace(-1, 1, D_).astype(np.float32)
    std = np.linspace(0.5, 2, D_).astype(np.float32)
    return D.Planner(model.eval(), value.eval(), diff, mean, std, args, CPU), args


def test_cosine_schedule_constants():
    T = 20
    diff = D.Diffusion(T, 3, 8, 14, 10.0, CPU)
    s = 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    ab = diff.alphas_cumprod.double().numpy()
    # alpha_bar_t = f(t+1) / f(0) for every step whose beta was not clipped (all but the last)
    np.testing.assert_allclose(ab[:-1], f(np.arange(1, T)) / f(0), rtol=1e-5)
    betas = diff.betas.double().numpy()
    assert np.all(betas > 0) and np.all(betas <= 0.999 + 1e-6) and betas[-1] == pytest.approx(0.999)
    assert np.all(np.diff(betas) > 0)  # noise grows with t
    np.testing.assert_allclose(ab, np.cumprod(1 - betas), rtol=1e-4)
    # posterior q(x_t | x_{t+1}, x0): variance and mean coefficients of DDPM Eq. 7
    prev = np.append(1.0, ab[:-1])
    np.testing.assert_allclose(diff.posterior_variance.numpy(), betas * (1 - prev) / (1 - ab), rtol=1e-5)
    assert diff.posterior_variance[0].item() == pytest.approx(0.0, abs=1e-12)  # no noise at the last step
    assert diff.coef_x0[0].item() == pytest.approx(1.0) and diff.coef_xt[0].item() == pytest.approx(0.0, abs=1e-6)
    # loss weights: first action x10, everything else 1
    assert diff.loss_weights[0, :3].eq(10).all() and diff.loss_weights[0, 3:].eq(1).all()
    assert diff.loss_weights[1:].eq(1).all()


def test_x0_parameterization_loss_and_sampler():
    torch.manual_seed(0)
    diff = D.Diffusion(20, 3, 8, 14, 10.0, CPU)
    x0 = torch.randn(6, 8, 14)
    oracle = lambda xt, t: x0.clone()  # predicts the clean plan itself -> zero loss (target is x0, not eps)
    assert diff.loss(oracle, x0).item() == pytest.approx(0.0, abs=1e-10)
    assert diff.loss(lambda xt, t: xt, x0).item() > 0.01
    # a sampler whose network always answers x* must end exactly at x* (state slot inpainted)
    planner, args = tiny_planner(scale=0.0)
    target = torch.randn(8, 14)
    planner.model = lambda x, t: target.expand_as(x)
    state = torch.randn(5, 11)
    out = planner.denoise(torch.randn(5, 8, 14), state, args.n_diffusion_steps)
    expect = target.expand(5, 8, 14).clone()
    expect[:, 0, 3:] = state
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("warm", [0, 5])
def test_inpainted_state_unchanged_every_step(warm):
    planner, args = tiny_planner(warm=warm, scale=0.1)
    seen = []
    planner.on_step = lambda x, t: seen.append((t, x[:, 0, 3:].clone()))
    obs = np.random.default_rng(0).normal(size=(2, 11)).astype(np.float32)
    planner.reset(2)
    planner(obs)                         # first decision: always a full replan
    seen_first = list(seen)
    seen.clear()
    planner(obs + 0.1)                   # second decision: warm start when warm > 0
    assert [t for t, _ in seen_first] == list(range(args.n_diffusion_steps))[::-1]
    assert [t for t, _ in seen] == list(range(warm or args.n_diffusion_steps))[::-1]
    for o, steps in ((obs, seen_first), (obs + 0.1, seen)):
        s = (torch.as_tensor(o) - planner.mean[3:]) / planner.std[3:]
        for _, x_state in steps:
            torch.testing.assert_close(x_state, s.repeat_interleave(args.n_plans, 0))


def test_guided_step_raises_value():
    planner, args = tiny_planner(scale=0.1)
    torch.manual_seed(1)
    x, state, t = torch.randn(16, 8, 14), torch.randn(16, 11), 10
    x = planner.diff.inpaint(x, state)
    before, g = planner.value_grad(x, t)
    assert g[:, 0, 3:].abs().sum() > 0  # the gradient touches the state slot; guide() must undo that
    planner.args.guide_scale = 1e-2 / (planner.diff.posterior_variance[t].item() * g.norm(dim=(1, 2)).max().item())
    x2 = planner.guide(x, state, t)
    after, _ = planner.value_grad(x2, t)
    assert (after > before).all(), (after - before)
    torch.testing.assert_close(x2[:, 0, 3:], state)


def test_ema_update():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    old = [p.detach().clone() for p in a.parameters()]
    D.ema_update(a, b, 0.995)
    for o, e, p in zip(old, a.parameters(), b.parameters()):
        torch.testing.assert_close(e, 0.995 * o + 0.005 * p)
    D.ema_update(a, b, 0.0)  # decay 0 (before ema_start): a plain copy
    for e, p in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(e, p)


def test_model_sizes_and_shapes():
    hop = D.resolve_defaults(D.Args(env="hopper"))
    unet = D.TemporalUnet(14, hop.dim, hop.dim_mults, hop.attention)
    n = sum(p.numel() for p in unet.parameters())
    assert 3.5e6 < n < 4.5e6, n  # paper: ~4M parameters for the locomotion model
    x = torch.randn(2, hop.horizon, 14)
    assert unet(x, torch.tensor([0, 19])).shape == x.shape
    assert D.ValueNet(hop.horizon, 14, hop.dim, hop.dim_mults)(x, torch.tensor([0, 19])).shape == (2,)
    hc = D.resolve_defaults(D.Args(env="halfcheetah"))
    assert (hc.horizon, hc.dim_mults, hc.attention) == (4, (1, 4, 8), True)
    unet = D.TemporalUnet(23, hc.dim, hc.dim_mults, hc.attention)
    assert any(isinstance(m, D.SelfAttention) for m in unet.modules())
    x = torch.randn(2, 4, 23)
    assert unet(x, torch.tensor([3, 7])).shape == x.shape
    assert D.ValueNet(4, 23, hc.dim, hc.dim_mults)(x, torch.tensor([3, 7])).shape == (2,)
    with pytest.raises(ValueError, match="multiple of 8"):
        D.resolve_defaults(D.Args(horizon=12))


def test_dataset_windows_and_value_targets():
    rng = np.random.default_rng(0)
    L1, L2, H = 6, 4, 3
    n = L1 + L2
    data = dict(observations=rng.normal(size=(n, 2)).astype(np.float32), actions=rng.normal(size=(n, 1)).astype(np.float32),
                rewards=np.arange(n, dtype=np.float32), terminals=np.zeros(n, bool), timeouts=np.zeros(n, bool))
    data["terminals"][L1 - 1] = True   # episode 1 terminates: -100 on its last reward
    data["timeouts"][n - 1] = True     # episode 2 times out: no penalty
    ds = D.PlanDataset(data, H, 0.9, -100.0, CPU)
    assert len(ds.starts) == (L1 - 1) + (L2 - 1)  # every start but an episode's last step
    r1 = np.arange(L1, dtype=np.float64)
    r1[-1] -= 100
    np.testing.assert_allclose(ds.values[0].item(), sum(0.9**k * r1[k] for k in range(L1)), rtol=1e-5)
    r2 = np.arange(L1, n, dtype=np.float64)
    np.testing.assert_allclose(ds.values[L1 - 1].item(), sum(0.9**k * r2[k] for k in range(L2)), rtol=1e-5)
    x, v = ds.sample(32, torch.Generator().manual_seed(0))
    assert x.shape == (32, H, 3) and v.shape == (32,)
    raw = torch.cat([torch.as_tensor(data["actions"]), torch.as_tensor(data["observations"])], 1)
    torch.testing.assert_close(ds.flat[0] * torch.as_tensor(ds.std) + torch.as_tensor(ds.mean), raw[0])
    # a window that runs past the episode end sees zero padding (raw zeros)
    last = ds.flat[ds.starts[L1 - 2] + H - 1] * torch.as_tensor(ds.std) + torch.as_tensor(ds.mean)
    torch.testing.assert_close(last, torch.zeros(3), atol=1e-5, rtol=0)


def test_smoke_train_resume_eval_only(tiny_dataset, tmp_path):
    path = str(tiny_dataset())
    base = TINY + ["--dataset-path", path, "--log-every", "2"]
    full = D.main(base + ["--total-steps", "6", "--eval-episodes", "0", "--run-dir", str(tmp_path / "a")])
    D.main(base + ["--total-steps", "3", "--eval-episodes", "0", "--run-dir", str(tmp_path / "b")])
    D.main(base + ["--total-steps", "6", "--eval-episodes", "0", "--run-dir", str(tmp_path / "b"),
                   "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == full["step"] == 6
    for k in ("model", "value", "model_ema"):
        for name in a[k]:
            torch.testing.assert_close(a[k][name], b[k][name], msg=f"{k}.{name} differs after resume")
    # evaluation inside training (warm start) and --eval-only on the checkpoint
    m = D.main(base + ["--total-steps", "2", "--eval-episodes", "2", "--max-episode-steps", "3",
                       "--warm-start-steps", "2", "--run-dir", str(tmp_path / "c")])
    assert np.isfinite(m["eval/return_mean"]) and m["eval/length_mean"] <= 3
    lines = [json.loads(s) for s in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/normalized_score" in r for r in lines) and any("losses/diffusion_loss" in r for r in lines)
    e = D.main(["--eval-only", "--checkpoint", str(tmp_path / "c" / "checkpoint.pt"), "--no-cuda", "--n-plans", "2",
                "--eval-episodes", "2", "--max-episode-steps", "2", "--run-dir", str(tmp_path / "d")])
    assert e["eval/length_mean"] <= 2
    with pytest.raises(ValueError, match="trained on env"):
        D.main(["--eval-only", "--checkpoint", str(tmp_path / "c" / "checkpoint.pt"), "--env", "walker2d",
                "--run-dir", str(tmp_path / "e")])
    with pytest.raises(common.CheckpointError):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        D.main(["--eval-only", "--checkpoint", str(bad), "--run-dir", str(tmp_path / "f")])
