"""qvpo.py: Q-weighted Variational Policy Optimization, online RL with a diffusion policy.

Paper: S. Ding, K. Hu, Z. Zhang, K. Ren, W. Zhang, J. Yu, J. Wang, Y. Shi, "Diffusion-based
Reinforcement Learning via Q-weighted Variational Policy Optimization", NeurIPS 2024,
arXiv 2405.16173.

What this file reproduces (online, no dataset; Gymnasium MuJoCo and any continuous-action
Gymnasium id such as InvertedPendulum-v5 or Pendulum-v1):
  * a DDPM policy pi(a|s) (Sec. 3 / 4): an MLP (3 x 256, Mish) over [a_t, time embedding, s]
    predicts the noise; T = 20 steps, cosine schedule; x0 and the action clamped to [-1, 1]
    and scaled to the env's action bounds;
  * the Q-weighted variational loss (Sec. 4.1-4.2, Q-weighted VLO) with the "qadv" weight (Sec.
    4.2): per state, 64 policy samples; the best by Q is kept and its diffusion loss weighted
    by A = Q(s, a_best) - mean_j Q(s, a_j), clipped at 0 (V(s) estimated by the sample mean);
  * the diffusion entropy regularization (Sec. 4.3): 10 uniform actions per state in the
    same loss with weight alpha * A, alpha decaying linearly 0.02 -> 0.002;
  * the efficient behavior policy (Sec. 4.4): draw 4 actions, execute the argmax of Q;
    evaluation draws 32 and takes the argmax;
  * a twin-Q critic (3 x 256, Mish), clipped double-Q target whose next action is the
    argmax-Q (target critic) of 4 target-policy samples; soft target updates (tau 0.005);
  * hyperparameters of the paper (appendix table): batch 256, gamma 0.99, actor lr 1e-4, critic lr
    3e-4, Adam eps 1e-5, grad-norm clip 2.0, 10k uniform-random start steps, one update per
    env step, 1M env steps.

Pitfalls of the official code that this file avoids (../shared/PAPERS.md):
  * the official script runs the QVPO loss only when two extra flags are set (otherwise it
    trains a different method); here the QVPO loss is the only loss;
  * the official script treats time-limit truncation as termination; here only a true
    termination cuts the bootstrap (`critic_target`), truncation bootstraps.

Engineering (not in the paper, no effect on the algorithm):
  * all candidate samples of a batch are denoised together: one batched network pass per
    diffusion step over (B * N) rows; the noise of a sampler call is one tensor indexed
    [state, sample, step], so a batched call equals a per-state loop over the same noise;
  * the replay buffer and every random draw of an update live on the device (a
    torch.Generator); nothing is copied to the host inside an update;
  * exact resume: the checkpoint holds the networks, optimizers, buffer, generator and RNG
    states; the environment's mid-episode state is rebuilt by re-seeding the episode and
    replaying its actions (MuJoCo and classic-control dynamics are deterministic);
  * `--save-replay PATH` writes the buffer as a D4RL-style .npz (common.load_dataset(path=)).

"Sec. 4.x" follows the order of the paper's method section (4.1 Q-weighted objective, 4.2 Q-weight
transformations, 4.3 diffusion entropy regularization, 4.4 action selection); equations are
named, not numbered, since numbering differs between the arXiv versions.

Named deviations: none in the algorithm. Every training episode is reset with seed
`seed + episode index` (needed for the exact resume above).

Quick runs (CPU, one core; measured curves in README):
    python qvpo.py --env InvertedPendulum-v5 --total-steps 20000 --learning-starts 1000 --hidden 64 \
        --critic-hidden 256 --n-timesteps 5 --n-train-samples 16 --batch-size 64 --eval-every 1000 \
        --eval-episodes 5 --stop-return 950          # eval return 1000 at step 12000, 7 min
    (the same with --env Pendulum-v1 and no --stop-return: eval return -185 at step 4000, -98 at 8000)
Paper setting: python qvpo.py --env hopper      (1M steps; ~2.4 s per update on one CPU core: use a GPU)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import tqdm


@dataclass
class Args:
    exp_name: str = "qvpo"
    """name of the experiment (part of the run folder name)"""
    seed: int = 0
    """seed of every random generator, the environment included"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "hopper"
    """hopper, halfcheetah, walker2d, or any Gymnasium id with a continuous action space"""
    total_steps: int = 1_000_000
    """environment steps (paper: 1M)"""
    learning_starts: int = 10_000
    """uniform-random steps before the first update (paper: 10k)"""
    buffer_size: Optional[int] = None
    """replay capacity (default: total_steps, i.e. never overwrite)"""
    batch_size: int = 256
    """states per update (paper: 256)"""
    updates_per_step: int = 1
    """gradient updates per environment step (paper: 1)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """soft target update rate (critic and policy targets)"""
    actor_lr: float = 1e-4
    """diffusion policy learning rate"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    adam_eps: float = 1e-5
    """Adam epsilon (both optimizers)"""
    grad_clip: float = 2.0
    """gradient-norm clip of actor and critic (0 = off)"""
    hidden: int = 256
    """width of the 3 hidden layers of the denoiser (and of the Q networks unless --critic-hidden)"""
    critic_hidden: Optional[int] = None
    """width of the 3 hidden layers of each Q network (default: --hidden)"""
    n_timesteps: int = 20
    """diffusion steps T"""
    n_train_samples: int = 64
    """policy samples per state in the Q-weighted loss; the best by Q is trained on"""
    n_entropy_samples: int = 10
    """uniform actions per state in the diffusion entropy term"""
    alpha_start: float = 0.02
    """entropy weight alpha at step 0"""
    alpha_end: float = 0.002
    """entropy weight alpha at alpha_decay_steps (linear decay)"""
    alpha_decay_steps: Optional[int] = None
    """steps over which alpha decays (default: total_steps)"""
    n_behavior_samples: int = 4
    """candidate actions of the behavior policy (argmax Q is executed)"""
    n_target_samples: int = 4
    """target-policy candidates for the critic target (argmax target Q)"""
    n_eval_samples: int = 32
    """candidate actions at evaluation (argmax Q)"""
    eval_every: int = 10_000
    """evaluate (and checkpoint) every this many environment steps"""
    eval_episodes: int = 10
    """episodes per evaluation (run at once in a vector env)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's time limit)"""
    stop_return: Optional[float] = None
    """stop early once an evaluation's mean return reaches this value (CPU quick runs)"""
    log_every: int = 1000
    """log losses every this many steps (the only host copies of training values)"""
    save_replay: Optional[str] = None
    """at the end, write the replay buffer to this D4RL-style .npz"""
    resume: Optional[str] = None
    """checkpoint to continue from (networks, optimizers, buffer, RNG, env episode)"""
    eval_only: bool = False
    """only evaluate --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""
    bf16: bool = False
    """bfloat16 autocast for network passes (fp32 is the paper setting)"""
    run_dir: Optional[str] = None
    """run folder (default runs/{env}__{exp_name}__{seed}__{time})"""
    progress: bool = True
    """show the tqdm progress bar"""


# --------------------------------------------------------------------------------------
# Data: a replay buffer that lives on the device
# --------------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions (s, a, r, s', terminated, truncated); actions normalized to [-1, 1].
    `terminated` cuts the bootstrap; `truncated` (time limit) is only kept for export."""
    FIELDS = ("obs", "act", "rew", "next_obs", "term", "trunc")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.device, self.ptr, self.size = capacity, device, 0, 0
        z = lambda *shape: torch.zeros((capacity,) + shape, dtype=torch.float32, device=device)
        self.obs, self.act, self.next_obs = z(obs_dim), z(act_dim), z(obs_dim)
        self.rew, self.term, self.trunc = z(), z(), z()

    def add(self, obs, act, rew, next_obs, term, trunc):
        i = self.ptr
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.act[i] = torch.as_tensor(act, dtype=torch.float32)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.rew[i], self.term[i], self.trunc[i] = float(rew), float(term), float(trunc)
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, gen: torch.Generator):
        idx = torch.randint(0, self.size, (batch_size,), generator=gen, device=self.device)
        return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.term[idx]

    def _ordered(self, name):  # oldest first
        x = getattr(self, name)[: self.size]
        return torch.roll(x, -self.ptr, 0) if self.size == self.capacity else x

    def state_dict(self) -> dict:
        return dict(ptr=self.ptr, size=self.size, capacity=self.capacity,
                    **{k: getattr(self, k)[: self.size].cpu() for k in self.FIELDS})

    def load_state_dict(self, d: dict):
        """Same capacity: the exact layout. Other capacity (e.g. a resumed run with a larger
        --total-steps): the newest min(size, capacity) rows, oldest first."""
        if d["capacity"] == self.capacity:
            self.ptr, self.size, rows = d["ptr"], d["size"], {k: d[k] for k in self.FIELDS}
        else:
            wrapped = d["size"] == d["capacity"]
            rows = {k: torch.roll(d[k], -d["ptr"], 0) if wrapped else d[k] for k in self.FIELDS}
            rows = {k: v[-self.capacity:] for k, v in rows.items()}
            self.size = len(rows["rew"])
            self.ptr = self.size % self.capacity
        for k in self.FIELDS:
            getattr(self, k)[: self.size] = rows[k].to(self.device)

    def to_d4rl(self, scale: np.ndarray, bias: np.ndarray) -> dict:
        """D4RL keys, actions in env units; the last row ends an episode (timeout) if open."""
        g = lambda k: self._ordered(k).cpu().numpy()
        data = dict(observations=g("obs"), actions=(g("act") * scale + bias).astype(np.float32),
                    rewards=g("rew"), terminals=g("term") > 0.5, timeouts=g("trunc") > 0.5,
                    next_observations=g("next_obs"))
        if len(data["rewards"]):
            data["timeouts"][-1] |= ~data["terminals"][-1]
        return data


