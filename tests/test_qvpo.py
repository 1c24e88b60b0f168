"""qvpo.py (QVPO, arXiv 2405.16173; official code wadx2019/qvpo): the update against an
independent reference, the sampler against a numpy DDPM, official constants, runs and resume."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import common
import make_datasets
import qvpo

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--critic-hidden", "16", "--n-timesteps", "4", "--n-train-samples", "6",
        "--batch-size", "8", "--eval-episodes", "2", "--eval-max-steps", "5", "--log-every", "5",
        "--no-cuda"]


def np_cosine_betas(T, s=0.008):  # Nichol & Dhariwal 2021, written here independently
    x = np.arange(T + 1) / T
    abar = np.cos((x + s) / (1 + s) * np.pi / 2) ** 2
    return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


def ref_denoise(eps_fn, s, noise):
    """DDPM reverse process (Ho et al. 2020, x0 clamped as the official p_mean_variance) in
    float64 numpy. s (B, S), noise (B, N, T, A): [.., 0] is a_T, [.., k] the k-th step's noise."""
    T = noise.shape[2]
    betas = np_cosine_betas(T)
    alphas, abar = 1 - betas, np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    x = noise[:, :, 0]
    for k, t in enumerate(reversed(range(T))):
        x0 = np.clip(x / np.sqrt(abar[t]) - np.sqrt(1 / abar[t] - 1) * eps_fn(x, t, s), -1, 1)
        x = (betas[t] * np.sqrt(abar_prev[t]) * x0 + (1 - abar_prev[t]) * np.sqrt(alphas[t]) * x
             ) / (1 - abar[t])
        if t > 0:
            x = x + np.sqrt(betas[t] * (1 - abar_prev[t]) / (1 - abar[t])) * noise[:, :, k + 1]
    return np.clip(x, -1, 1)


# ---- official constants, architecture, initialization
def test_official_defaults_and_parameter_counts():
    a = qvpo.Args()
    assert (a.batch_size, a.gamma, a.tau, a.lr, a.critic_lr) == (256, 0.99, 0.005, 1e-4, 3e-4)
    assert (a.n_timesteps, a.n_train_samples, a.entropy_alpha) == (20, 64, 0.02)
    assert (a.learning_starts, a.total_steps, a.eval_every, a.eval_episodes) == (
        10_000, 1_000_000, 10_000, 10)
    assert (a.hidden, a.critic_hidden) == (256, 256)
    assert (qvpo.BEHAVIOR_SAMPLES, qvpo.TARGET_SAMPLES, qvpo.EVAL_SAMPLES) == (4, 4, 32)
    assert (qvpo.ENTROPY_SAMPLES, qvpo.ALPHA_MIN, qvpo.BUFFER_SIZE) == (10, 0.002, 1_000_000)
    assert (qvpo.ADAM_EPS, qvpo.GRAD_CLIP) == (1e-5, 2.0)
    agent = qvpo.Agent(11, 3, a)  # hopper: obs 11, act 3

    def count(m):
        return sum(p.numel() for p in m.parameters())

    # time MLP 32*256+256 + 256*32+32; MLP (11+3+32)*256+256 + 2*(256*256+256) + 256*3+3
    assert count(agent.actor) == 16_672 + 144_387 == 161_059
    assert count(agent.critic) == 2 * (14 * 256 + 256 + 2 * (256 * 256 + 256) + 257) == 271_362
    for opt, lr in ((agent.actor_opt, 1e-4), (agent.critic_opt, 3e-4)):
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == lr and opt.defaults["eps"] == 1e-5


