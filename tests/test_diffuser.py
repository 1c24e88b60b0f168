"""Tests of diffuser.py against the paper (arXiv 2205.09991) and the official code
(jannerm/diffuser): schedule, losses, inpainting, guidance, ranking, warm start, data, EMA, model
sizes, runs. Expected values: numpy formulas written here, or the official code's numbers."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import diffuser as D

CPU = torch.device("cpu")
T, OBS, ACT, DIM = 20, 11, 3, 14                       # hopper sizes; D = act + obs
TINY = ["--dim", "16", "--dim-mults", "1", "2", "--horizon", "8", "--batch-size", "8", "--no-cuda",
        "--n-plans", "3", "--eval-episodes", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets; also makes the resume comparison exact
    yield
    torch.set_num_threads(n)


def alpha_bar(T=T, s=0.008):
    """Nichol & Dhariwal's cosine alpha_bar at levels 0..T (numpy, float64)."""
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    return f / f[0]


def schedule(T=T):
    """(betas, posterior variance, mean coefficients) of step index t = 0..T-1 (x_{t+1} -> x_t)."""
    ab = alpha_bar(T)
    betas = np.clip(1 - ab[1:] / ab[:-1], 0, 0.999)
    acp = np.cumprod(1 - betas)
    prev = np.append(1.0, acp[:-1])
    return betas, betas * (1 - prev) / (1 - acp), betas * np.sqrt(prev) / (1 - acp), \
        (1 - prev) * np.sqrt(1 - betas) / (1 - acp)


def tiny_planner(n_plans=3, **kw):
    torch.manual_seed(0)
    args = D.resolve(D.Args(dim=16, dim_mults=(1, 2), horizon=8, n_plans=n_plans, **kw))
    model, value, diff = D.build(args, OBS, ACT, CPU)
    mean = torch.linspace(-1, 1, DIM)
    std = torch.linspace(0.5, 2, DIM)
    return D.Planner(model.eval(), value.eval(), diff, mean, std, args, CPU), args


def test_cosine_schedule_and_posterior():
    diff = D.Diffusion(T, ACT, 8, DIM, CPU)
    betas, var, c0, ct = schedule()
    ab = alpha_bar()
    np.testing.assert_allclose(diff.alphas_cumprod[:-1].numpy(), ab[1:-1], rtol=1e-5)  # exactly t/T
    np.testing.assert_allclose(diff.betas.numpy(), betas, rtol=1e-5)
    assert diff.betas[-1].item() == pytest.approx(0.999)
    np.testing.assert_allclose(diff.posterior_variance.numpy(), var, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(diff.posterior_std[1:].numpy(), np.sqrt(var[1:]), rtol=1e-5)
    np.testing.assert_allclose(diff.coef_x0.numpy(), c0, rtol=1e-5)
    np.testing.assert_allclose(diff.coef_xt.numpy(), ct, rtol=1e-5, atol=1e-7)
    assert ab[5] == pytest.approx(0.8470122, rel=1e-6)   # literal: x_5 of T = 20 keeps 85% signal


def test_loss_x0_target_first_action_weight_and_inpainting():
    diff = D.Diffusion(T, ACT, 8, DIM, CPU)
    x0 = torch.randn(4, 8, DIM)
    seen = []

    def model(xt, t, err=None):
        seen.append((xt.clone(), t))
        out = x0.clone()
        out[:, 0, ACT:] += 100.0           # garbage in the state slot: inpainted away (Sec. 3.3)
        if err is not None:
            out[(slice(None), *err)] += 0.5
        return out
    assert diff.loss(model, x0).item() == pytest.approx(0.0, abs=1e-12)   # predicts x0, not eps
    xt, t = seen[0]
    torch.testing.assert_close(xt[:, 0, ACT:], x0[:, 0, ACT:])  # the noisy input is inpainted
    assert t.min() >= 0 and t.max() < T
    n = 8 * DIM
    for err, w in (((0, 0), 10.0), ((0, ACT - 1), 10.0), ((1, 0), 1.0), ((7, DIM - 1), 1.0)):
        got = diff.loss(lambda a, b: model(a, b, err), x0).item()
        assert got == pytest.approx(w * 0.25 / n, rel=1e-5), err   # only a_0 weighs x10


def test_training_noise_levels_and_value_loss():
    diff = D.Diffusion(T, ACT, 8, DIM, CPU)
    x0, target = torch.randn(64, 8, DIM), torch.randn(64)
    rec = {}
    torch.manual_seed(3)
    loss = diff.value_loss(lambda x, t: rec.update(x=x.clone(), t=t) or x.sum((1, 2)), x0, target)
    torch.manual_seed(3)               # the same draws, redone by hand: t, then the noise
    t = torch.randint(0, T, (64,))
    noise = torch.randn_like(x0)
    betas = schedule()[0]                                    # the last beta clipped to 0.999
    ab = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)[t][:, None, None]  # x_{t+1}
    expect = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    expect[:, 0, ACT:] = x0[:, 0, ACT:]
    torch.testing.assert_close(rec["t"], t)
    torch.testing.assert_close(rec["x"], expect, rtol=1e-5, atol=1e-5)
    mse = ((expect.sum((1, 2)) - target) ** 2).mean().item()
    assert loss.item() == pytest.approx(mse, rel=1e-5)