# --------------------------------------------------------------------------------------
# Model: DDPM policy (epsilon prediction, cosine schedule) and twin-Q critic
# --------------------------------------------------------------------------------------
def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    abar = torch.cos(((x / T) + s) / (1 + s) * math.pi / 2) ** 2
    abar = abar / abar[0]
    return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)


class SinusoidalEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2 - 1)))

    def forward(self, t):  # (M,) -> (M, dim)
        x = t.float()[:, None] * self.freqs[None]
        return torch.cat([x.sin(), x.cos()], -1)


def mlp(inp: int, hidden: int, out: int, layers: int = 3) -> nn.Sequential:
    mods, d = [], inp
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.Mish()]
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, out))


class Denoiser(nn.Module):
    """eps_theta(a_t, t, s): MLP (3 x hidden, Mish) over [a_t, time embedding, s]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, t_dim: int = 16):
        super().__init__()
        self.time = nn.Sequential(SinusoidalEmb(t_dim), nn.Linear(t_dim, 2 * t_dim), nn.Mish(),
                                  nn.Linear(2 * t_dim, t_dim))
        self.net = mlp(act_dim + t_dim + obs_dim, hidden, act_dim)

    def forward(self, x, t, s):  # x (M, A), t (M,) or (1,), s (M, S) -> (M, A)
        emb = self.time(t).expand(x.shape[0], -1)  # (M, t_dim); one embedding when t is shared
        return self.net(torch.cat([x, emb, s], -1))


class DiffusionPolicy(nn.Module):
    """DDPM over actions in [-1, 1] (Ho et al. 2020), conditioned on the state."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, T: int = 20):
        super().__init__()
        self.act_dim, self.T = act_dim, T
        self.eps = Denoiser(obs_dim, act_dim, hidden)
        betas = cosine_betas(T)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)  # q(a_{t-1} | a_t, a_0) variance
        buf = dict(sqrt_abar=abar.sqrt(), sqrt_1m_abar=(1 - abar).sqrt(),
                   sqrt_recip_abar=(1 / abar).sqrt(), sqrt_recipm1_abar=(1 / abar - 1).sqrt(),
                   post_c0=betas * abar_prev.sqrt() / (1 - abar),
                   post_ct=(1 - abar_prev) * alphas.sqrt() / (1 - abar),
                   post_std=(0.5 * post_var.clamp(min=1e-20).log()).exp())
        for k, v in buf.items():
            self.register_buffer(k, v.float())

    def noise_shape(self, n_states: int, n: int) -> tuple:
        """All randomness of one sampler call: [state, sample, step, action];
        step 0 is a_T, step k >= 1 the noise added at the k-th reverse step."""
        return (n_states, n, self.T, self.act_dim)

    def denoise(self, states, noise):
        """Reverse process for every (state, sample) at once: one batched net pass per step.
        states (B, S), noise (B, N, T, A) -> actions (B, N, A) in [-1, 1]."""
        B, N = noise.shape[:2]
        s = states[:, None].expand(B, N, states.shape[-1]).reshape(B * N, -1)  # (B*N, S)
        x = noise[:, :, 0].reshape(B * N, self.act_dim)  # a_T ~ N(0, I), (B*N, A)
        for k, t in enumerate(range(self.T - 1, -1, -1)):
            tt = torch.full((1,), t, device=x.device, dtype=torch.long)
            eps = self.eps(x, tt, s)
            x0 = (self.sqrt_recip_abar[t] * x - self.sqrt_recipm1_abar[t] * eps).clamp(-1, 1)  # clamp x0
            x = self.post_c0[t] * x0 + self.post_ct[t] * x  # posterior mean
            if t > 0:
                x = x + self.post_std[t] * noise[:, :, k + 1].reshape(B * N, self.act_dim)
        return x.clamp(-1, 1).view(B, N, self.act_dim)  # (B, N, A)

    def sample(self, states, n: int, gen: torch.Generator):
        noise = torch.randn(self.noise_shape(states.shape[0], n), generator=gen, device=states.device)
        return self.denoise(states, noise)

    def loss(self, actions, states, weights, gen: torch.Generator):
        """Q-weighted denoising loss (Sec. 4.1-4.2): mean_i w_i ||eps - eps_theta(sqrt(abar_t) a_i +
        sqrt(1-abar_t) eps, t, s_i)||^2, t uniform in {0..T-1}. actions (M, A), weights (M,)."""
        M = actions.shape[0]
        t = torch.randint(0, self.T, (M,), generator=gen, device=actions.device)
        eps = torch.randn(actions.shape, generator=gen, device=actions.device)
        x_t = self.sqrt_abar[t, None] * actions + self.sqrt_1m_abar[t, None] * eps
        per_row = (self.eps(x_t, t, states).float() - eps).pow(2).mean(-1)  # (M,)
        return (weights * per_row).mean()


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, hidden, 1)
        self.q2 = mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, s, a):  # (M, S), (M, A) -> (M,), (M,)
        x = torch.cat([s, a], -1)
        return self.q1(x).squeeze(-1).float(), self.q2(x).squeeze(-1).float()

    def q_min(self, s, a):
        return torch.min(*self(s, a))