def test_official_init_and_time_embedding():
    torch.manual_seed(0)
    actor, critic = qvpo.DiffusionPolicy(11, 3), qvpo.TwinQ(11, 3)
    linears = [m for m in [*actor.modules(), *critic.modules()] if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 4 + 8
    for m in linears:  # official init_weights: N(0, 1 / (2 sqrt(fan_in))), bias 0
        assert (m.bias == 0).all()
        if m.weight.numel() >= 8000:
            assert m.weight.std().item() == pytest.approx(0.5 / np.sqrt(m.in_features), rel=0.05)
    time_mlp = actor.eps.time
    assert [tuple(m.weight.shape) for m in time_mlp if isinstance(m, torch.nn.Linear)] == [
        (256, 32), (32, 256)]
    assert isinstance(time_mlp[2], torch.nn.Mish)
    t = torch.tensor([0, 3, 19])
    f = np.exp(-np.log(10000) * np.arange(16) / 15)  # sinusoidal, 32 wide
    want = np.concatenate([np.sin(t.numpy()[:, None] * f), np.cos(t.numpy()[:, None] * f)], 1)
    np.testing.assert_allclose(time_mlp[0](t).numpy(), want, atol=1e-5)


# ---- the sampler
class StubEps(torch.nn.Module):
    def forward(self, x, t, s):  # any smooth function of (x, t, s), mirrored in numpy below
        return 0.5 * x + 0.05 * t.float().view(-1, 1) + 0.1 * s.sum(-1, keepdim=True)


def test_cosine_schedule_and_sampler_match_numpy_ddpm():
    np.testing.assert_allclose(qvpo.cosine_betas(20).numpy(), np_cosine_betas(20), atol=1e-9)
    assert qvpo.cosine_betas(20)[0].item() == pytest.approx(0.0079927, abs=1e-6)
    pol = qvpo.DiffusionPolicy(3, 2, hidden=8, T=6)
    pol.eps = StubEps()  # predicted x0 leaves [-1, 1] at large t: the x0 clamp matters
    g = torch.Generator().manual_seed(0)
    s, noise = torch.randn(4, 3, generator=g), torch.randn(pol.noise_shape(4, 5), generator=g)
    with torch.no_grad():
        got = pol.denoise(s, noise).numpy()
    S = s.double().numpy()[:, None]

    def eps_np(x, t, s):
        return 0.5 * x + 0.05 * t + 0.1 * s.sum(-1, keepdims=True)

    want = ref_denoise(eps_np, S, noise.double().numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert 0.05 < np.abs(want).mean() < 0.95  # neither all clamped nor trivial


class OracleEps(torch.nn.Module):
    """A denoiser that knows the answer a*(s): eps = (x_t - sqrt(abar_t) a*) / sqrt(1 - abar_t)."""

    def __init__(self, abar):
        super().__init__()
        self.abar = abar

    def forward(self, x, t, s):
        ab = self.abar[t].view(-1, 1)
        return (x - ab.sqrt() * torch.tanh(s[:, :2])) / (1 - ab).sqrt()


def test_epsilon_oracle_sampler_returns_the_known_action():
    pol = qvpo.DiffusionPolicy(3, 2, hidden=8, T=20)
    pol.eps = OracleEps(torch.cumprod(1 - torch.tensor(np_cosine_betas(20)), 0).float())
    s = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = pol.sample(s, 7, torch.Generator().manual_seed(2))  # (5, 7, 2)
    assert torch.allclose(a, torch.tanh(s[:, None, :2]).expand(5, 7, 2), atol=1e-4)


def test_batched_sampler_matches_per_state_loop():
    torch.manual_seed(0)
    actor = qvpo.DiffusionPolicy(obs_dim=5, act_dim=3, hidden=32, T=6)
    states, n = torch.randn(7, 5), 9
    batched = actor.sample(states, n, torch.Generator().manual_seed(123))  # (7, 9, 3)
    noise = torch.randn(actor.noise_shape(7, n), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        loop = torch.cat([actor.denoise(states[i:i + 1], noise[i:i + 1]) for i in range(7)])
    assert batched.shape == (7, n, 3) and torch.allclose(batched, loop, atol=1e-5)
    assert not torch.allclose(batched[:, 0], batched[:, 1])  # samples differ


# ---- the QVPO weights, schedules, targets
def test_qadv_golden():
    q = torch.tensor([[1.0, 2.0, 6.0, 3.0], [-1.0, -1.0, -1.0, -1.0], [0.0, -4.0, 2.0, 2.0]])
    want = np.array([[0, 0, 3, 0], [0, 0, 0, 0], [0, 0, 2, 2]], dtype=np.float32)
    np.testing.assert_allclose(qvpo.qadv(q).numpy(), want)


def test_entropy_alpha_official_schedule():
    def f(t):
        return qvpo.entropy_alpha(t, 1000, 0.02)

    assert [f(0), f(100), f(500), f(899)] == pytest.approx([0.02, 0.018, 0.01, 0.00202])
    assert [f(900), f(950), f(1000), f(5000)] == pytest.approx([0.002] * 4)
    assert qvpo.entropy_alpha(250, 1000, 0.1) == pytest.approx(0.075)


def test_truncation_bootstraps_termination_cuts():
    y = qvpo.td_target(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]),
                       torch.tensor([10.0, 10.0]), 0.99)
    assert y.tolist() == pytest.approx([10.9, 1.0])
    buf = qvpo.ReplayBuffer(3, 1, "cpu", capacity=4)
    buf.add(np.zeros(3), np.zeros(1), 1.0, np.ones(3), term=False, trunc=True)
    assert (buf.sample(5, torch.Generator().manual_seed(0))[-1] == 0).all()  # never truncation
    buf.add(np.zeros(3), np.zeros(1), 1.0, np.ones(3), term=True, trunc=False)
    assert buf.to_d4rl(np.ones(1), np.zeros(1))["terminals"].tolist() == [False, True]
    assert buf.episodes == 2


# ---- one update against an independent reference
def ref_sample(actor, s, n, gen):
    """Best-of-n sampling written from the formulas; the denoiser is a black box."""
    noise = torch.randn((len(s), n, actor.T, actor.act_dim), generator=gen)
    betas = torch.tensor(np_cosine_betas(actor.T))
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    B, N, A = len(s), n, actor.act_dim
    ss = s.repeat_interleave(N, 0)
    x = noise[:, :, 0].reshape(B * N, A)
    for k, t in enumerate(reversed(range(actor.T))):
        eps = actor.eps(x, torch.full((B * N,), t), ss).double()
        x0 = (x.double() / abar[t].sqrt() - (1 / abar[t] - 1).sqrt() * eps).clamp(-1, 1)
        x = (betas[t] * abar_prev[t].sqrt() * x0 + (1 - abar_prev[t]) * (1 - betas[t]).sqrt()
             * x.double()) / (1 - abar[t])
        if t > 0:
            var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
            x = x + var.sqrt() * noise[:, :, k + 1].reshape(B * N, A)
        x = x.float()
    return x.clamp(-1, 1).view(B, N, A)


def ref_qmin(critic, s, a):
    x = torch.cat([s, a], -1)
    return torch.min(critic.q1(x), critic.q2(x)).squeeze(-1)


def ref_update(nets, opts, data, alpha, gen, B=8, N=6):
    """QVPO update (official agent/qvpo.py train with --weighted --aug, truncation bootstrapping):
    critic on one batch, policy on a fresh batch, soft targets tau = 0.005."""
    actor, critic, actor_t, critic_t = nets
    obs, act, rew, nxt, term = data
    i = torch.randint(0, len(rew), (B,), generator=gen)
    with torch.no_grad():
        cand = ref_sample(actor_t, nxt[i], 4, gen)  # (B, 4, A) target-policy candidates
        qc = ref_qmin(critic_t, nxt[i].repeat_interleave(4, 0), cand.reshape(B * 4, -1))
        a2 = cand[torch.arange(B), qc.view(B, 4).argmax(1)]
        y = rew[i] + 0.99 * (1 - term[i]) * ref_qmin(critic_t, nxt[i], a2)
    x = torch.cat([obs[i], act[i]], -1)
    closs = sum(((q(x).squeeze(-1) - y) ** 2).mean() for q in (critic.q1, critic.q2))
    opts[1].zero_grad()
    closs.backward()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), 2.0)
    opts[1].step()
    s = obs[torch.randint(0, len(rew), (B,), generator=gen)]
    with torch.no_grad():
        cand = ref_sample(actor, s, N, gen)  # (B, N, A)
        q = ref_qmin(critic, s.repeat_interleave(N, 0), cand.reshape(B * N, -1)).view(B, N)
        best = q.argmax(1)
        w = (q.max(1).values - q.mean(1)).clamp(min=0)  # qadv of the kept sample
        E = 10 if alpha > 0 else 0  # official: no entropy rows when alpha is 0
        uni = torch.rand((E * B, cand.shape[-1]), generator=gen) * 2 - 1
        acts = torch.cat([cand[torch.arange(B), best], uni])
        states = torch.cat([s] + [s] * E)
        weights = torch.cat([w] + [alpha * w] * E)
    betas = torch.tensor(np_cosine_betas(actor.T)).float()
    abar = torch.cumprod(1 - betas, 0)
    t = torch.randint(0, actor.T, (len(acts),), generator=gen)
    eps = torch.randn(acts.shape, generator=gen)
    x_t = abar[t, None].sqrt() * acts + (1 - abar[t, None]).sqrt() * eps
    aloss = (weights[:, None] * (actor.eps(x_t, t, states) - eps) ** 2).mean()
    opts[0].zero_grad()
    aloss.backward()
    torch.nn.utils.clip_grad_norm_(actor.parameters(), 2.0)
    opts[0].step()
    with torch.no_grad():
        for net, tgt in ((critic, critic_t), (actor, actor_t)):
            for p, pt in zip(net.parameters(), tgt.parameters()):
                pt.copy_(0.995 * pt + 0.005 * p)
    return closs.item(), aloss.item()


