"""diffuser.py: Diffuser, "Planning with Diffusion for Flexible Behavior Synthesis"
(Janner, Du, Tenenbaum, Levine, ICML 2022, arXiv 2205.09991), single file.

A plan is an array tau = [(a_0, s_0), ..., (a_{H-1}, s_{H-1})] of shape (H, act + obs). A
temporal U-Net (Sec. 3.1, Fig. 2 / Appendix C) is trained to denoise whole plans with a
Gaussian diffusion (T = 20, cosine schedule, the network predicts the clean plan x0). At
decision time the current state is *inpainted* into step 0 of the plan (Sec. 3.3), 64 plans
per environment are sampled with value guidance (Sec. 3.2, Eq. 3: a value network J trained on
noisy plans tilts every denoising step along its gradient), and the first action of the best
plan is executed; the agent replans at every step.

Reproduces: the locomotion model (dim 32, mults (1,2,4,8), H = 32, ~4M parameters) and the
halfcheetah variant (H = 4, mults (1,4,8), attention), value guidance as the official config
(n_guide_steps 2, scale 0.1, gradient scaled by the posterior variance, no guidance for t < 2),
and the warm-started planning the paper proposes in Sec. 5.4 (Fig. 7) but the official code
lacks:

  --warm-start-steps k   shift the previous best plan one step forward (the last step is
                         repeated), copy it to the n_plans candidates, re-noise every copy
                         with q(x_k | x_0) and denoise only k steps (instead of T = 20).
  Why k = 5 (T/4) when you pick one: with the cosine schedule alpha_bar_5 = 0.85, i.e. noise of
  std 0.39 (in normalized units) on the shifted plan: enough for the denoiser to rewrite the
  repeated last step and pull the plan onto the newly observed state, while the coarse shape
  of the plan survives. It costs 5 U-Net passes + 6 value gradients (guidance at t = 4, 3, 2)
  instead of 20 + 36, i.e. 4-6x fewer network passes (>= 3x was the target). Smaller k (2-3)
  leaves the value guidance nothing to act on (t < 2 is unguided); larger k approaches full
  replanning in cost. The first decision of every episode is a full replan. Measured (CPU,
  README): 5.1x more decisions/s than full replanning at the paper setting; on the
  hopper-medium CPU run (16k steps, 10 episodes) it cost 2.7 normalized points (34.0 -> 31.3)
  for 4.7x the decisions/s; on a 2400-step model it cost 14.5.

Batched planning: the plans of all running evaluation episodes are denoised as one batch
(N envs x n_plans) and the evaluation itself is vectorized (common.evaluate).

Deviations (named, with reasons):
- Cosine schedule exactly as Nichol & Dhariwal (2021) Eq. 17 (t/T for t = 0..T); the official
  code spaces its T+1 points by (T+1)/T instead. The last beta is 0.999 in both.
- Attention (halfcheetah variant) is exact softmax self-attention over the plan's time steps
  through F.scaled_dot_product_attention (non-causal: denoising sees the whole plan); the
  official code uses linear attention. With H = 4 tokens the exact form is as cheap.
- Plans are ranked by the value network evaluated at t = 0 on the final clean plans; the
  official code ranks by the value it computed on the last *noisy* input during guidance.
- Quick CPU settings (--dim, --n-plans, --total-steps, --warm-start-steps) are flags, never
  defaults. Paper scale: 1M diffusion steps + 200k value steps (days on a CPU).

CPU run (1 thread, 30 min of training, 6.5 min of evaluation; the README has the scores):
  python diffuser.py --env hopper --dataset medium --dim 16 --total-steps 16000 --value-total-steps 16000 \
      --learning-rate 5e-4 --ema-every 1 --ema-start 500 --eval-episodes 0 --run-dir runs/diffuser_cpu
  python diffuser.py --eval-only --checkpoint runs/diffuser_cpu/checkpoint.pt --n-plans 4 --eval-episodes 10
  (add --warm-start-steps 5 for warm-started planning, ~5x more decisions per second)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import tqdm


@dataclass
class Args:
    exp_name: str = "diffuser"
    """name of the experiment (part of the run directory)"""
    seed: int = 0
    """seed of training, planning noise and the evaluation environments"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "hopper"
    """environment: hopper, halfcheetah, walker2d"""
    dataset: str = "medium"
    """dataset: random, medium, medium-replay, expert, medium-expert (or a Minari id)"""
    dataset_path: Optional[str] = None
    """a .npz / D4RL .hdf5 file to read instead of the named dataset"""
    # --- model (Appendix C) ---
    horizon: Optional[int] = None
    """planning horizon H (default: 4 for halfcheetah, 32 otherwise; a multiple of 2^(levels-1))"""
    dim: int = 32
    """U-Net base channels"""
    dim_mults: Optional[tuple[int, ...]] = None
    """channel multipliers per U-Net level (default: (1,4,8) for halfcheetah, (1,2,4,8) otherwise)"""
    attention: Optional[bool] = None
    """self-attention blocks in the U-Net (default: on for halfcheetah only)"""
    # --- diffusion and training (Sec. 3, Appendix C) ---
    n_diffusion_steps: int = 20
    """number of diffusion steps T"""
    action_weight: float = 10.0
    """loss weight of the first action of the plan"""
    total_steps: int = 1_000_000
    """gradient steps of the diffusion model"""
    value_total_steps: int = 200_000
    """gradient steps of the value network (trained alongside; stops after this many)"""
    batch_size: int = 64
    """trajectories per gradient step"""
    learning_rate: float = 2e-4
    """Adam learning rate (both networks)"""
    ema_decay: float = 0.995
    """EMA decay of the weights used for planning"""
    ema_every: int = 10
    """update the EMA every this many steps (official code)"""
    ema_start: int = 2000
    """before this step the EMA is a plain copy of the weights (official code)"""
    discount: float = 0.997
    """discount of the value targets (the planner's gamma)"""
    termination_penalty: float = -100.0
    """added to the reward of a terminal transition for the value targets"""
    # --- planning (Sec. 3.2-3.3) ---
    n_plans: int = 64
    """plans sampled per environment per decision; the best one (by value) is executed"""
    guide_scale: float = 0.1
    """value-guidance step size alpha (official: 0.001 for halfcheetah)"""
    n_guide_steps: int = 2
    """value-gradient steps per denoising step"""
    t_stopgrad: int = 2
    """no guidance at denoising steps t < t_stopgrad"""
    warm_start_steps: int = 0
    """0: full replanning; k > 0: warm start from the previous plan with k denoising steps (k=5 suggested)"""
    # --- bookkeeping ---
    eval_every: int = 100_000
    """evaluate every this many steps (and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, run as one vectorized batch (0: no evaluation)"""
    max_episode_steps: Optional[int] = None
    """cap on evaluation episode length (None: the environment's 1000); capped scores are not comparable"""
    log_every: int = 100
    """log losses every this many steps"""
    resume: Optional[str] = None
    """checkpoint to continue training from"""
    eval_only: bool = False
    """only evaluate --checkpoint (planning flags apply; the model is the checkpoint's)"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""
    bf16: bool = False
    """bfloat16 autocast for the networks (CPU and CUDA)"""
    run_dir: Optional[str] = None
    """run directory (default runs/{env}__{exp_name}__{seed}__{time})"""


def resolve_defaults(args: Args) -> Args:
    """Fill the per-environment model defaults (official config: halfcheetah H=4, (1,4,8), attention)."""
    cheetah = args.env == "halfcheetah"
    if args.horizon is None:
        args.horizon = 4 if cheetah else 32
    if args.dim_mults is None:
        args.dim_mults = (1, 4, 8) if cheetah else (1, 2, 4, 8)
    if args.attention is None:
        args.attention = cheetah
    args.dim_mults = tuple(args.dim_mults)
    down = 2 ** (len(args.dim_mults) - 1)
    if args.horizon % down:
        raise ValueError(f"--horizon {args.horizon} must be a multiple of {down} for {len(args.dim_mults)} "
                         f"U-Net levels; pick e.g. --horizon {down * max(1, round(args.horizon / down))}")
    if any((args.dim * m) % 8 for m in args.dim_mults) or (args.dim * args.dim_mults[-1] // 4) % 8:
        raise ValueError(f"--dim {args.dim} x mults {args.dim_mults} must give channels divisible by 8 "
                         f"(GroupNorm(8)); use --dim 16 or 32")
    if not 0 <= args.warm_start_steps <= args.n_diffusion_steps:
        raise ValueError(f"--warm-start-steps must be in [0, {args.n_diffusion_steps}]")
    return args


# --------------------------------------------------------------------------------------
# Data: windows of H steps, per-dimension Gaussian normalizer, value targets
# --------------------------------------------------------------------------------------
class PlanDataset:
    """All windows (a_t, s_t)_{t=start..start+H-1} of the dataset's episodes, held as one flat
    normalized array on the device. As the official SequenceDataset, windows start anywhere
    before an episode's last step (and before 1000 - H) and run past the end into zero padding
    (raw zeros, then normalized). Value targets: discounted return from `start` to the episode
    end, with termination_penalty added to the reward of a terminal transition."""

    def __init__(self, data: dict, horizon: int, discount: float, termination_penalty: float,
                 device, max_path_length: int = 1000):
        obs, act = data["observations"], data["actions"]
        self.obs_dim, self.act_dim = obs.shape[1], act.shape[1]
        # Per-dimension Gaussian normalizer over the real transitions (official GaussianNormalizer).
        x = np.concatenate([act, obs], 1).astype(np.float64)  # (N, act + obs): actions first, as the paper
        self.mean, self.std = x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32)
        rows, starts, values, offset = [], [], [], 0
        for ep in common.split_episodes(data):
            L = len(ep["rewards"])
            rew = ep["rewards"].astype(np.float64).copy()
            if ep["terminals"][-1]:
                rew[-1] += termination_penalty
            values.append(common.returns_to_go(rew, discount)[: max(0, min(L - 1, max_path_length - horizon))])
            starts.append(offset + np.arange(max(0, min(L - 1, max_path_length - horizon))))
            rows.append(np.concatenate([ep["actions"], ep["observations"]], 1))
            rows.append(np.zeros((horizon - 1, x.shape[1])))  # padding past the episode end
            offset += L + horizon - 1
        if not sum(len(s) for s in starts):
            raise ValueError(f"no episode is longer than one step (horizon {horizon}); this dataset cannot "
                             f"train Diffuser")
        flat = (np.concatenate(rows).astype(np.float32) - self.mean) / self.std
        self.flat = torch.as_tensor(flat, device=device)                         # (rows, D)
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)     # (n_windows,)
        self.values = torch.as_tensor(np.concatenate(values), dtype=torch.float32, device=device)
        self.steps = torch.arange(horizon, device=device)
        self.device = device

    def sample(self, batch_size: int, gen: torch.Generator):
        """(x0 (B, H, D) normalized plans, value targets (B,)); indices drawn with a CPU generator."""
        i = torch.randint(len(self.starts), (batch_size,), generator=gen).to(self.device)
        idx = self.starts[i][:, None] + self.steps[None]                          # (B, H)
        return self.flat[idx], self.values[i]


# --------------------------------------------------------------------------------------
# Model: temporal U-Net and value network (Sec. 3.1, Fig. 2, Appendix C)
# --------------------------------------------------------------------------------------
class TimeEmbedding(nn.Sequential):
    """Sinusoidal embedding of the diffusion step -> Linear(dim, 4 dim) -> Mish -> Linear(4 dim, dim)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        emb = t.float()[:, None] * freqs[None]                                    # (B, dim/2)
        return super().forward(torch.cat([emb.sin(), emb.cos()], -1))             # (B, dim)