# --------------------------------------------------------------------------------------
# Policy: action selection by Q (Sec. 4.4) and the QVPO weights (Sec. 4.2-4.3)
# --------------------------------------------------------------------------------------
def q_of_samples(critic: TwinQ, states, actions):
    """min(Q1, Q2) of N candidates per state: states (B, S), actions (B, N, A) -> (B, N)."""
    B, N, A = actions.shape
    s = states[:, None].expand(B, N, states.shape[-1]).reshape(B * N, -1)  # (B*N, S)
    return critic.q_min(s, actions.reshape(B * N, A)).view(B, N)


def select_best(actions, q):
    """argmax-Q candidate per state: actions (B, N, A), q (B, N) -> (B, A)."""
    return actions[torch.arange(actions.shape[0], device=actions.device), q.argmax(1)]


def best_of(actor: DiffusionPolicy, critic: TwinQ, states, n: int, gen):
    """Sample n actions per state, return the argmax of Q (behavior / target / eval policy)."""
    acts = actor.sample(states, n, gen)  # (B, n, A)
    return select_best(acts, q_of_samples(critic, states, acts))


def advantage_weights(q):
    """qadv transform (Sec. 4.2): w(s, a_j) = max(Q(s, a_j) - V(s), 0) with V(s) the mean Q of
    the N samples of that state. q (B, N) -> (B, N), >= 0, zero for below-mean samples."""
    return (q - q.mean(1, keepdim=True)).clamp(min=0)


