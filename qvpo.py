"""qvpo.py: Q-weighted Variational Policy Optimization, online RL with a diffusion policy.

Ding et al., "Diffusion-based Reinforcement Learning via Q-weighted Variational Policy
Optimization", NeurIPS 2024, arXiv 2405.16173; official code wadx2019/qvpo (`--weighted --aug`).
Reproduces, on Gymnasium MuJoCo and any bounded Box-action env (InvertedPendulum-v5, Pendulum-v1):
a DDPM policy (T = 20, cosine, epsilon prediction, x0 clamped) trained by the Q-weighted
variational loss with the qadv weight on the best of 64 samples (Sec. 4.1-4.2), the diffusion
entropy term (10 uniform actions weighted alpha A, Sec. 4.3), the behavior policy argmax-Q of 4
samples (Sec. 4.4; evaluation 32), a twin-Q critic whose target takes the argmax target-Q of 4
target-policy samples, and the official hyperparameters, initialization and time embedding.
Sections follow the paper's method order (4.1 objective, 4.2 Q-weight transformations,
4.3 entropy, 4.4 action selection); equations are named, numbering differs between versions.

Deviations from the official code (both fix its bugs, ../shared/PAPERS.md):
  * the QVPO loss runs by default (officially only with `--weighted --aug`, else another method);
  * time-limit truncation bootstraps (official: treated as termination); `td_target`.
Not algorithmic: training episode k is reset with seed `seed + k` (exact resume); all samples of a
batch are denoised in one pass per diffusion step; the replay buffer lives on the device.

CPU quick run (README has the measured curves; the paper setting, 1M steps, needs a GPU):
    python qvpo.py --env InvertedPendulum-v5 --total-steps 15000 --learning-starts 1000 \
        --hidden 64 --n-timesteps 5 --n-train-samples 16 --batch-size 64 --eval-every 1000
Paper setting: python qvpo.py --env hopper
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Official constants (main.py / agent/*.py of wadx2019/qvpo)
BEHAVIOR_SAMPLES = 4  # behavior_sample: candidates of the acting policy (Sec. 4.4)
TARGET_SAMPLES = 4  # target_sample: target-policy candidates of the critic target
EVAL_SAMPLES = 32  # eval_sample: candidates at evaluation
ENTROPY_SAMPLES = 10  # uniform actions per state in the entropy term (Sec. 4.3)
ALPHA_MIN = 0.002  # floor of the entropy weight schedule
ADAM_EPS, GRAD_CLIP = 1e-5, 2.0  # both optimizers; ac_grad_norm
BUFFER_SIZE = 1_000_000  # memory_size
TIME_DIM = 32  # sinusoidal time embedding width


@dataclass
class Args:
    exp_name: str = "qvpo"
    """name of the experiment (part of the run folder name)"""
    seed: int = 0
    """seed of the networks, the update's random draws and the environment"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "hopper"
    """hopper, halfcheetah, walker2d, or a Gymnasium id with a bounded continuous action space"""
    total_steps: int = 1_000_000
    """environment steps (official num_steps: 1M)"""
    learning_starts: int = 10_000
    """uniform-random actions for this many steps; updates start at this step (start_steps)"""
    batch_size: int = 256
    """states per critic batch and per policy batch"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """soft target update rate of the critic and policy targets"""
    lr: float = 1e-4
    """diffusion policy learning rate (diffusion_lr)"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    hidden: int = 256
    """width of the denoiser's 3 hidden layers and of its time MLP"""
    critic_hidden: int = 256
    """width of the 3 hidden layers of each Q network"""
    n_timesteps: int = 20
    """diffusion steps T"""
    n_train_samples: int = 64
    """policy samples per state in the Q-weighted loss (train_sample); the best by Q is kept"""
    entropy_alpha: float = 0.02
    """entropy weight at step 0; min(alpha, max(0.002, alpha (1 - t / total_steps)))"""
    eval_every: int = 10_000
    """evaluate and checkpoint every this many environment steps"""
    eval_episodes: int = 10
    """episodes per evaluation (run at once in a vector env)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's time limit)"""
    log_every: int = 1000
    """log losses every this many steps"""
    save_replay: Optional[str] = None
    """at the end, write the replay buffer to this D4RL-style .npz (loads with --dataset-path)"""
    bf16: bool = False
    """bfloat16 autocast for the network passes (fp32 is the official setting)"""
    resume: Optional[str] = None
    """checkpoint to continue; its settings apply, overridden by the flags given with it"""
    eval_only: bool = False
    """only evaluate --checkpoint (the architecture comes from the checkpoint)"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""


# ---- data: the replay buffer, on the device
class ReplayBuffer:
    """Ring of (s, a, r, s', terminated, truncated), actions in [-1, 1]. Only `term` cuts the
    bootstrap; `trunc` marks time-limit ends (and a cut made by resume) for the D4RL export."""
    FIELDS = ("obs", "act", "rew", "next_obs", "term", "trunc")

    def __init__(self, obs_dim: int, act_dim: int, device, capacity: int = BUFFER_SIZE):
        self.capacity, self.ptr, self.size, self.episodes = capacity, 0, 0, 0
        dims = dict(obs=(obs_dim,), act=(act_dim,), next_obs=(obs_dim,))
        for k in self.FIELDS:  # torch.empty: pages not written yet cost no memory on the CPU
            setattr(self, k, torch.empty((capacity, *dims.get(k, ())), device=device))

    def add(self, obs, act, rew, next_obs, term: bool, trunc: bool):
        for k, v in zip(self.FIELDS, (obs, act, rew, next_obs, float(term), float(trunc))):
            getattr(self, k)[self.ptr] = torch.as_tensor(v, dtype=torch.float32)
        self.ptr, self.size = (self.ptr + 1) % self.capacity, min(self.size + 1, self.capacity)
        self.episodes += bool(term or trunc)

    def end_episode(self):
        """Resume: the open episode (if any) ends here as a time-limit cut."""
        last = (self.ptr - 1) % self.capacity
        if self.size and not (self.term[last] or self.trunc[last]):
            self.trunc[last], self.episodes = 1.0, self.episodes + 1

    def sample(self, n: int, gen: torch.Generator):
        """n uniform rows: (n, S), (n, A), (n,), (n, S), (n,) terminated (never truncated)."""
        i = torch.randint(0, self.size, (n,), generator=gen, device=self.obs.device)
        return self.obs[i], self.act[i], self.rew[i], self.next_obs[i], self.term[i]

    def state_dict(self) -> dict:
        rows = {k: getattr(self, k)[: self.size].cpu() for k in self.FIELDS}
        return dict(ptr=self.ptr, size=self.size, episodes=self.episodes, **rows)

    def load_state_dict(self, d: dict):
        self.ptr, self.size, self.episodes = d["ptr"], d["size"], d["episodes"]
        for k in self.FIELDS:
            getattr(self, k)[: self.size] = d[k]

    def to_d4rl(self, scale, bias) -> dict:
        """D4RL arrays, oldest first, actions in env units; an open last episode ends (timeout)."""
        order = torch.arange(self.size) + (self.ptr if self.size == self.capacity else 0)
        g = {k: getattr(self, k)[order % self.capacity].cpu().numpy() for k in self.FIELDS}
        data = dict(observations=g["obs"], actions=g["act"] * scale + bias, rewards=g["rew"],
                    terminals=g["term"] > 0.5, timeouts=g["trunc"] > 0.5,
                    next_observations=g["next_obs"])
        data["timeouts"][-1:] |= ~data["terminals"][-1:]
        return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in data.items()}


# ---- model: DDPM policy (epsilon prediction, cosine schedule) and twin-Q critic
def init_official(m: nn.Module):
    """Official init_weights: Linear weights ~ N(0, 1 / (2 sqrt(fan_in))), zero bias. (Its
    truncation loop reassigns a local copy, so the weights it leaves are untruncated normals.)"""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 1 / (2 * math.sqrt(m.in_features)))
        nn.init.zeros_(m.bias)


def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:  # 3 hidden layers, Mish
    return nn.Sequential(nn.Linear(inp, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                         nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, out))


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021: abar(t) = cos^2((t / T + s) / (1 + s) pi / 2); beta <= 0.999."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    abar = torch.cos((x / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)


class SinusoidalEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        k = torch.arange(dim // 2)
        self.register_buffer("freqs", torch.exp(-math.log(10000) * k / (dim // 2 - 1)))

    def forward(self, t):  # (M,) -> (M, dim): [sin(t f), cos(t f)]
        x = t.float()[:, None] * self.freqs[None]
        return torch.cat([x.sin(), x.cos()], -1)


class Denoiser(nn.Module):
    """eps_theta(a_t, t, s): time sinusoidal(32) -> Linear(32, h) -> Mish -> Linear(h, 32);
    an MLP (3 x h, Mish) over [a_t, time embedding, s] (official agent/model.py Model)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.time = nn.Sequential(SinusoidalEmb(TIME_DIM), nn.Linear(TIME_DIM, hidden), nn.Mish(),
                                  nn.Linear(hidden, TIME_DIM))
        self.net = mlp(act_dim + TIME_DIM + obs_dim, hidden, act_dim)
        self.apply(init_official)

    def forward(self, x, t, s):  # x (M, A), t (M,) or (1,) shared by all rows, s (M, S) -> (M, A)
        emb = self.time(t).expand(x.shape[0], -1)  # (M, 32)
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
        """The randomness of one sampler call, [state, sample, step, action]: step 0 is a_T,
        step k >= 1 the noise of the k-th reverse step (the last one, t = 0, adds none)."""
        return (n_states, n, self.T, self.act_dim)

    def denoise(self, states, noise):
        """Reverse process, every (state, sample) row in one net pass per step.
        states (B, S), noise (B, N, T, A) -> actions (B, N, A) in [-1, 1]."""
        B, N = noise.shape[:2]
        s = states[:, None].expand(B, N, states.shape[-1]).reshape(B * N, -1)  # (B*N, S)
        x = noise[:, :, 0].reshape(B * N, self.act_dim)  # a_T ~ N(0, I), (B*N, A)
        for k, t in enumerate(range(self.T - 1, -1, -1)):
            eps = self.eps(x, torch.full((1,), t, device=x.device), s)
            x0 = self.sqrt_recip_abar[t] * x - self.sqrt_recipm1_abar[t] * eps
            x = self.post_c0[t] * x0.clamp(-1, 1) + self.post_ct[t] * x  # posterior mean
            if t > 0:
                x = x + self.post_std[t] * noise[:, :, k + 1].reshape(B * N, self.act_dim)
        return x.clamp(-1, 1).view(B, N, self.act_dim)

    def sample(self, states, n: int, gen: torch.Generator):  # (B, S) -> (B, n, A)
        noise = torch.randn(self.noise_shape(len(states), n), generator=gen, device=states.device)
        return self.denoise(states, noise)

    def loss(self, actions, states, weights, gen: torch.Generator):
        """Weighted denoising loss (Sec. 4.1): mean_i w_i mean_A (eps - eps_theta(sqrt(abar_t) a_i
        + sqrt(1 - abar_t) eps, t, s_i))^2, t ~ U{0..T-1}. actions (M, A), weights (M,)."""
        t = torch.randint(0, self.T, (len(actions),), generator=gen, device=actions.device)
        eps = torch.randn(actions.shape, generator=gen, device=actions.device)
        x_t = self.sqrt_abar[t, None] * actions + self.sqrt_1m_abar[t, None] * eps
        return (weights * (self.eps(x_t, t, states).float() - eps).pow(2).mean(-1)).mean()


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, hidden, 1), mlp(obs_dim + act_dim, hidden, 1)
        self.apply(init_official)

    def forward(self, s, a):  # (M, S), (M, A) -> (M,), (M,)
        x = torch.cat([s, a], -1)
        return self.q1(x).squeeze(-1).float(), self.q2(x).squeeze(-1).float()

    def q_min(self, s, a):  # (M,)
        return torch.min(*self(s, a))