class ConvBlock(nn.Sequential):
    """Conv1d(k=5) -> GroupNorm(8) -> Mish over the time axis."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__(nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(8, cout), nn.Mish())


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks; the diffusion-step embedding is added after the first (Fig. 2)."""

    def __init__(self, cin: int, cout: int, tdim: int, k: int = 5):
        super().__init__()
        self.block1, self.block2 = ConvBlock(cin, cout, k), ConvBlock(cout, cout, k)
        self.time = nn.Sequential(nn.Mish(), nn.Linear(tdim, cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):                                                  # x (B, C, H)
        h = self.block1(x) + self.time(temb)[:, :, None]                          # (B, cout, H)
        return self.block2(h) + self.skip(x)


class SelfAttention(nn.Module):
    """Pre-LayerNorm (over channels) residual softmax self-attention over time steps (SDPA)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):                                                       # (B, C, H)
        B, C, H = x.shape
        h = self.norm(x.transpose(1, 2))                                          # (B, H, C)
        q, k, v = self.qkv(h).view(B, H, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, H, dh)
        o = F.scaled_dot_product_attention(q, k, v)                               # (B, heads, H, dh)
        return x + self.out(o.transpose(1, 2).reshape(B, H, -1)).transpose(1, 2)  # (B, C, H)


def _downsample(c):
    return nn.Conv1d(c, c, 3, stride=2, padding=1)           # H -> ceil(H / 2)


class TemporalUnet(nn.Module):
    """x (B, H, act+obs), t (B,) -> predicted clean plan x0 (B, H, act+obs)."""

    def __init__(self, transition_dim: int, dim: int = 32, dim_mults=(1, 2, 4, 8), attention: bool = False):
        super().__init__()
        dims = [transition_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        attn = (lambda c: SelfAttention(c)) if attention else (lambda c: nn.Identity())
        self.time = TimeEmbedding(dim)
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, (cin, cout) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([ResidualTemporalBlock(cin, cout, dim), ResidualTemporalBlock(cout, cout, dim),
                                             attn(cout), nn.Identity() if last else _downsample(cout)]))
        mid = dims[-1]
        self.mid1, self.mid_attn, self.mid2 = ResidualTemporalBlock(mid, mid, dim), attn(mid), ResidualTemporalBlock(mid, mid, dim)
        for cin, cout in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([ResidualTemporalBlock(cout * 2, cin, dim), ResidualTemporalBlock(cin, cin, dim),
                                           attn(cin), nn.ConvTranspose1d(cin, cin, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(ConvBlock(dim, dim), nn.Conv1d(dim, transition_dim, 1))

    def forward(self, x, t):
        temb = self.time(t)
        x = x.transpose(1, 2)                                                      # (B, D, H)
        skips = []
        for b1, b2, at, down in self.downs:
            x = at(b2(b1(x, temb), temb))
            skips.append(x)
            x = down(x)                                                            # (B, C, H / 2)
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)
        for b1, b2, at, up in self.ups:
            x = torch.cat([x, skips.pop()], 1)                                     # (B, 2C, h)
            x = up(at(b2(b1(x, temb), temb)))                                      # (B, C', 2h)
        return self.final(x).transpose(1, 2)                                       # (B, H, D)


class ValueNet(nn.Module):
    """J(x_t, t): the U-Net's down path (downsampling after every level), two narrowing mid
    blocks, then an MLP on [features, time embedding] -> predicted return of the plan."""

    def __init__(self, horizon: int, transition_dim: int, dim: int = 32, dim_mults=(1, 2, 4, 8)):
        super().__init__()
        dims = [transition_dim] + [dim * m for m in dim_mults]
        self.time = TimeEmbedding(dim)
        self.blocks = nn.ModuleList(nn.ModuleList([ResidualTemporalBlock(cin, cout, dim), ResidualTemporalBlock(cout, cout, dim),
                                                   _downsample(cout)]) for cin, cout in zip(dims[:-1], dims[1:]))
        mid = dims[-1]
        self.mid1, self.down1 = ResidualTemporalBlock(mid, mid // 2, dim), _downsample(mid // 2)
        self.mid2, self.down2 = ResidualTemporalBlock(mid // 2, mid // 4, dim), _downsample(mid // 4)
        length = horizon
        for _ in range(len(dim_mults) + 2):
            length = (length + 1) // 2
        fc = mid // 4 * length
        self.head = nn.Sequential(nn.Linear(fc + dim, fc // 2), nn.Mish(), nn.Linear(fc // 2, 1))

    def forward(self, x, t):
        temb = self.time(t)
        x = x.transpose(1, 2)                                                      # (B, D, H)
        for b1, b2, down in self.blocks:
            x = down(b2(b1(x, temb), temb))
        x = self.down2(self.mid2(self.down1(self.mid1(x, temb)), temb))            # (B, C/4, h)
        return self.head(torch.cat([x.flatten(1), temb], -1)).squeeze(-1)          # (B,)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters; buffers copied)."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


# --------------------------------------------------------------------------------------
# Gaussian diffusion (Sec. 2, 3): cosine schedule, x0 prediction, inpainting
# --------------------------------------------------------------------------------------
def cosine_alphas_cumprod(T: int, s: float = 0.008) -> np.ndarray:
    """alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), t = 0..T (Nichol & Dhariwal Eq. 17)."""
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    return f / f[0]


class Diffusion:
    """Schedule constants (index t = 0..T-1 is the step that maps x_{t+1} -> x_t) and the
    training loss; sampling lives in the Planner."""

    def __init__(self, T: int, act_dim: int, horizon: int, transition_dim: int, action_weight: float, device):
        ab = cosine_alphas_cumprod(T)
        betas = np.clip(1 - ab[1:] / ab[:-1], 0, 0.999)
        alphas = 1 - betas
        acp = np.cumprod(alphas)                                # alpha_bar, recomputed from clipped betas
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1 - acp_prev) / (1 - acp)            # beta~_t of DDPM Eq. 7
        c = dict(betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev,
                 sqrt_ab=np.sqrt(acp), sqrt_1m_ab=np.sqrt(1 - acp), posterior_variance=post_var,
                 posterior_log_variance=np.log(np.maximum(post_var, 1e-20)),
                 coef_x0=betas * np.sqrt(acp_prev) / (1 - acp), coef_xt=(1 - acp_prev) * np.sqrt(alphas) / (1 - acp))
        for k, v in c.items():
            setattr(self, k, torch.as_tensor(v, dtype=torch.float32, device=device))
        self.T, self.act_dim = T, act_dim
        w = torch.ones(horizon, transition_dim, device=device)
        w[0, :act_dim] = action_weight                          # the first action matters most
        self.loss_weights = w                                   # (H, D)

    def q_sample(self, x0, t, noise):
        """x_{t+1} ~ q(. | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) (DDPM Eq. 4)."""
        return self.sqrt_ab[t][:, None, None] * x0 + self.sqrt_1m_ab[t][:, None, None] * noise

    def inpaint(self, x, state):
        """Condition on the current state: overwrite s_0 of every plan (Sec. 3.3)."""
        x[:, 0, self.act_dim:] = state
        return x

    def step_mean(self, x0_hat, x, t: int):
        """Posterior mean mu~_t(x_{t+1}, x0_hat) (DDPM Eq. 7) for a scalar step t."""
        return self.coef_x0[t] * x0_hat + self.coef_xt[t] * x

    def loss(self, model, x0):
        """Weighted L2 between the predicted and true clean plan, state inpainted (Sec. 3.1)."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        xt = self.inpaint(self.q_sample(x0, t, torch.randn_like(x0)), x0[:, 0, self.act_dim:])
        x0_hat = self.inpaint(model(xt, t), x0[:, 0, self.act_dim:])
        return ((x0_hat.float() - x0) ** 2 * self.loss_weights).mean()

    def value_loss(self, value, x0, target):
        """MSE of J(x_t, t) against the plan's discounted return, on noisy inpainted plans."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        xt = self.inpaint(self.q_sample(x0, t, torch.randn_like(x0)), x0[:, 0, self.act_dim:])
        return F.mse_loss(value(xt, t).float(), target)


# --------------------------------------------------------------------------------------
# Planner: guided, inpainted, batched sampling; optional warm start (Sec. 3.2, 3.3, 5.4)
# --------------------------------------------------------------------------------------
class Planner:
    """policy(obs (N, obs_dim)) -> actions (N, act_dim); every running env gets n_plans plans,
    all denoised in one batch of (n_running * n_plans) plans."""

    def __init__(self, model, value, diffusion: Diffusion, mean, std, args: Args, device):
        self.model, self.value, self.diff, self.args, self.device = model, value, diffusion, args, device
        self.mean = torch.as_tensor(mean, device=device)
        self.std = torch.as_tensor(std, device=device)
        self.act_dim = diffusion.act_dim
        self.n_envs = 0
        self.on_step = None  # test hook: called with x after every denoising step

    def reset(self, n: int):
        self.n_envs = n
        self.active = np.ones(n, dtype=bool)
        self.prev = None       # (N, H, D) last executed plan of every env (normalized)

    def observe(self, rewards, dones):
        self.active &= ~np.asarray(dones, dtype=bool)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def value_grad(self, x, t: int):
        """(J(x_t, t), dJ/dx_t) for a batch of plans."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            with self._autocast():
                y = self.value(x, torch.full((x.shape[0],), t, device=x.device)).float()
            (g,) = torch.autograd.grad(y.sum(), x)
        return y.detach(), g

    def guide(self, x, state, t: int):
        """Eq. 3: n_guide_steps times x <- x + alpha * Sigma_t * grad J(x, t), state re-inpainted."""
        a, d = self.args, self.diff
        for _ in range(a.n_guide_steps):
            _, g = self.value_grad(x, t)
            x = d.inpaint(x + a.guide_scale * d.posterior_variance[t] * g, state)
        return x

    def denoise(self, x, state, t_start: int, guide: bool = True):
        """Run denoising steps t = t_start-1 .. 0 from x = x_{t_start}, inpainting `state` after
        every change of x. Guidance (Eq. 3): before each step, n_guide_steps times
        x <- x + alpha * Sigma_t * grad J(x, t), skipped for t < t_stopgrad."""
        a, d = self.args, self.diff
        x = d.inpaint(x, state)
        for t in reversed(range(t_start)):
            if guide and a.guide_scale > 0 and t >= a.t_stopgrad:
                x = self.guide(x, state, t)
            with self._autocast():
                x0_hat = self.model(x, torch.full((x.shape[0],), t, device=x.device)).float()
            x = d.step_mean(x0_hat, x, t)
            if t > 0:  # ancestral sampling, no noise at the last step
                x = x + torch.exp(0.5 * d.posterior_log_variance[t]) * torch.randn_like(x)
            x = d.inpaint(x, state)
            if self.on_step is not None:
                self.on_step(x, t)
        return x

    @torch.no_grad()
    def plan(self, obs: torch.Tensor, prev: Optional[torch.Tensor] = None):
        """obs (n, obs_dim) raw -> (best plans (n, H, D) normalized, their values (n,)).
        prev (n, H, D): warm start from these plans instead of pure noise."""
        a, d = self.args, self.diff
        n, P = obs.shape[0], a.n_plans
        s = ((obs - self.mean[self.act_dim:]) / self.std[self.act_dim:]).repeat_interleave(P, 0)  # (n P, obs)
        shape = (n * P, self.model_horizon, self.mean.shape[0])
        if prev is None or a.warm_start_steps == 0:
            x, k = torch.randn(shape, device=self.device), d.T
        else:
            k = a.warm_start_steps
            shifted = torch.cat([prev[:, 1:], prev[:, -1:]], 1)                      # (n, H, D): one step on
            x0 = shifted.repeat_interleave(P, 0)                                     # (n P, H, D)
            x = d.q_sample(x0, torch.full((n * P,), k - 1, device=self.device), torch.randn_like(x0))
        x = self.denoise(x, s, k)
        with self._autocast():
            values = self.value(x, torch.zeros(n * P, device=self.device)).float()  # J(tau, t=0)
        best = values.view(n, P).argmax(1)                                           # (n,)
        plans = x.view(n, P, *shape[1:])[torch.arange(n, device=self.device), best]  # (n, H, D)
        return plans, values.view(n, P).max(1).values

    @property
    def model_horizon(self):
        return self.diff.loss_weights.shape[0]

    def __call__(self, obs):
        if self.n_envs != len(obs):
            self.reset(len(obs))
        idx = np.flatnonzero(self.active)
        act = np.zeros((len(obs), self.act_dim), dtype=np.float32)
        if len(idx) == 0:
            return act
        o = torch.as_tensor(obs[idx], device=self.device)
        prev = None if self.prev is None else self.prev[torch.as_tensor(idx, device=self.device)]
        plans, _ = self.plan(o, prev)
        if self.prev is None:
            self.prev = torch.zeros(len(obs), *plans.shape[1:], device=self.device)
        self.prev[torch.as_tensor(idx, device=self.device)] = plans
        a = plans[:, 0, : self.act_dim] * self.std[: self.act_dim] + self.mean[: self.act_dim]  # first action
        act[idx] = a.cpu().numpy()
        return act


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def build(args: Args, obs_dim: int, act_dim: int, device):
    D = obs_dim + act_dim
    model = TemporalUnet(D, args.dim, args.dim_mults, args.attention).to(device)
    value = ValueNet(args.horizon, D, args.dim, args.dim_mults).to(device)
    diff = Diffusion(args.n_diffusion_steps, act_dim, args.horizon, D, args.action_weight, device)
    return model, value, diff