def entropy_alpha(step: int, args: Args) -> float:
    """Entropy weight alpha (Sec. 4.3): linear from alpha_start to alpha_end, then constant."""
    horizon = args.alpha_decay_steps or args.total_steps
    frac = min(max(step / max(horizon, 1), 0.0), 1.0)
    return args.alpha_start + frac * (args.alpha_end - args.alpha_start)


def critic_target(reward, terminated, q_next, gamma: float):
    """y = r + gamma (1 - terminated) Q'(s', a'). Truncation (time limit) is not termination:
    a truncated transition still bootstraps (the official code cuts it, a bug)."""
    return reward + gamma * (1.0 - terminated) * q_next


# --------------------------------------------------------------------------------------
# Training: one QVPO update (Algorithm 1)
# --------------------------------------------------------------------------------------
class Agent:
    def __init__(self, obs_dim: int, act_dim: int, args: Args, device):
        self.args, self.device = args, device
        self.actor = DiffusionPolicy(obs_dim, act_dim, args.hidden, args.n_timesteps).to(device)
        self.critic = TwinQ(obs_dim, act_dim, args.critic_hidden or args.hidden).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, eps=args.adam_eps)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, eps=args.adam_eps)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).state_dict() for k in
                ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt")}

    def load_state_dict(self, d: dict):
        for k, v in d.items():
            getattr(self, k).load_state_dict(v)

    def update(self, batch, alpha: float, gen: torch.Generator) -> dict:
        """One critic + one policy step. Returns device tensors (no host synchronisation)."""
        a = self.args
        s, act, r, s2, term = batch  # (B, S), (B, A), (B,), (B, S), (B,)
        with self.autocast():
            # Critic (clipped double Q); next action = argmax target-Q of 4 target-policy samples
            with torch.no_grad():
                a2 = best_of(self.actor_target, self.critic_target, s2, a.n_target_samples, gen)
                y = critic_target(r, term, self.critic_target.q_min(s2, a2), a.gamma)
            q1, q2 = self.critic(s, act)
            critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        if a.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.critic.parameters(), a.grad_clip)
        self.critic_opt.step()

        with self.autocast():
            with torch.no_grad():
                # Q-weighted variational loss (Sec. 4.2): best of N samples, weight = qadv advantage
                acts = self.actor.sample(s, a.n_train_samples, gen)  # (B, N, A)
                q = q_of_samples(self.critic, s, acts)  # (B, N)
                adv = advantage_weights(q).max(1).values  # weight of the argmax sample, (B,)
                best = select_best(acts, q)  # (B, A)
                # Diffusion entropy regularization (Sec. 4.3): uniform actions, weight alpha * A
                B, E = s.shape[0], a.n_entropy_samples
                uni = torch.rand((B, E, best.shape[-1]), generator=gen, device=s.device) * 2 - 1  # (B, E, A)
                states = torch.cat([s, s[:, None].expand(B, E, s.shape[-1]).reshape(B * E, -1)])  # (B + B*E, S)
                actions = torch.cat([best, uni.reshape(B * E, -1)])  # (B + B*E, A)
                weights = torch.cat([adv, (alpha * adv)[:, None].expand(B, E).reshape(B * E)])  # (B + B*E,)
            actor_loss = self.actor.loss(actions, states, weights, gen)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        if a.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.actor.parameters(), a.grad_clip)
        self.actor_opt.step()

        with torch.no_grad():  # soft target updates: target <- target + tau (online - target)
            for net, tgt in ((self.critic, self.critic_target), (self.actor, self.actor_target)):
                torch._foreach_lerp_(list(tgt.parameters()), list(net.parameters()), a.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/q_mean": q.mean(), "losses/advantage_mean": adv.mean()}


class QPolicy:
    """Batched policy for common.evaluate: argmax-Q of n diffusion samples, env units."""

    def __init__(self, agent: Agent, n: int, seed: int, scale, bias):
        self.agent, self.n = agent, n
        self.gen = torch.Generator(agent.device).manual_seed(seed)
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=agent.device)
        self.bias = torch.as_tensor(bias, dtype=torch.float32, device=agent.device)

    @torch.no_grad()
    def __call__(self, obs):
        s = torch.as_tensor(obs, dtype=torch.float32, device=self.agent.device)
        with self.agent.autocast():
            a = best_of(self.agent.actor, self.agent.critic, s, self.n, self.gen)
        return a.float() * self.scale + self.bias