# ---- policy: action selection by Q (Sec. 4.4), the QVPO weights (Sec. 4.2-4.3)
def q_of_samples(critic: TwinQ, states, actions):
    """min(Q1, Q2) of N candidates per state: states (B, S), actions (B, N, A) -> (B, N)."""
    B, N, A = actions.shape
    s = states[:, None].expand(B, N, states.shape[-1]).reshape(B * N, -1)  # (B*N, S)
    return critic.q_min(s, actions.reshape(B * N, A)).view(B, N)


def best_of(actor: DiffusionPolicy, critic: TwinQ, states, n: int, gen):
    """Sample n actions per state, keep the argmax of Q: (B, S) -> (B, A)."""
    acts = actor.sample(states, n, gen)  # (B, n, A)
    return acts[torch.arange(len(states)), q_of_samples(critic, states, acts).argmax(1)]


def qadv(q):
    """qadv (Sec. 4.2): w(s, a_j) = max(Q(s, a_j) - V(s), 0), V(s) = mean_j Q(s, a_j). (B, N)."""
    return (q - q.mean(1, keepdim=True)).clamp(min=0)


def entropy_alpha(step: int, total: int, alpha: float) -> float:
    """Official schedule: min(alpha, max(0.002, alpha - alpha t / T)), 0.002 from t = 0.9 T."""
    return min(alpha, max(ALPHA_MIN, alpha - alpha * step / total))