@pytest.mark.parametrize("optimizer, alpha", [("sgd", 0.3), ("adam", 0.3), ("sgd", 0.0)])
def test_update_matches_independent_reference(optimizer, alpha):
    torch.manual_seed(0)
    args = common.parse_args(qvpo.Args, TINY)
    agent = qvpo.Agent(3, 2, args)
    other = qvpo.Agent(3, 2, args)  # targets differ from the online nets, as after training
    agent.actor_target.load_state_dict(other.actor.state_dict())
    agent.critic_target.load_state_dict(other.critic.state_dict())
    g = torch.Generator().manual_seed(1)
    n = 24
    data = [torch.randn(n, 3, generator=g), torch.rand(n, 2, generator=g) * 2 - 1,
            torch.randn(n, generator=g), torch.randn(n, 3, generator=g)]
    term, trunc = torch.zeros(n), torch.zeros(n)
    term[::3], trunc[1::3] = 1.0, 1.0  # terminations and (distinct) truncations
    buf = qvpo.ReplayBuffer(3, 2, "cpu", capacity=32)
    for row in zip(*data, term, trunc):
        buf.add(*row)
    if optimizer == "sgd":  # gradients show through SGD in full (Adam's first step ~ lr sign(g))
        with torch.no_grad():  # a wide Q spread: large advantages, both clips (norm 2) active
            for q in (agent.critic.q1, agent.critic.q2):
                q[-1].weight *= 10_000
        agent.actor_opt = torch.optim.SGD(agent.actor.parameters(), lr=0.1)
        agent.critic_opt = torch.optim.SGD(agent.critic.parameters(), lr=0.1)
    nets = copy.deepcopy([agent.actor, agent.critic, agent.actor_target, agent.critic_target])
    opts = [torch.optim.SGD(nets[k].parameters(), lr=0.1) for k in (0, 1)]
    if optimizer == "adam":  # the official settings, written here as literals
        opts = [torch.optim.Adam(nets[k].parameters(), lr=lr, eps=1e-5)
                for k, lr in ((0, 1e-4), (1, 3e-4))]
    ga, gr = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):
        out = agent.update(buf, alpha, ga)
        closs, aloss = ref_update(nets, opts, data + [term], alpha, gr)
        assert out["losses/critic_loss"].item() == pytest.approx(closs, rel=1e-4)
        assert out["losses/actor_loss"].item() == pytest.approx(aloss, rel=1e-4)
    for name, mine, ref in zip(("actor", "critic", "actor_target", "critic_target"),
                               (agent.actor, agent.critic, agent.actor_target,
                                agent.critic_target), nets):
        for (k, p), q in zip(mine.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), (name, k)
    assert torch.equal(ga.get_state(), gr.get_state())  # the same random draws, no more