def test_sampler_steps_are_the_ddpm_posterior():
    planner, args = tiny_planner(guide_scale=0.0)
    target = torch.randn(8, DIM)
    planner.model = lambda x, t: target.expand_as(x)
    state = torch.randn(5, OBS)
    steps = []
    planner.on_step = lambda x, t: steps.append(x.clone())
    x_T = torch.randn(5, 8, DIM)
    planner.gen.manual_seed(11)
    out, _ = planner.denoise(x_T.clone(), state, T)
    expect = target.expand(5, 8, DIM).clone()
    expect[:, 0, ACT:] = state
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)  # no noise at t = 0, x0 kept
    _, var, c0, ct = schedule()
    g = torch.Generator().manual_seed(11)
    first = c0[-1] * target + ct[-1] * planner.diff.inpaint(x_T.clone(), state) \
        + np.sqrt(var[-1]) * torch.randn((5, 8, DIM), generator=g)
    first[:, 0, ACT:] = state
    torch.testing.assert_close(steps[0], first.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("warm", [0, 5])
def test_inpainted_state_unchanged_every_step(warm):
    planner, args = tiny_planner(warm_start_steps=warm)
    seen = []
    planner.on_step = lambda x, t: seen.append((t, x[:, 0, ACT:].clone()))
    obs = np.random.default_rng(0).normal(size=(2, OBS)).astype(np.float32)
    planner.reset(2)
    planner(obs)                                         # first decision: a full replan
    first = list(seen)
    seen.clear()
    planner(obs + 0.1)                                   # then a warm start when warm > 0
    assert [t for t, _ in first] == list(range(T))[::-1]
    assert [t for t, _ in seen] == list(range(warm or T))[::-1]
    for o, steps in ((obs, first), (obs + 0.1, seen)):
        s = (torch.as_tensor(o) - planner.mean[ACT:]) / planner.std[ACT:]
        for _, x_state in steps:
            torch.testing.assert_close(x_state, s.repeat_interleave(args.n_plans, 0))


def linear_value(w, calls=None):
    """J(x, t) = sum(w * x): grad J = w everywhere."""
    def J(x, t):
        if calls is not None:
            calls.append((int(t[0]), torch.is_grad_enabled(), x.detach().clone()))
        return (x * w).sum((1, 2))
    return J


def test_guide_step_adds_scale_times_posterior_variance_times_grad():
    planner, args = tiny_planner(guide_scale=0.3)
    w = torch.randn(8, DIM)
    planner.value = linear_value(w)
    x, state, t = torch.randn(6, 8, DIM), torch.randn(6, OBS), 10
    x = planner.diff.inpaint(x, state)
    out, y = planner.guide(x.clone(), state, t)
    var = schedule()[1][t]                      # Sigma_t, the variance (not the std)
    expect = x + 2 * 0.3 * var * w              # n_guide_steps = 2
    expect[:, 0, ACT:] = state
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    step1 = planner.diff.inpaint(x + 0.3 * var * w, state)
    torch.testing.assert_close(y, (step1 * w).sum((1, 2)))   # J of the last step, before its move


def test_guide_before_denoise_and_t_stopgrad():
    for env, dataset, stop in (("hopper", "medium", 2), ("halfcheetah", "medium", 4)):
        planner, args = tiny_planner(env=env, dataset=dataset)
        assert args.t_stopgrad == stop
        w, calls, inputs = torch.randn(8, DIM), [], []
        planner.value = linear_value(w, calls)
        model = planner.model
        planner.model = lambda x, t: inputs.append(x.clone()) or model(x, t)
        planner.gen.manual_seed(5)
        obs = torch.randn(1, OBS)
        planner.plan(obs)
        grads = [t for t, g, _ in calls if g]
        assert grads == [t for t in range(T - 1, stop - 1, -1) for _ in range(2)], env
        assert [(t, g) for t, g, _ in calls if not g] == [(0, False)]   # ranking: J(x_1, 0)
        g = torch.Generator().manual_seed(5)
        x_T = torch.randn((args.n_plans, 8, DIM), generator=g)
        s = (obs - planner.mean[ACT:]) / planner.std[ACT:]
        expect = x_T + 2 * args.guide_scale * schedule()[1][T - 1] * w   # guided, then denoised
        expect[:, 0, ACT:] = s
        torch.testing.assert_close(inputs[0], expect, rtol=1e-5, atol=1e-5)


def test_plans_ranked_by_value_of_last_guide_step():
    planner, args = tiny_planner(n_plans=16, seed=1)
    value, calls, finals = planner.value, [], []
    planner.value = lambda x, t: calls.append(x.clone()) or value(x, t)
    planner.on_step = lambda x, t: finals.append(x.clone())
    obs = torch.randn(2, OBS)
    plans, values = planner.plan(obs)
    with torch.no_grad():
        y = value(calls[-1], torch.zeros(32)).view(2, 16)              # J(x_1, t = 0)
        y_final = value(finals[-1], torch.zeros(32)).view(2, 16)       # J(x_0, t = 0)
    assert (y.argmax(1) != y_final.argmax(1)).any()   # the two rankings differ on this seed
    best = y.argmax(1)
    torch.testing.assert_close(values, y.max(1).values)
    torch.testing.assert_close(plans, finals[-1].view(2, 16, 8, DIM)[torch.arange(2), best])


def test_warm_start_shifts_previous_plan_and_renoises_to_level_k():
    k = 5
    planner, args = tiny_planner(n_plans=4, warm_start_steps=k, guide_scale=0.0)
    prev = torch.arange(8.0)[None, :, None].expand(2, 8, DIM) + torch.randn(2, 8, DIM)  # (n, H, D)
    inputs = []
    model = planner.model
    planner.model = lambda x, t: inputs.append((int(t[0]), x.clone())) or model(x, t)
    obs = torch.randn(2, OBS)
    state = planner.gen.get_state()
    planner.plan(obs, prev)
    noise = torch.randn((8, 8, DIM), generator=torch.Generator().set_state(state))
    shifted = torch.cat([prev[:, 1:], prev[:, -1:]], 1).repeat_interleave(4, 0)   # a_1.. first
    ab = alpha_bar()[k]                                                           # level k
    expect = np.sqrt(ab) * shifted + np.sqrt(1 - ab) * noise
    expect[:, 0, ACT:] = ((obs - planner.mean[ACT:]) / planner.std[ACT:]).repeat_interleave(4, 0)
    assert [t for t, _ in inputs] == list(range(k))[::-1]
    torch.testing.assert_close(inputs[0][1], expect.float(), rtol=1e-5, atol=1e-5)


def test_per_dataset_guidance_and_model_defaults():
    cases = {("hopper", "medium"): (0.1, 2), ("hopper", "medium-expert"): (1e-4, 4),
             ("walker2d", "medium-expert"): (0.1, 2), ("halfcheetah", "medium"): (1e-3, 4),
             ("halfcheetah", "medium-replay"): (1e-3, 4),
             ("halfcheetah", "medium-expert"): (1e-3, 4)}
    for (env, ds), expect in cases.items():
        a = D.resolve(D.Args(env=env, dataset=ds))
        assert (a.guide_scale, a.t_stopgrad) == expect, (env, ds)
    a = D.resolve(D.Args(env="halfcheetah", guide_scale=0.05, t_stopgrad=0))
    assert (a.guide_scale, a.t_stopgrad, a.horizon, a.dim_mults) == (0.05, 0, 4, (1, 4, 8))
    assert (D.resolve(D.Args()).horizon, D.resolve(D.Args()).dim_mults) == (32, (1, 2, 4, 8))
    for bad, match in ((dict(horizon=12), "multiple of 8"), (dict(dim=12), "GroupNorm"),
                       (dict(warm_start_steps=21), "warm-start-steps")):
        with pytest.raises(ValueError, match=match):
            D.resolve(D.Args(**bad))


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_official_parameter_counts():
    hop = D.resolve(D.Args(env="hopper"))
    model, value, _ = D.build(hop, 11, 3, CPU)
    assert (count(model), count(value)) == (3_956_302, 2_294_817)   # official hopper nets
    hc = D.resolve(D.Args(env="halfcheetah"))
    model, value, _ = D.build(hc, 17, 6, CPU)
    assert (count(model), count(value)) == (4_114_423, 2_180_833)   # official models/temporal.py
    assert sum(isinstance(m, D.LinearAttention) for m in model.modules()) == 6
    x = torch.randn(2, 4, 23)
    assert model(x, torch.tensor([3, 7])).shape == x.shape
    assert value(x, torch.tensor([0, 1])).shape == (2,)


def test_linear_attention_matches_numpy_reference():
    torch.manual_seed(0)
    att = D.LinearAttention(8, heads=2, dim_head=4)
    for p in att.parameters():
        p.data.normal_()
    x = torch.randn(3, 8, 5)                                   # (B, C, H)
    X = x.double().numpy()
    mu, var = X.mean(1, keepdims=True), X.var(1, keepdims=True)
    g, b = att.norm.weight.detach().double().numpy(), att.norm.bias.detach().double().numpy()
    h = (X - mu) / np.sqrt(var + 1e-5) * g[:, None] + b[:, None]
    qkv = np.einsum("oc,bch->boh", att.qkv.weight.detach().double().numpy()[:, :, 0], h)
    q, k, v = (z.reshape(3, 2, 4, 5) for z in np.split(qkv, 3, 1))       # (B, heads, dh, H)
    k = np.exp(k) / np.exp(k).sum(-1, keepdims=True)                      # softmax over time
    ctx = np.einsum("bhdn,bhen->bhde", k, v)
    o = np.einsum("bhde,bhdn->bhen", ctx, q / 2.0).reshape(3, 8, 5)       # q * dim_head^-0.5
    out = X + np.einsum("oc,bch->boh", att.out.weight.detach().double().numpy()[:, :, 0], o) \
        + att.out.bias.detach().double().numpy()[:, None]
    np.testing.assert_allclose(att(x).detach().numpy(), out, rtol=1e-4, atol=1e-4)


def test_time_embedding_is_the_official_sinusoid():
    emb = D.TimeEmbedding(8)
    t = torch.tensor([0, 3, 19])
    freqs = np.exp(-np.log(10000) * np.arange(4) / 3)              # dim / 2 log-spaced, 1 .. 1e-4
    ref = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], 1)
    torch.testing.assert_close(emb(t), emb[2](emb[1](emb[0](torch.tensor(ref).float()))))