def copy_model(m: nn.Module) -> nn.Module:
    import copy
    c = copy.deepcopy(m)
    c.requires_grad_(False)
    return c


def run_eval(planner: Planner, args: Args) -> dict:
    t = time.perf_counter()
    res = common.evaluate(planner, args.env, n_episodes=args.eval_episodes, seed=args.seed,
                          max_steps=args.max_episode_steps, progress=True)
    secs = time.perf_counter() - t
    return {"eval/return_mean": float(res["returns"].mean()), "eval/return_std": float(res["returns"].std()),
            "eval/normalized_score": float(np.mean(res["normalized"])), "eval/length_mean": float(res["lengths"].mean()),
            "eval/decisions_per_s": float(res["lengths"].max() / secs), "eval/seconds": secs,
            "eval/returns": res["returns"].tolist()}


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    common.set_seed(args.seed)
    device = common.get_device(args.cuda)
    ckpt = None
    if args.eval_only:
        if not args.checkpoint:
            raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by diffuser.py)")
        ckpt = common.load_checkpoint(args.checkpoint, device, required=("model_ema", "value_ema", "args", "norm"))
    elif args.resume:
        ckpt = common.load_checkpoint(args.resume, device, required=("model", "value", "optimizer", "step", "args"))
    if ckpt is not None:  # the architecture is the checkpoint's; planning flags stay the caller's
        c = ckpt["args"]
        if c["env"] != args.env:
            raise ValueError(f"checkpoint was trained on env {c['env']!r}, not {args.env!r}; pass --env {c['env']}")
        for k in ("horizon", "dim", "dim_mults", "attention", "n_diffusion_steps", "action_weight"):
            setattr(args, k, tuple(c[k]) if k == "dim_mults" else c[k])
    args = resolve_defaults(args)
    obs_dim, act_dim = common.env_dims(args.env)
    logger = common.RunLogger(args, "diffuser", args.run_dir, tensorboard=args.tensorboard, track=args.track)
    model, value, diff = build(args, obs_dim, act_dim, device)
    model_ema, value_ema = copy_model(model), copy_model(value)

    if args.eval_only:
        model_ema.load_state_dict(ckpt["model_ema"])
        value_ema.load_state_dict(ckpt["value_ema"])
        planner = Planner(model_ema.eval(), value_ema.eval(), diff, ckpt["norm"]["mean"], ckpt["norm"]["std"], args, device)
        metrics = run_eval(planner, args)
        logger.log(ckpt["step"], **metrics)
        logger.close()
        print(f"[diffuser] eval-only: return {metrics['eval/return_mean']:.1f}, "
              f"normalized {metrics['eval/normalized_score']:.1f}, {metrics['eval/decisions_per_s']:.2f} decisions/s")
        return metrics

    data = common.load_dataset(args.env, args.dataset, path=args.dataset_path)
    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
        raise ValueError(f"dataset has obs/action sizes {data['observations'].shape[1]}/{data['actions'].shape[1]} "
                         f"but {args.env} has {obs_dim}/{act_dim}; pass the matching --env")
    ds = PlanDataset(data, args.horizon, args.discount, args.termination_penalty, device)
    del data
    opt = torch.optim.Adam(list(model.parameters()) + list(value.parameters()), lr=args.learning_rate)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"]); value.load_state_dict(ckpt["value"])
        model_ema.load_state_dict(ckpt["model_ema"]); value_ema.load_state_dict(ckpt["value_ema"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_rng"]); common.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    n_model = sum(p.numel() for p in model.parameters())
    n_value = sum(p.numel() for p in value.parameters())
    print(f"[diffuser] U-Net {n_model / 1e6:.2f}M params, value net {n_value / 1e6:.2f}M, "
          f"{len(ds.starts)} training windows of H={args.horizon}, device {device}")

    def save(path):
        common.save_checkpoint(path, dict(
            model=model.state_dict(), value=value.state_dict(), model_ema=model_ema.state_dict(),
            value_ema=value_ema.state_dict(), optimizer=opt.state_dict(), step=step, rng=common.rng_state(),
            data_rng=gen.get_state(), norm=dict(mean=ds.mean, std=ds.std), args=vars(args).copy()))

    ckpt_path = logger.dir / "checkpoint.pt"
    planner = Planner(model_ema, value_ema, diff, ds.mean, ds.std, args, device)
    metrics, last_score, last_loss = {}, float("nan"), float("nan")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    bar = tqdm(total=args.total_steps, initial=step, desc="diffuser", unit="step", mininterval=1.0)
    t0, s0 = time.perf_counter(), step
    try:
        while step < args.total_steps:
            x0, target = ds.sample(args.batch_size, gen)
            with amp:
                loss = diff.loss(model, x0)
                train_value = step < args.value_total_steps
                vloss = diff.value_loss(value, x0, target) if train_value else torch.zeros((), device=device)
            opt.zero_grad(set_to_none=True)
            (loss + vloss).backward()  # disjoint parameters: one backward trains both networks
            opt.step()
            step += 1
            if step % args.ema_every == 0:  # official: EMA is a copy until ema_start
                decay = args.ema_decay if step >= args.ema_start else 0.0
                ema_update(model_ema, model, decay)
                ema_update(value_ema, value, decay)
            bar.update(1)
            if step % args.log_every == 0 or step == args.total_steps:
                last_loss = loss.item()
                sps = (step - s0) / (time.perf_counter() - t0)
                logger.log(step, **{"losses/diffusion_loss": last_loss, "losses/value_loss": vloss.item(),
                                    "charts/SPS": sps})
                bar.set_postfix(loss=f"{last_loss:.4f}", vloss=f"{vloss.item():.1f}", score=f"{last_score:.1f}")
            if args.eval_episodes > 0 and (step % args.eval_every == 0 or step == args.total_steps):
                save(ckpt_path)
                metrics = run_eval(planner, args)
                last_score = metrics["eval/normalized_score"]
                logger.log(step, **metrics)
                bar.set_postfix(loss=f"{last_loss:.4f}", score=f"{last_score:.1f}")
                t0, s0 = time.perf_counter(), step
    except KeyboardInterrupt:
        save(ckpt_path)
        print(f"[diffuser] interrupted at step {step}; checkpoint saved to {ckpt_path}")
        raise
    finally:
        bar.close()
    save(ckpt_path)
    logger.close()
    metrics.update({"losses/diffusion_loss": last_loss, "step": step, "checkpoint": str(ckpt_path)})
    return metrics


if __name__ == "__main__":
    main()