def test_behavior_policy_is_argmax_q_of_four_samples():
    torch.manual_seed(0)
    agent = qvpo.Agent(3, 2, common.parse_args(qvpo.Args, TINY))
    obs = np.array([0.3, -0.2, 0.5], dtype=np.float32)
    got = [agent.act(obs, torch.Generator().manual_seed(i)) for i in range(6)]
    for i, a in enumerate(got):
        with torch.no_grad():
            cand = ref_sample(agent.actor, torch.tensor(obs)[None], 4,
                              torch.Generator().manual_seed(i))[0]  # (4, A)
            q = ref_qmin(agent.critic, torch.tensor(obs)[None].expand(4, 3), cand)
        assert torch.allclose(a, cand[q.argmax()], atol=1e-5)


# ---- runs: the loop, save-replay, eval-only, load_policy, resume
@pytest.fixture(scope="module")
def pendulum_runs(tmp_path_factory):
    """Pendulum-v1 (200-step episodes, never terminates), 400 steps: straight (with spies on
    acting, updating and evaluating), and Ctrl-C at step 200 then --resume. One thread: the
    straight and the resumed run are compared bit for bit."""
    d = tmp_path_factory.mktemp("qvpo_pendulum")
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(d)
    torch.set_num_threads(1)
    calls, interrupt = [], {"at": None}
    best_of, update = qvpo.best_of, qvpo.Agent.update

    def spy_best_of(actor, critic, s, n, gen):
        calls.append(("best_of", len(s), n, int(actor.eps.net[0].weight.requires_grad)))
        return best_of(actor, critic, s, n, gen)

    def spy_update(self, buffer, alpha, gen):
        calls.append(("update", buffer.size, alpha))
        if buffer.size == interrupt["at"]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the update of step 200
        return update(self, buffer, alpha, gen)

    try:
        base = ["--env", "Pendulum-v1", "--learning-starts", "150", "--eval-every", "200",
                "--seed", "3", "--total-steps", "400"] + TINY
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qvpo, "best_of", spy_best_of)
            mp.setattr(qvpo.Agent, "update", spy_update)
            straight = d / qvpo.main(base + ["--save-replay", "replay.npz"])
            n_calls = len(calls)
            interrupt["at"] = 200
            with pytest.raises(SystemExit) as stop:
                qvpo.main(base)
        assert stop.value.code == 130
        half = next(p for p in (d / "runs").iterdir() if p != straight)
        half_ckpt = common.load_checkpoint(half / "checkpoint.pt")
        resumed = qvpo.main(["--resume", str(half / "checkpoint.pt")])  # only the path
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return dict(dir=d, straight=straight, half_ckpt=half_ckpt, resumed=resumed,
                calls=calls[:n_calls])