def test_ema_update_and_official_schedule():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    old = [p.detach().clone() for p in a.parameters()]
    D.ema_update(a, b, 0.995)
    for o, e, p in zip(old, a.parameters(), b.parameters()):
        torch.testing.assert_close(e, 0.995 * o + 0.005 * p)
    # official Trainer: step_ema after updates 1, 11, 21, ...; a copy until step 2000 (0-based)
    assert (D.Args().ema_every, D.Args().ema_start, D.EMA_DECAY) == (10, 2000, 0.995)
    got = {s: D.ema_decay(s, 10, 2000) for s in (1, 2, 10, 11, 1991, 2000, 2001, 2002, 2011)}
    assert got == {1: 0.0, 2: None, 10: None, 11: 0.0, 1991: 0.0, 2000: None, 2001: 0.995,
                   2002: None, 2011: 0.995}


def test_dataset_windows_value_targets_and_normalizer():
    rng = np.random.default_rng(0)
    L1, L2, H = 6, 4, 3
    n = L1 + L2
    data = dict(observations=rng.normal(size=(n, 2)), actions=rng.normal(size=(n, 1)),
                rewards=np.arange(n, dtype=np.float64), terminals=np.zeros(n, bool),
                timeouts=np.zeros(n, bool))
    data["terminals"][L1 - 1] = True   # episode 1 terminates: -100 on its last reward
    data["timeouts"][n - 1] = True     # episode 2 times out: no penalty
    ds = D.PlanDataset(data, H, 0.9, -100.0, CPU)
    assert len(ds.starts) == (L1 - 1) + (L2 - 1)   # official make_indices: start < L - 1
    r1 = np.arange(L1, dtype=np.float64)
    r1[-1] -= 100
    r2 = np.arange(L1, n, dtype=np.float64)
    expect = [sum(0.9 ** j * r1[s + j] for j in range(L1 - s)) for s in range(L1 - 1)] + \
             [sum(0.9 ** j * r2[s + j] for j in range(L2 - s)) for s in range(L2 - 1)]
    np.testing.assert_allclose(ds.values.numpy(), expect, rtol=1e-5)
    raw = np.concatenate([data["actions"], data["observations"]], 1)       # actions first
    np.testing.assert_allclose(ds.mean.numpy(), raw.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.std.numpy(), raw.std(0), rtol=1e-5)     # ddof 0, no padding
    x, v = ds.sample(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, H, 3) and v.shape == (64,)
    unnorm = x * ds.std + ds.mean
    i = int(torch.nonzero(v == ds.values[L1 - 2])[0])                    # the last start of ep 1
    np.testing.assert_allclose(unnorm[i].numpy(), np.r_[raw[L1 - 2:L1], np.zeros((1, 3))],
                               rtol=1e-5, atol=1e-5)                       # runs into zero padding
    short = D.PlanDataset(data, H, 0.9, -100.0, CPU, max_path_length=5)
    assert len(short.starts) == 2 + 2                                     # start < 1000 - H too