def run_eval(agent: Agent, args: Args, scale, bias, step: int) -> dict:
    pol = QPolicy(agent, args.n_eval_samples, args.seed + 7919 * (step + 1), scale, bias)
    res = common.evaluate(pol, args.env, n_episodes=args.eval_episodes, seed=args.seed + 10_000,
                          max_steps=args.eval_max_steps)
    return {"eval/return_mean": float(res["returns"].mean()), "eval/return_std": float(res["returns"].std()),
            "eval/normalized_score": float(np.mean(res["normalized"]))}


def env_spec(env_name: str):
    e = common.make_env(env_name)
    space = e.action_space
    e.close()
    if not hasattr(space, "low") or space.dtype.kind != "f":
        raise ValueError(f"{env_name}: QVPO needs a continuous (Box) action space, got {space}")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError(f"{env_name}: the action space must be bounded, got {space}")
    return (high - low) / 2, (high + low) / 2  # action = a_norm * scale + bias


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def check_args(args: Args):
    for name in ("total_steps", "batch_size", "n_timesteps", "n_train_samples", "n_behavior_samples",
                 "n_target_samples", "n_eval_samples", "eval_every", "eval_episodes", "hidden", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt of a qvpo run)")
    if args.learning_starts < 1:
        raise ValueError("--learning-starts must be >= 1 (the buffer must hold a transition before an update)")