def test_loop_acts_updates_and_evaluates_as_algorithm_1(pendulum_runs):
    calls = pendulum_runs["calls"]
    updates = [c for c in calls if c[0] == "update"]
    # learning_starts 150: steps 1..150 uniform random, updates at steps 150..400, one per step
    assert [u[1] for u in updates] == list(range(150, 401))
    want = [min(0.02, max(0.002, 0.02 - 0.02 * t / 400)) for t in range(150, 401)]
    assert [u[2] for u in updates] == pytest.approx(want)
    acting = [c for c in calls if c[0] == "best_of" and c[1] == 1]
    assert len(acting) == 250 and {c[2:] for c in acting} == {(4, 1)}  # online actor, 4 samples
    target = [c for c in calls if c[0] == "best_of" and c[1] == 8]
    assert len(target) == 251 and {c[2:] for c in target} == {(4, 0)}  # the target actor
    evals = {c[2:] for c in calls if c[0] == "best_of" and c[1] == 2}
    assert evals == {(32, 1)}
    metrics = [json.loads(x) for x in (pendulum_runs["straight"] / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics if "eval/return_mean" in m] == [200, 400]
    assert [m["step"] for m in metrics if "charts/episodic_return" in m] == [200, 400]
    assert any("losses/actor_loss" in m for m in metrics)


def test_save_replay_is_a_d4rl_dataset_with_timeouts(pendulum_runs):
    path = pendulum_runs["dir"] / "replay.npz"
    data = common.load_dataset("Pendulum-v1", path=path, verbose=False)  # what dt.py loads
    make_datasets.validate_dataset(dict(data), "Pendulum-v1", str(path))
    assert len(data["rewards"]) == 400 and data["actions"].shape == (400, 1)
    assert not data["terminals"].any()  # time limits are timeouts, never terminals
    assert np.flatnonzero(data["timeouts"]).tolist() == [199, 399]
    assert np.abs(data["actions"]).max() <= 2.0 and np.abs(data["actions"]).max() > 1.0  # env units
    np.testing.assert_allclose(data["observations"][1:200], data["next_observations"][:199])
    first, _ = gym.make("Pendulum-v1").reset(seed=3)  # episode k is reset with seed + k
    second, _ = gym.make("Pendulum-v1").reset(seed=4)
    np.testing.assert_allclose(data["observations"][[0, 200]], [first, second], atol=1e-6)


def assert_same(x, y, where=""):
    if isinstance(x, dict):
        assert sorted(x, key=str) == sorted(y, key=str), where
        for k in x:
            assert_same(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y)):
            assert_same(a, b, f"{where}/{i}")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


def test_ctrl_c_then_resume_at_an_episode_end_is_exact(pendulum_runs):
    a = common.load_checkpoint(pendulum_runs["straight"] / "checkpoint.pt")
    b = common.load_checkpoint(pendulum_runs["resumed"] / "checkpoint.pt")
    assert pendulum_runs["half_ckpt"]["step"] == 200  # Ctrl-C: the step finished, then saved
    assert a["step"] == b["step"] == 400
    for k in ("agent", "buffer", "actor_opt", "critic_opt", "sampler", "rng"):
        assert_same(a[k], b[k], k)
    assert b["actor_opt"]["state"][0]["step"].item() == 251  # the optimizer continued