def test_policy_unnormalizes_first_action_and_skips_finished_envs():
    planner, args = tiny_planner(guide_scale=0.0)
    plan = torch.randn(8, DIM)
    planner.model = lambda x, t: plan.expand_as(x)
    planner.reset(3)
    planner.observe(np.zeros(3), np.array([False, True, False]))
    calls = []
    plan_fn = planner.plan
    planner.plan = lambda o, p: calls.append(len(o)) or plan_fn(o, p)
    act = planner(np.zeros((3, OBS), np.float32))
    first = plan[0, :ACT] * planner.std[:ACT] + planner.mean[:ACT]
    np.testing.assert_allclose(act[[0, 2]], first.expand(2, ACT).numpy(), rtol=1e-5, atol=1e-5)
    assert (act[1] == 0).all() and calls == [2]


def _train(extra, tmp):
    cwd = os.getcwd()
    Path(tmp).mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)
    try:
        D.main(TINY + extra)
    finally:
        os.chdir(cwd)
    return sorted(Path(tmp, "runs").glob("*/checkpoint.pt"), key=os.path.getmtime)[-1]


def test_train_resume_exact_ema_and_eval_only(tiny_dataset, tmp_path, capsys):
    data = ["--dataset-path", str(tiny_dataset())]
    a = _train(data + ["--total-steps", "12"], tmp_path / "a")
    b = _train(data + ["--total-steps", "6"], tmp_path / "b")
    b = _train(data + ["--total-steps", "12", "--resume", str(b)], tmp_path / "b")
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == 12 and isinstance(ca["mean"], torch.Tensor)
    for k in ("model", "value", "model_ema", "value_ema"):
        for name in ca[k]:
            torch.testing.assert_close(ca[k][name], cb[k][name], msg=f"{k}.{name} after resume")
    torch.testing.assert_close(ca["optimizer"]["state"], cb["optimizer"]["state"])
    c = torch.load(_train(data + ["--total-steps", "11"], tmp_path / "c"), weights_only=True)
    for k in ("model", "value"):             # update 11 copies the weights into the EMA
        for name in c[k]:
            torch.testing.assert_close(c[k + "_ema"][name], c[k][name])
        assert any(not torch.equal(ca[k + "_ema"][n], ca[k][n]) for n in ca[k])   # not at 12
    m = D.main(["--eval-only", "--checkpoint", str(a), "--no-cuda", "--n-plans", "2",
                "--eval-episodes", "2", "--eval-max-steps", "3", "--warm-start-steps", "2",
                "--bf16"])
    assert np.isfinite(m["eval/return_mean"]) and m["eval/length_mean"] <= 3
    assert "hopper: return" in capsys.readouterr().out
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError):
        D.main(["--eval-only", "--checkpoint", str(bad)])
    with pytest.raises(ValueError, match="--checkpoint"):
        D.main(["--eval-only"])
    with pytest.raises(ValueError, match="overrides only"):
        D.load_policy(a, dim=64)