def check_checkpoint(ckpt: dict, args: Args, obs_dim: int, act_dim: int, path):
    if ckpt.get("algo") != "qvpo":
        raise common.CheckpointError(f"{path} is not a qvpo checkpoint (algo={ckpt.get('algo')!r})")
    if common.env_id(ckpt["args"]["env"]) != common.env_id(args.env) or ckpt["dims"] != [obs_dim, act_dim]:
        raise common.CheckpointError(f"{path} was trained on {ckpt['args']['env']} (obs/act dims {ckpt['dims']}), "
                                     f"not on {args.env} ({[obs_dim, act_dim]}); pass --env {ckpt['args']['env']}")
    for k in ("hidden", "critic_hidden", "n_timesteps"):
        if ckpt["args"].get(k) != getattr(args, k):
            raise common.CheckpointError(f"{path} has --{k.replace('_', '-')} {ckpt['args'][k]}, "
                                         f"this run {getattr(args, k)}; pass the checkpoint's value")


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    check_args(args)
    device = common.get_device(args.cuda)
    common.set_seed(args.seed)
    env_name = args.env
    obs_dim, act_dim = common.env_dims(env_name)
    scale, bias = env_spec(env_name)
    if args.eval_only:
        ckpt = common.load_checkpoint(args.checkpoint, map_location=device, required=("agent", "args", "dims"))
        for k in ("hidden", "critic_hidden", "n_timesteps"):  # the architecture comes from the checkpoint
            setattr(args, k, ckpt["args"].get(k))
        check_checkpoint(ckpt, args, obs_dim, act_dim, args.checkpoint)
        agent = Agent(obs_dim, act_dim, args, device)
        agent.load_state_dict(ckpt["agent"])
        res = run_eval(agent, args, scale, bias, ckpt["step"])
        print(f"[qvpo] {args.checkpoint} (step {ckpt['step']}): return {res['eval/return_mean']:.1f} "
              f"+- {res['eval/return_std']:.1f}")
        return {"step": ckpt["step"], **res}

    agent = Agent(obs_dim, act_dim, args, device)
    buffer = ReplayBuffer(args.buffer_size or args.total_steps, obs_dim, act_dim, device)
    gen = torch.Generator(device).manual_seed(args.seed)  # every draw of acting and updating
    env = common.make_env(env_name)
    step, episode, ep_actions, ep_return, history = 0, 0, [], 0.0, []
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, map_location=device,
                                      required=("agent", "buffer", "step", "rng", "gen", "episode"))
        check_checkpoint(ckpt, args, obs_dim, act_dim, args.resume)
        agent.load_state_dict(ckpt["agent"])
        buffer.load_state_dict(ckpt["buffer"])
        common.set_rng_state(ckpt["rng"])
        gen.set_state(ckpt["gen"].to(gen.get_state().device))
        step, history = ckpt["step"], ckpt.get("history", [])
        episode, ep_actions, ep_return = ckpt["episode"]["index"], ckpt["episode"]["actions"], ckpt["episode"]["ret"]
    # (Re)build the current episode: reset with its seed, replay its actions (deterministic envs)
    obs, _ = env.reset(seed=args.seed + episode)
    for a_norm in ep_actions:
        obs = env.step(a_norm.astype(np.float64) * scale + bias)[0]
    if ep_actions and not np.allclose(obs, buffer.next_obs[(buffer.ptr - 1) % buffer.capacity].cpu().numpy(), atol=1e-4):
        print("[qvpo] warning: the replayed episode does not reach the saved state (non-deterministic env?); "
              "training continues from the replayed state")

    logger = common.RunLogger(args, "qvpo", run_dir=args.run_dir, tensorboard=args.tensorboard, track=args.track)
    ckpt_path = logger.dir / "checkpoint.pt"

    def save(path=ckpt_path):
        common.save_checkpoint(path, dict(
            algo="qvpo", agent=agent.state_dict(), buffer=buffer.state_dict(), step=step,
            rng=common.rng_state(), gen=gen.get_state(), args=dataclasses.asdict(args), dims=[obs_dim, act_dim],
            episode=dict(index=episode, actions=list(ep_actions), ret=ep_return), history=history))

    stop = {"flag": False}  # Ctrl-C: finish the current step, checkpoint, exit
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))

    last_eval, stats, t0, step0, cpu0 = {}, {}, time.time(), step, time.process_time()
    bar = tqdm(total=args.total_steps, initial=step, desc="qvpo", disable=not args.progress, dynamic_ncols=True)
    try:
        while step < args.total_steps and not stop["flag"]:
            # Act: uniform random before learning_starts, else argmax-Q of 4 samples (Sec. 4.4)
            if step < args.learning_starts:
                a_t = torch.rand((act_dim,), generator=gen, device=device) * 2 - 1
            else:
                with torch.no_grad(), agent.autocast():
                    s_t = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                    a_t = best_of(agent.actor, agent.critic, s_t, args.n_behavior_samples, gen)[0]
            a_norm = a_t.float().cpu().numpy()  # the env needs the action on the host
            next_obs, rew, term, trunc, _ = env.step(a_norm.astype(np.float64) * scale + bias)
            buffer.add(obs, a_norm, rew, next_obs, term, trunc)
            ep_actions.append(a_norm)
            ep_return += float(rew)
            obs = next_obs
            step += 1
            if term or trunc:
                logger.log(step, **{"charts/episodic_return": ep_return, "charts/episodic_length": len(ep_actions)})
                episode, ep_actions, ep_return = episode + 1, [], 0.0
                obs, _ = env.reset(seed=args.seed + episode)

            if step >= args.learning_starts:  # one update per env step (Algorithm 1)
                alpha = entropy_alpha(step, args)
                for _ in range(args.updates_per_step):
                    stats = agent.update(buffer.sample(args.batch_size, gen), alpha, gen)
                if step % args.log_every == 0:
                    logged = {k: float(v) for k, v in stats.items()}
                    logger.log(step, **logged, **{"charts/alpha": alpha,
                                                  "charts/SPS": (step - step0) / (time.time() - t0),
                                                  "charts/cpu_seconds": time.process_time() - cpu0})
                    bar.set_postfix(critic=f"{logged['losses/critic_loss']:.3g}",
                                    ret=f"{last_eval.get('eval/return_mean', float('nan')):.1f}")
            if step % args.eval_every == 0 or step == args.total_steps:
                last_eval = run_eval(agent, args, scale, bias, step)
                history.append((step, last_eval["eval/return_mean"]))
                logger.log(step, **last_eval, **{"charts/wall_seconds": time.time() - t0,
                                                 "charts/cpu_seconds": time.process_time() - cpu0})
                bar.set_postfix(ret=f"{last_eval['eval/return_mean']:.1f}")
                save()
                if args.stop_return is not None and last_eval["eval/return_mean"] >= args.stop_return:
                    print(f"[qvpo] eval return {last_eval['eval/return_mean']:.1f} >= --stop-return at step {step}")
                    break
            bar.update(1)
    finally:
        bar.close()
        env.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if stop["flag"]:
        save()
        print(f"[qvpo] interrupted at step {step}: checkpoint {ckpt_path} (continue with --resume)")
    if args.save_replay:
        common.save_npz(args.save_replay, buffer.to_d4rl(scale, bias))
        print(f"[qvpo] replay buffer ({buffer.size} transitions) -> {args.save_replay}")
    logger.close()
    return {"step": step, "run_dir": str(logger.dir), "checkpoint": str(ckpt_path), "history": history,
            "interrupted": stop["flag"], **last_eval}


if __name__ == "__main__":
    main()