def td_target(reward, terminated, q_next, gamma: float):
    """y = r + gamma (1 - terminated) Q'(s', a'): a time-limit truncation still bootstraps."""
    return reward + gamma * (1.0 - terminated) * q_next


def optimizer_step(opt, loss, net: nn.Module):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
    opt.step()


class Agent(nn.Module):
    """Policy, critic and their targets (state_dict); optimizers as attributes."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device="cpu"):
        super().__init__()
        self.args = args
        self.actor = DiffusionPolicy(obs_dim, act_dim, args.hidden, args.n_timesteps)
        self.critic = TwinQ(obs_dim, act_dim, args.critic_hidden)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.to(device)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), args.lr, eps=ADAM_EPS)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), args.critic_lr, eps=ADAM_EPS)

    def autocast(self):
        dev = self.critic.q1[0].weight.device.type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.args.bf16)

    @torch.no_grad()
    def act(self, obs, gen):  # behavior policy (Sec. 4.4): argmax-Q of 4 samples, (S,) -> (A,)
        s = torch.as_tensor(obs, dtype=torch.float32, device=self.critic.q1[0].weight.device)
        with self.autocast():
            return best_of(self.actor, self.critic, s[None], BEHAVIOR_SAMPLES, gen)[0].float()

    def update(self, buffer: ReplayBuffer, alpha: float, gen: torch.Generator) -> dict:
        """One critic step, one policy step, soft target updates (Algorithm 1); device tensors."""
        args, B = self.args, self.args.batch_size
        s, a, r, s2, term = buffer.sample(B, gen)  # (B, S), (B, A), (B,), (B, S), (B,)
        with torch.no_grad(), self.autocast():  # a' = argmax target-Q of 4 target-policy samples
            a2 = best_of(self.actor_target, self.critic_target, s2, TARGET_SAMPLES, gen)  # (B, A)
            y = td_target(r, term, self.critic_target.q_min(s2, a2), args.gamma)  # (B,)
        with self.autocast():
            q1, q2 = self.critic(s, a)
            critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        optimizer_step(self.critic_opt, critic_loss, self.critic)

        s = buffer.sample(B, gen)[0]  # the policy step draws its own batch (official action_aug)
        with torch.no_grad(), self.autocast():  # Sec. 4.1-4.2: the best of N samples, weight qadv
            acts = self.actor.sample(s, args.n_train_samples, gen)  # (B, N, A)
            q = q_of_samples(self.critic, s, acts)  # (B, N)
            best = q.argmax(1)  # (B,)
            adv = qadv(q)[torch.arange(B), best]  # A(s, a_best) >= 0, (B,)
            # Sec. 4.3 diffusion entropy: 10 uniform actions per state, weight alpha * A
            E = ENTROPY_SAMPLES if alpha > 0 else 0  # the official code skips it at alpha 0
            uni = torch.rand((E * B, acts.shape[-1]), generator=gen,
                             device=s.device) * 2 - 1  # (E B, A), rows [copy][state]
            actions = torch.cat([acts[torch.arange(B), best], uni])  # (B + E B, A)
            states = torch.cat([s, s.repeat(E, 1)])  # (B + E B, S)
            weights = torch.cat([adv, (alpha * adv).repeat(E)])  # (B + E B,)
        with self.autocast():
            actor_loss = self.actor.loss(actions, states, weights, gen)
        optimizer_step(self.actor_opt, actor_loss, self.actor)

        with torch.no_grad():  # target <- target + tau (online - target), both every step
            for net, tgt in ((self.critic, self.critic_target), (self.actor, self.actor_target)):
                for p, p_tgt in zip(net.parameters(), tgt.parameters()):
                    p_tgt.lerp_(p, args.tau)
        return {"losses/critic_loss": critic_loss.detach(), "losses/q_mean": q.mean(),
                "losses/actor_loss": actor_loss.detach(), "losses/advantage_mean": adv.mean()}


class QPolicy:
    """Batched policy (common.evaluate, load_policy): argmax-Q of 32 samples, in env units."""

    def __init__(self, agent: Agent, seed: int = 0):
        self.agent, self.env = agent, agent.args.env
        self.device = agent.critic.q1[0].weight.device
        self.gen = torch.Generator(self.device).manual_seed(seed)
        scale, bias = action_bounds(self.env)
        self.scale, self.bias = (torch.tensor(v, dtype=torch.float32) for v in (scale, bias))

    @torch.no_grad()
    def __call__(self, obs) -> np.ndarray:  # (n, S) -> (n, A)
        s = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        with self.agent.autocast():
            a = best_of(self.agent.actor, self.agent.critic, s, EVAL_SAMPLES, self.gen)
        return (a.float().cpu() * self.scale + self.bias).numpy()


def action_bounds(env: str):
    """(scale, bias) with action = a * scale + bias for a in [-1, 1]; a bounded Box is required."""
    space = common.make_env(env).action_space
    if getattr(space, "dtype", None) is None or space.dtype.kind != "f":
        raise ValueError(f"{env}: QVPO needs a continuous (Box) action space, got {space}")
    if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise ValueError(f"{env}: QVPO needs a bounded action space, got {space}")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    return (high - low) / 2, (high + low) / 2


def evaluate(policy: QPolicy, args: Args) -> dict:
    res = common.evaluate(policy, args.env, args.eval_episodes, seed=args.seed + 100_000,
                          max_steps=args.eval_max_steps)
    out = {"eval/return_mean": res["returns"].mean(), "eval/return_std": res["returns"].std()}
    if np.isfinite(res["normalized"]).all():  # D4RL envs only
        out["eval/normalized_score"] = res["normalized"].mean()
    return out


def load_policy(path, device="cpu") -> QPolicy:
    """The evaluation policy of a qvpo checkpoint: policy(obs (n, S)) -> actions (n, A) numpy."""
    ckpt = common.load_checkpoint(path, "qvpo")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    agent = Agent(*common.env_dims(args.env), args, device)
    agent.load_state_dict(ckpt["agent"])
    return QPolicy(agent, args.seed)


def checked_args(argv) -> Args:
    """Flags -> Args; with --resume, the checkpoint's settings overridden by the flags given."""
    args = common.parse_args(Args, argv)
    if args.resume:
        saved = common.load_checkpoint(args.resume, "qvpo")["args"]
        given = {a[2:].split("=")[0].removeprefix("no-").replace("-", "_") for a in argv
                 if a.startswith("--")}
        args = Args(**{k: saved[k] if k in saved and k not in given else getattr(args, k)
                       for k in Args.__dataclass_fields__})
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (the checkpoint.pt of a qvpo run)")
    for k in ("total_steps", "learning_starts", "batch_size", "hidden", "critic_hidden",
              "n_timesteps", "n_train_samples", "eval_every", "eval_episodes", "log_every"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = checked_args(argv)
    device = common.get_device(args.cuda)
    if args.eval_only:
        policy = load_policy(args.checkpoint, device)
        args.env = policy.env
        res = evaluate(policy, args)
        print(f"[qvpo] {args.checkpoint}: return {res['eval/return_mean']:.1f} "
              f"+- {res['eval/return_std']:.1f} over {args.eval_episodes} episodes")
        return res
    scale, bias = action_bounds(args.env)
    common.set_seed(args.seed)
    obs_dim, act_dim = common.env_dims(args.env)
    agent = Agent(obs_dim, act_dim, args, device)
    buffer = ReplayBuffer(obs_dim, act_dim, device)
    gen = torch.Generator(device).manual_seed(args.seed)  # every draw of acting and updating
    run = common.Run(args, "qvpo", agent=agent, actor_opt=agent.actor_opt,
                     critic_opt=agent.critic_opt, buffer=buffer, sampler=gen)
    # Resume continues the networks, optimizers, buffer, generator and RNGs exactly; the env's
    # state cannot be saved: a run saved mid-episode cuts that episode (a time-limit end) and
    # starts the next one, so a checkpoint at an episode end continues exactly, others nearly.
    buffer.end_episode()
    env = common.make_env(args.env)
    obs, _ = env.reset(seed=args.seed + buffer.episodes)
    ep_return, ep_length = 0.0, 0
    for step in run.loop(args.total_steps):
        if step <= args.learning_starts:  # uniform random actions first (official start_steps)
            a = torch.rand(act_dim, generator=gen, device=device) * 2 - 1
        else:  # Sec. 4.4: execute the argmax-Q of 4 policy samples
            a = agent.act(obs, gen)
        a = a.cpu().numpy()  # (A,) in [-1, 1]; the env needs it on the host
        next_obs, reward, term, trunc, _ = env.step(a * scale + bias)
        buffer.add(obs, a, reward, next_obs, term, trunc)
        obs, ep_return, ep_length = next_obs, ep_return + float(reward), ep_length + 1
        if term or trunc:
            run.log(**{"charts/episodic_return": ep_return, "charts/episodic_length": ep_length})
            obs, _ = env.reset(seed=args.seed + buffer.episodes)
            ep_return, ep_length = 0.0, 0
        if step >= args.learning_starts:  # one update per environment step (Algorithm 1)
            alpha = entropy_alpha(step, args.total_steps, args.entropy_alpha)
            losses = agent.update(buffer, alpha, gen)
            if run.every(args.log_every):
                run.log(**losses, **{"charts/alpha": alpha})
        if run.every(args.eval_every):
            run.log(**evaluate(QPolicy(agent, args.seed), args))
            run.save()
    env.close()
    if args.save_replay:
        common.save_npz(args.save_replay, buffer.to_d4rl(scale, bias))
        print(f"[qvpo] replay buffer ({buffer.size} transitions) -> {args.save_replay}")
    return run.finish()


if __name__ == "__main__":
    main()