def test_eval_inside_training_logs_metrics(tiny_dataset, tmp_path):
    ckpt = _train(["--dataset-path", str(tiny_dataset()), "--total-steps", "2", "--eval-episodes",
                   "2", "--eval-max-steps", "3", "--warm-start-steps", "2"], tmp_path)
    lines = (ckpt.parent / "metrics.jsonl").read_text()
    assert "eval/normalized_score" in lines and "eval/vector_steps_per_s" in lines


SCRIPT = """
import gymnasium, numpy as np
from diffuser import load_policy
policy = load_policy("{ckpt}")
env = gymnasium.make("Hopper-v5")
obs, _ = env.reset(seed=0)
policy.reset(1)
acts = []
for _ in range(3):
    acts.append(policy(obs[None].astype(np.float32))[0])
    obs, r, term, trunc, _ = env.step(acts[-1])
    policy.observe(np.array([r], np.float32), np.array([term or trunc]))
np.save("{out}", np.stack(acts))
"""


def test_load_policy_with_two_files(tiny_dataset, tmp_path):
    import gymnasium
    ckpt = _train(["--dataset-path", str(tiny_dataset()), "--total-steps", "2"], tmp_path / "run")
    work = tmp_path / "copy"
    work.mkdir()
    for f in ("diffuser.py", "common.py"):
        (work / f).write_text((Path(D.__file__).parent / f).read_text())
    (work / "act.py").write_text(SCRIPT.format(ckpt=ckpt, out=work / "acts.npy"))
    env = dict(os.environ, OMP_NUM_THREADS="1", SEQRL_DATA_DIR=os.environ["SEQRL_DATA_DIR"])
    subprocess.run([sys.executable, "act.py"], cwd=work, env=env, check=True, timeout=120)
    acts = np.load(work / "acts.npy")
    policy = D.load_policy(ckpt)
    e = gymnasium.make("Hopper-v5")
    obs, _ = e.reset(seed=0)
    policy.reset(1)
    for a in acts:
        mine = policy(obs[None].astype(np.float32))[0]
        np.testing.assert_allclose(a, mine, atol=1e-5)
        obs, r, term, trunc, _ = e.step(mine)
        policy.observe(np.array([r], np.float32), np.array([term or trunc]))
    assert acts.shape == (3, ACT) and np.isfinite(acts).all()