def test_resume_mid_episode_cuts_it_and_starts_the_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--env", "Pendulum-v1", "--learning-starts", "10", "--eval-every", "1000"] + TINY
    half = qvpo.main(base + ["--total-steps", "20"])
    before = common.load_checkpoint(half / "checkpoint.pt")["buffer"]
    qvpo.main(["--resume", str(tmp_path / half / "checkpoint.pt"), "--total-steps", "30"])
    after = common.load_checkpoint(half / "checkpoint.pt")
    buf = after["buffer"]
    assert after["step"] == 30 and buf["size"] == 30 and buf["episodes"] == 1
    for k in ("obs", "act", "rew", "next_obs", "term"):
        assert torch.equal(buf[k][:20], before[k]), k
    assert buf["trunc"][:20].tolist() == [0.0] * 19 + [1.0]  # the cut episode ends as a timeout
    first, _ = gym.make("Pendulum-v1").reset(seed=1)  # the next episode, seed + 1
    np.testing.assert_allclose(buf["obs"][20].numpy(), first, atol=1e-6)
    assert after["actor_opt"]["state"][0]["step"].item() == 21  # steps 10..30


@pytest.fixture(scope="module")
def pendulum_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qvpo_ip")
    old = os.getcwd()
    os.chdir(d)
    try:
        run = d / qvpo.main(["--env", "InvertedPendulum-v5", "--total-steps", "30",
                         "--learning-starts", "10", "--eval-every", "15", "--save-replay",
                         "replay.npz"] + TINY)
    finally:
        os.chdir(old)
    return run / "checkpoint.pt"


def test_inverted_pendulum_replay_has_terminals(pendulum_ckpt):
    data = common.load_dataset("InvertedPendulum-v5", path=pendulum_ckpt.parents[2] / "replay.npz",
                               verbose=False)
    assert len(data["rewards"]) == 30 and data["terminals"].any()  # the pole falls
    assert data["terminals"][-1] or data["timeouts"][-1]
    assert np.abs(data["actions"]).max() <= 3.0  # InvertedPendulum bounds are +-3


def test_checkpoint_is_portable_and_eval_only_takes_its_architecture(pendulum_ckpt, capsys):
    ckpt = torch.load(pendulum_ckpt, weights_only=True)  # plain tensors and Python values
    assert ckpt["algo"] == "qvpo" and ckpt["args"]["hidden"] == 16 and ckpt["step"] == 30
    res = qvpo.main(["--eval-only", "--checkpoint", str(pendulum_ckpt), "--eval-episodes", "2",
                     "--eval-max-steps", "5", "--no-cuda"])  # no --env, no size flags
    assert np.isfinite(res["eval/return_mean"]) and "return" in capsys.readouterr().out


SCRIPT = """
import gymnasium, json, sys
from qvpo import load_policy
policy = load_policy(sys.argv[1])
env = gymnasium.make("InvertedPendulum-v5")
obs, _ = env.reset(seed=0)
acts = []
for _ in range(5):
    act = policy(obs[None].astype("float32"))[0]
    acts.append(act.tolist())
    obs, r, term, trunc, _ = env.step(act)
print(json.dumps(acts))
"""


def test_load_policy_from_two_copied_files(pendulum_ckpt, tmp_path):
    for f in ("qvpo.py", "common.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "act.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    out = subprocess.run([sys.executable, "act.py", str(pendulum_ckpt)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    acts = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    assert acts.shape == (5, 1) and np.isfinite(acts).all() and np.abs(acts).max() <= 3.0
    policy = qvpo.load_policy(pendulum_ckpt)
    env = gym.make("InvertedPendulum-v5")
    obs, _ = env.reset(seed=0)
    for want in acts:
        act = policy(obs[None].astype(np.float32))[0]
        np.testing.assert_allclose(act, want, atol=1e-5)
        obs, *_ = env.step(act)


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--checkpoint"):
        qvpo.main(["--eval-only"] + TINY)
    with pytest.raises(ValueError, match="continuous"):
        qvpo.main(["--env", "CartPole-v1", "--total-steps", "5"] + TINY)
    with pytest.raises(ValueError, match="--n-train-samples"):
        qvpo.main(TINY + ["--n-train-samples", "0"])
    torch.save(dict(algo="dt", args={}), tmp_path / "dt.pt")
    with pytest.raises(common.CheckpointError, match="dt"):
        qvpo.main(["--eval-only", "--checkpoint", str(tmp_path / "dt.pt")])
