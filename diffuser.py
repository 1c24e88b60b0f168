"""diffuser.py: Diffuser (Janner et al. 2022, arXiv 2205.09991), diffusion planning with guidance.
"Planning with Diffusion for Flexible Behavior Synthesis", ICML 2022; official: jannerm/diffuser.

A plan tau = [(a_0, s_0), ..., (a_{H-1}, s_{H-1})] (H, act + obs) is denoised by a temporal U-Net
(Sec. 3.1, Fig. 2, App. C) under a Gaussian diffusion (T = 20, cosine schedule, the network
predicts x0). To act (Sec. 3.2-3.3) the current state is inpainted into step 0, 64 plans per env
are sampled with value guidance (Eq. 3, a value net J trained on noisy plans), the first action of
the best plan is executed, and the agent replans every step. Defaults are the official config:
H = 32, mults (1,2,4,8) (halfcheetah: H = 4, mults (1,4,8), linear attention); 2 guide steps of
x += scale * posterior variance * grad J with scale 0.1, none below t_stopgrad 2 (halfcheetah-*:
1e-3 and 4; hopper-medium-expert: 1e-4 and 4). As in the official loop (issue #30), and unlike
the paper's Algorithm 1, each step guides first and denoises after; plans are ranked by the value
from the last guide step (J(x_1, 0)).

Deviations, all off by default unless said:
- --warm-start-steps k: the paper's warm start (Sec. 5.4), absent from the official code: the
  previous plan moves one step on, is re-noised to x_k and denoised in k steps instead of T.
- --bf16: autocast for planning and training; README gives its speed and action tolerance.
- Both networks train in one loop (one Adam over disjoint parameters equals two Adams; batch 64
  equals the official 32 x 2 accumulation); the official code trains them in two scripts.
- A last episode without an end flag is kept (closed as a timeout); the official loader drops it.
CPU run (results in README):
  python diffuser.py --dim 16 --total-steps 16000 --lr 5e-4 --ema-every 1 --ema-start 500 \
      --n-plans 4 --eval-episodes 10
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args:
    exp_name: str = "diffuser"
    """name of the experiment (part of the run folder)"""
    seed: int = 0
    """seed of training, of the planning noise and of the evaluation episodes"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (pip install wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (pip install tensorboard)"""
    env: str = "hopper"
    """environment: hopper, halfcheetah, walker2d (a Minari dataset brings its own)"""
    dataset: str = "medium"
    """random, medium, medium-replay, expert, medium-expert, or a Minari id"""
    dataset_path: Optional[str] = None
    """a .npz / D4RL .hdf5 file to train on instead of the named dataset"""
    horizon: Optional[int] = None
    """planning horizon H (default: 4 for halfcheetah, else 32)"""
    dim: int = 32
    """U-Net base channels (App. C)"""
    dim_mults: Optional[tuple[int, ...]] = None
    """channel multipliers per U-Net level (default: (1,4,8) for halfcheetah, else (1,2,4,8))"""
    total_steps: int = 1_000_000
    """gradient steps (the value net stops after 200k, as the official's)"""
    batch_size: int = 64
    """plans per gradient step"""
    lr: float = 2e-4
    """Adam learning rate of both networks"""
    ema_every: int = 10
    """update the EMA weights (used to plan) every this many steps (official 10; CPU runs: 1)"""
    ema_start: int = 2000
    """until this step the EMA is a plain copy of the weights (official 2000; CPU runs: 500)"""
    n_plans: int = 64
    """plans sampled per env per decision; the first action of the best is executed"""
    guide_scale: Optional[float] = None
    """guidance step size alpha (default per dataset: 0.1; halfcheetah 1e-3, hopper-m-e 1e-4)"""
    n_guide_steps: int = 2
    """value-gradient steps per denoising step"""
    t_stopgrad: Optional[int] = None
    """no guidance at denoising steps t < t_stopgrad (default 2; halfcheetah, hopper-m-e 4)"""
    warm_start_steps: int = 0
    """0: full replanning (official); k > 0: warm start, k denoising steps (Sec. 5.4)"""
    eval_every: int = 100_000
    """evaluate (and save) every this many steps, and at the end"""
    eval_episodes: int = 10
    """evaluation episodes, run as one vectorized batch (0: none)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's 1000; capped scores differ)"""
    resume: Optional[str] = None
    """checkpoint to continue training from (its own flags are used)"""
    eval_only: bool = False
    """only evaluate --checkpoint (the model is the checkpoint's, planning flags are these)"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""
    bf16: bool = False
    """bfloat16 autocast of both networks (training and planning)"""


# Official constants (config/locomotion.py, utils/training.py).
N_DIFFUSION_STEPS, ACTION_WEIGHT, TERMINATION_PENALTY = 20, 10.0, -100.0
EMA_DECAY, LOG_EVERY, VALUE_STEPS, DISCOUNT = 0.995, 100, 200_000, 0.997  # gamma of J's targets
# (guide_scale, t_stopgrad) per dataset; None: every dataset of the env. Others: (0.1, 2).
GUIDANCE = {("halfcheetah", None): (1e-3, 4), ("hopper", "medium-expert"): (1e-4, 4)}
# Flags that --eval-only takes from its own command line (the rest is the checkpoint's).
PLANNING = ("seed", "n_plans", "guide_scale", "n_guide_steps", "t_stopgrad", "warm_start_steps",
            "eval_episodes", "eval_max_steps", "bf16")


def resolve(args: Args) -> Args:
    """Per-environment model and per-dataset guidance defaults of the official config; checks."""
    cheetah = args.env == "halfcheetah"
    args.horizon = args.horizon or (4 if cheetah else 32)
    args.dim_mults = tuple(args.dim_mults or ((1, 4, 8) if cheetah else (1, 2, 4, 8)))
    scale, stop = GUIDANCE.get((args.env, None), GUIDANCE.get((args.env, args.dataset), (0.1, 2)))
    args.guide_scale = scale if args.guide_scale is None else args.guide_scale
    args.t_stopgrad = stop if args.t_stopgrad is None else args.t_stopgrad
    down = 2 ** (len(args.dim_mults) - 1)
    if args.horizon % down:
        raise ValueError(f"--horizon {args.horizon} must be a multiple of {down} with "
                         f"{len(args.dim_mults)} U-Net levels; try --horizon {down * 8}")
    if any(args.dim * m % 8 for m in args.dim_mults) or args.dim * args.dim_mults[-1] // 4 % 8:
        raise ValueError(f"--dim {args.dim} x {args.dim_mults} gives channels GroupNorm(8) cannot "
                         f"split; use --dim 16 or 32")
    if not 0 <= args.warm_start_steps <= N_DIFFUSION_STEPS or args.n_plans < 1:
        raise ValueError(f"need --n-plans >= 1 and --warm-start-steps in [0, {N_DIFFUSION_STEPS}]")
    return args


# ---- Data: windows of H steps, per-dimension Gaussian normalizer, value targets (App. C) ----
class PlanDataset:
    """The official SequenceDataset / ValueDataset (use_padding): a window starts at any step
    before an episode's last one (and before max_path_length - H) and may run into zero padding;
    its value target is the discounted return from its start, -100 added to a terminal reward."""

    def __init__(self, data: dict, horizon: int, discount: float, penalty: float, device,
                 max_path_length: int = 1000):
        obs, act = data["observations"], data["actions"]
        self.obs_dim, self.act_dim = obs.shape[1], act.shape[1]
        x = np.concatenate([act, obs], 1).astype(np.float64)          # (N, D): actions first
        self.mean = torch.tensor(x.mean(0), dtype=torch.float32)      # GaussianNormalizer over
        self.std = torch.tensor(x.std(0), dtype=torch.float32).clamp_min(1e-6)  # real steps only
        rows, starts, values, offset = [], [], [], 0
        for ep in common.split_episodes(data):
            L = len(ep["rewards"])
            rew = ep["rewards"].astype(np.float64)
            rew[-1] += penalty if ep["terminals"][-1] else 0.0
            n_start = max(0, min(L - 1, max_path_length - horizon))   # official make_indices
            starts.append(offset + np.arange(n_start))
            values.append(common.returns_to_go(rew, discount)[:n_start])
            rows += [np.concatenate([ep["actions"], ep["observations"]], 1),
                     np.zeros((horizon - 1, x.shape[1]))]               # padding after the end
            offset += L + horizon - 1
        if not sum(map(len, starts)):
            raise ValueError("no episode is longer than one step: Diffuser cannot train on it")
        # flat (sum over episodes of L + H - 1, D): episode e's rows, then H - 1 zero rows, all
        # normalized; window i is flat[starts[i] : starts[i] + H] (H, D).
        self.flat = ((torch.tensor(np.concatenate(rows), dtype=torch.float32) - self.mean)
                     / self.std).to(device)
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)        # (n,)
        self.values = torch.tensor(np.concatenate(values), dtype=torch.float32, device=device)
        self.steps = torch.arange(horizon, device=device)

    def sample(self, batch_size: int, gen: torch.Generator):
        """(x0 (B, H, D) normalized plans, value targets (B,)); indices from a CPU generator."""
        i = torch.randint(len(self.starts), (batch_size,), generator=gen).to(self.starts.device)
        return self.flat[self.starts[i, None] + self.steps], self.values[i]


# ---- Model: temporal U-Net and value net (Sec. 3.1, Fig. 2, App. C; models/temporal.py) ----
class TimeEmbedding(nn.Sequential):
    """Sinusoidal embedding of t -> Linear(dim, 4 dim) -> Mish -> Linear(4 dim, dim)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))
        self.dim = dim

    def forward(self, t):                                                   # t (B,)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        emb = t.float()[:, None] * freqs                                    # (B, dim / 2)
        return super().forward(torch.cat([emb.sin(), emb.cos()], -1))       # (B, dim)


class ConvBlock(nn.Sequential):
    """Conv1d(k=5) -> GroupNorm(8) -> Mish over the time axis."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__(nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(8, cout), nn.Mish())


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks, the time embedding added after the first (Fig. 2), 1x1 conv skip."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.block1, self.block2 = ConvBlock(cin, cout), ConvBlock(cout, cout)
        self.time = nn.Sequential(nn.Mish(), nn.Linear(tdim, cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):                                             # x (B, C, H)
        h = self.block1(x) + self.time(temb)[:, :, None]                    # (B, cout, H)
        return self.block2(h) + self.skip(x)


class LinearAttention(nn.Module):
    """x + LinearAttention(ChannelNorm(x)), the official halfcheetah block: keys softmaxed over
    time, queries scaled by dim_head^-0.5 (no softmax), context = k v^T, out = context^T q."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)                    # over channels, eps 1e-5, gain and bias
        self.qkv = nn.Conv1d(dim, 3 * heads * dim_head, 1, bias=False)
        self.out = nn.Conv1d(heads * dim_head, dim, 1)

    def forward(self, x):                                                   # (B, C, H)
        B, _, H = x.shape
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.qkv(h).view(B, 3, self.heads, -1, H).unbind(1)      # 3 x (B, heads, dh, H)
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(-1), v)         # (B, heads, dh, dh)
        o = torch.einsum("bhde,bhdn->bhen", context, q * self.scale)        # (B, heads, dh, H)
        return x + self.out(o.reshape(B, -1, H))                            # (B, C, H)


def _down(c):
    return nn.Conv1d(c, c, 3, stride=2, padding=1)                          # H -> ceil(H / 2)


class TemporalUnet(nn.Module):
    """x (B, H, act + obs), t (B,) -> predicted clean plan x0 (B, H, act + obs)."""

    def __init__(self, transition_dim: int, dim=32, dim_mults=(1, 2, 4, 8), attention=False):
        super().__init__()
        dims = [transition_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        attn = LinearAttention if attention else (lambda c: nn.Identity())
        self.time = TimeEmbedding(dim)
        self.downs = nn.ModuleList(nn.ModuleList([
            ResidualTemporalBlock(cin, cout, dim), ResidualTemporalBlock(cout, cout, dim),
            attn(cout), nn.Identity() if i == len(in_out) - 1 else _down(cout)])
            for i, (cin, cout) in enumerate(in_out))
        mid = dims[-1]
        self.mid1, self.mid_attn = ResidualTemporalBlock(mid, mid, dim), attn(mid)
        self.mid2 = ResidualTemporalBlock(mid, mid, dim)
        self.ups = nn.ModuleList(nn.ModuleList([
            ResidualTemporalBlock(cout * 2, cin, dim), ResidualTemporalBlock(cin, cin, dim),
            attn(cin), nn.ConvTranspose1d(cin, cin, 4, stride=2, padding=1)])
            for cin, cout in reversed(in_out[1:]))
        self.final = nn.Sequential(ConvBlock(dim, dim), nn.Conv1d(dim, transition_dim, 1))

    def forward(self, x, t):
        temb, x, skips = self.time(t), x.transpose(1, 2), []                # x (B, D, H)
        for b1, b2, attn, down in self.downs:
            x = attn(b2(b1(x, temb), temb))
            skips.append(x)
            x = down(x)                                                     # (B, C, H / 2)
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)
        for b1, b2, attn, up in self.ups:
            x = torch.cat([x, skips.pop()], 1)                              # (B, 2C, h)
            x = up(attn(b2(b1(x, temb), temb)))                             # (B, C', 2h)
        return self.final(x).transpose(1, 2)                                # (B, H, D)


class ValueNet(nn.Module):
    """J(x_t, t): the U-Net's down path (downsampling after every level), two narrowing mid
    blocks, then an MLP on [features, time embedding] -> the plan's return (B,)."""

    def __init__(self, horizon: int, transition_dim: int, dim=32, dim_mults=(1, 2, 4, 8)):
        super().__init__()
        dims = [transition_dim] + [dim * m for m in dim_mults]
        self.time = TimeEmbedding(dim)
        self.blocks = nn.ModuleList(nn.ModuleList([
            ResidualTemporalBlock(cin, cout, dim), ResidualTemporalBlock(cout, cout, dim),
            _down(cout)]) for cin, cout in zip(dims[:-1], dims[1:]))
        mid = dims[-1]
        self.mid1, self.down1 = ResidualTemporalBlock(mid, mid // 2, dim), _down(mid // 2)
        self.mid2, self.down2 = ResidualTemporalBlock(mid // 2, mid // 4, dim), _down(mid // 4)
        fc = mid // 4 * math.ceil(horizon / 2 ** (len(dim_mults) + 2))   # C / 4 x final length
        self.head = nn.Sequential(nn.Linear(fc + dim, fc // 2), nn.Mish(), nn.Linear(fc // 2, 1))

    def forward(self, x, t):
        temb, x = self.time(t), x.transpose(1, 2)                           # x (B, D, H)
        for b1, b2, down in self.blocks:
            x = down(b2(b1(x, temb), temb))
        x = self.down2(self.mid2(self.down1(self.mid1(x, temb)), temb))     # (B, C / 4, h)
        return self.head(torch.cat([x.flatten(1), temb], -1)).squeeze(-1)   # (B,)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters; buffers copied)."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def ema_decay(step: int, every: int, start: int) -> Optional[float]:
    """The official Trainer after update `step` (1, 2, ...): an EMA update every `every`
    updates starting with the first, a plain copy (decay 0) until `start`; None: no update."""
    return None if (step - 1) % every else (EMA_DECAY if step - 1 >= start else 0.0)


# ---- Gaussian diffusion (Sec. 2-3; models/diffusion.py): cosine schedule, x0 prediction ----
class Diffusion:
    """Schedule constants, q(x_t | x_0), inpainting and the two training losses.

    Index convention (as the official code): index t = 0..T-1 stands for x_{t+1}. Denoising step
    t maps x_{t+1} -> x_t; q_sample(x0, t) draws x_{t+1}; Sigma_t is the variance of that step."""

    def __init__(self, T: int, act_dim: int, horizon: int, transition_dim: int, device):
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2   # cosine schedule
        betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)      # (Nichol & Dhariwal Eq. 17), t / T
        acp = np.cumprod(1 - betas)                                   # alpha_bar of x_{t+1}
        prev = np.append(1.0, acp[:-1])                               # alpha_bar of x_t
        var = betas * (1 - prev) / (1 - acp)                          # Sigma_t (DDPM Eq. 7)
        c = dict(betas=betas, alphas_cumprod=acp, sqrt_ab=np.sqrt(acp), sqrt_1m_ab=np.sqrt(1 - acp),
                 posterior_variance=var, posterior_std=np.sqrt(np.maximum(var, 1e-20)),
                 coef_x0=betas * np.sqrt(prev) / (1 - acp),
                 coef_xt=(1 - prev) * np.sqrt(1 - betas) / (1 - acp))
        for k, v in c.items():
            setattr(self, k, torch.tensor(v, dtype=torch.float32, device=device))
        self.T, self.act_dim = T, act_dim
        self.loss_weights = torch.ones(horizon, transition_dim, device=device)     # (H, D)
        self.loss_weights[0, :act_dim] = ACTION_WEIGHT         # the first action weighs x10

    def q_sample(self, x0, t, noise):
        """x_{t+1} = sqrt(ab) x0 + sqrt(1 - ab) noise (DDPM Eq. 4); x0 (B, H, D), t (B,)."""
        return self.sqrt_ab[t][:, None, None] * x0 + self.sqrt_1m_ab[t][:, None, None] * noise

    def inpaint(self, x, state):
        """Condition on the current state (Sec. 3.3): s_0 of every plan <- state (B, obs)."""
        x[:, 0, self.act_dim:] = state
        return x

    def step_mean(self, x0_hat, x, t: int):
        """Posterior mean of x_t given x_{t+1} = x and the predicted x0 (DDPM Eq. 7)."""
        return self.coef_x0[t] * x0_hat + self.coef_xt[t] * x

    def renoise(self, prev, k: int, noise):
        """Warm start (Sec. 5.4): plans (B, H, D) moved one step on (the last step repeated),
        then noised to x_k (index k - 1)."""
        shifted = torch.cat([prev[:, 1:], prev[:, -1:]], 1)
        return self.q_sample(shifted, torch.full((len(prev),), k - 1, device=prev.device), noise)

    def noisy(self, x0):
        """(x_{t+1} inpainted with x0's state, t) for t ~ U{0..T-1}: the input of both losses."""
        t = torch.randint(0, self.T, (len(x0),), device=x0.device)
        return self.inpaint(self.q_sample(x0, t, torch.randn_like(x0)), x0[:, 0, self.act_dim:]), t

    def loss(self, model, x0):
        """Weighted L2 between the inpainted prediction and the clean plan x0 (Sec. 3.1)."""
        x0_hat = self.inpaint(model(*self.noisy(x0)).float(), x0[:, 0, self.act_dim:])
        return ((x0_hat - x0) ** 2 * self.loss_weights).mean()

    def value_loss(self, value, x0, target):
        """MSE of J(x_{t+1}, t) against the plan's discounted return (Sec. 3.2)."""
        return F.mse_loss(value(*self.noisy(x0)).float(), target)


# ---- Planner: guided, inpainted sampling of all envs' plans in one batch (Sec. 3.2-3.3, 5.4) ----
class Planner:
    """policy(obs (n, obs_dim)) -> actions (n, act_dim): the first action of the best of n_plans
    plans per running env, all denoised as one batch (n_running * n_plans, H, D)."""

    def __init__(self, model, value, diffusion: Diffusion, mean, std, args: Args, device):
        self.model, self.value, self.diff, self.args = model, value, diffusion, args
        self.mean, self.std = (torch.as_tensor(v, device=device).float() for v in (mean, std))
        self.device, self.act_dim = torch.device(device), diffusion.act_dim
        self.gen = torch.Generator(self.device)
        self.on_step = None                # test hook: on_step(x, t) after every denoising step
        self.reset(0)

    def reset(self, n: int):
        self.gen.manual_seed(self.args.seed)       # every evaluation draws the same plan noise
        self.active, self.prev = np.ones(n, dtype=bool), None   # prev (n, H, D): last plans

    def observe(self, rewards, dones):
        self.active &= ~np.asarray(dones, dtype=bool)

    def net(self, net, x, t: int):
        """net(x (B, H, D), t) in fp32, or under bf16 autocast; the output is fp32."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.bf16):
            return net(x, torch.full((len(x),), t, device=x.device)).float()

    def value_grad(self, x, t: int):
        """(J(x, t) (B,), dJ/dx (B, H, D))."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = self.net(self.value, x, t)
            return y.detach(), torch.autograd.grad(y.sum(), x)[0]

    def guide(self, x, state, t: int):
        """Eq. 3 as the official n_step_guided_p_sample: n_guide_steps times x <- x + alpha
        Sigma_t grad J(x, t), state re-inpainted; none for t < t_stopgrad. Returns x and J of
        the last guide step (evaluated before its update), or None if there was none."""
        a, y = self.args, None
        if a.guide_scale == 0 or t < a.t_stopgrad:     # the official gradient is zero here
            return x, None
        for _ in range(a.n_guide_steps):
            y, g = self.value_grad(x, t)
            x = self.diff.inpaint(x + a.guide_scale * self.diff.posterior_variance[t] * g, state)
        return x, y

    def denoise(self, x, state, t_start: int):
        """x_{t_start} -> x_0: at t = t_start - 1 .. 0 guide, then x_t ~ p(x_t | x_{t+1})
        (ancestral, no noise at t = 0), state inpainted after every change of x. Returns x_0
        and the official ranking values: J from the guide step at t = 0, i.e. J(x_1, 0)."""
        d = self.diff
        x = d.inpaint(x, state)
        for t in reversed(range(t_start)):
            x, y = self.guide(x, state, t)
            if t == 0 and y is None:       # unguided last step: the official code still has J
                y = self.net(self.value, x, 0)
            x = d.step_mean(self.net(self.model, x, t), x, t)
            if t > 0:
                x = x + d.posterior_std[t] * torch.randn(x.shape, generator=self.gen,
                                                         device=x.device)
            x = d.inpaint(x, state)
            if self.on_step is not None:
                self.on_step(x, t)
        return x, y

    @torch.no_grad()
    def plan(self, obs: torch.Tensor, prev: Optional[torch.Tensor] = None):
        """obs (n, obs_dim) raw -> (best plans (n, H, D) normalized, their values (n,)); with
        prev (n, H, D) and warm_start_steps k > 0 start from prev re-noised to x_k."""
        a, d, P = self.args, self.diff, self.args.n_plans
        n, (H, D) = len(obs), d.loss_weights.shape
        state = ((obs - self.mean[self.act_dim:]) / self.std[self.act_dim:]).repeat_interleave(P, 0)
        noise = torch.randn((n * P, H, D), generator=self.gen, device=self.device)
        warm = prev is not None and a.warm_start_steps > 0
        k = a.warm_start_steps if warm else d.T
        x = d.renoise(prev.repeat_interleave(P, 0), k, noise) if warm else noise   # x_k
        x, values = self.denoise(x, state, k)
        values, best = values.view(n, P).max(1)         # official sort_by_values: the highest
        return x.view(n, P, H, D)[torch.arange(n, device=x.device), best], values

    def __call__(self, obs):
        if len(self.active) != len(obs):
            self.reset(len(obs))
        act = np.zeros((len(obs), self.act_dim), dtype=np.float32)
        if not self.active.any():
            return act
        idx = torch.as_tensor(np.flatnonzero(self.active), device=self.device)
        o = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)[idx]
        plans, _ = self.plan(o, None if self.prev is None else self.prev[idx])
        if self.prev is None:
            self.prev = plans.new_zeros(len(obs), *plans.shape[1:])
        self.prev[idx] = plans
        first = plans[:, 0, :self.act_dim] * self.std[:self.act_dim] + self.mean[:self.act_dim]
        act[idx.cpu().numpy()] = first.cpu().numpy()                # the one host copy
        return act


# ---- Building, loading, evaluating, training ----
def build(args: Args, obs_dim: int, act_dim: int, device):
    D = obs_dim + act_dim
    model = TemporalUnet(D, args.dim, args.dim_mults, args.env == "halfcheetah").to(device)
    value = ValueNet(args.horizon, D, args.dim, args.dim_mults).to(device)
    return model, value, Diffusion(N_DIFFUSION_STEPS, act_dim, args.horizon, D, device)


def load_policy(path, device="cpu", **planning) -> Planner:
    """A batched planning policy (the EMA networks) from a checkpoint; `planning` overrides
    fields of its args named in PLANNING (e.g. n_plans=8, warm_start_steps=5)."""
    ckpt = common.load_checkpoint(path, "diffuser")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    if bad := set(planning) - set(PLANNING):
        raise ValueError(f"load_policy overrides only {PLANNING}, not {sorted(bad)}")
    args = resolve(dataclasses.replace(args, **planning))
    model, value, diff = build(args, ckpt["obs_dim"], ckpt["act_dim"], device)
    model.load_state_dict(ckpt["model_ema"])
    value.load_state_dict(ckpt["value_ema"])
    nets = (m.eval().requires_grad_(False) for m in (model, value))
    return Planner(*nets, diff, ckpt["mean"], ckpt["std"], args, device)


def run_eval(planner: Planner, args: Args) -> dict:
    t0 = time.perf_counter()
    res = common.evaluate(planner, args.env, args.eval_episodes, args.seed, args.eval_max_steps,
                          dataset=args.dataset)
    secs = time.perf_counter() - t0
    return {"eval/return_mean": res["returns"].mean(), "eval/return_std": res["returns"].std(),
            "eval/normalized_score": res["normalized"].mean(), "eval/length_mean":
            res["lengths"].mean(), "eval/env_steps_per_s": res["lengths"].sum() / secs,
            "eval/vector_steps_per_s": res["lengths"].max() / secs}  # one decision for all envs


def resume_args(args: Args) -> Args:
    """--resume: the run's own flags, except for how long to run and evaluate."""
    keep = ("resume", "total_steps", "eval_every", "eval_episodes", "eval_max_steps", "cuda")
    ckpt = common.load_checkpoint(args.resume, "diffuser")["args"]
    return dataclasses.replace(args, **{k: v for k, v in ckpt.items() if k not in keep})


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    common.set_seed(args.seed)
    device = common.get_device(args.cuda)
    if args.eval_only:
        if not args.checkpoint:
            raise ValueError("--eval-only needs --checkpoint runs/<run>/checkpoint.pt")
        policy = load_policy(args.checkpoint, device, **{k: getattr(args, k) for k in PLANNING})
        metrics = run_eval(policy, policy.args)
        print(f"[diffuser] {policy.args.env}: return {metrics['eval/return_mean']:.1f}, "
              f"normalized {metrics['eval/normalized_score']:.1f}")
        return metrics
    args = resume_args(args) if args.resume else args
    data = common.load_dataset(args.env, args.dataset, path=args.dataset_path)
    args.env = data.env
    args = resolve(args)
    ds = PlanDataset(data, args.horizon, DISCOUNT, TERMINATION_PENALTY, device)
    model, value, diff = build(args, ds.obs_dim, ds.act_dim, device)
    model_ema, value_ema = (copy.deepcopy(m).requires_grad_(False) for m in (model, value))
    opt = torch.optim.Adam([*model.parameters(), *value.parameters()], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)                  # window sampler
    run = common.Run(args, "diffuser", extra=dict(mean=ds.mean, std=ds.std, obs_dim=ds.obs_dim,
                     act_dim=ds.act_dim), model=model, value=value, model_ema=model_ema,
                     value_ema=value_ema, optimizer=opt, sampler=gen)
    planner = Planner(model_ema, value_ema, diff, ds.mean, ds.std, args, device)
    print(f"[diffuser] U-Net {sum(p.numel() for p in model.parameters()):,} parameters, value "
          f"net {sum(p.numel() for p in value.parameters()):,}, {len(ds.starts)} windows")
    metrics, amp = {}, dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for step in run.loop(args.total_steps):
        x0, target = ds.sample(args.batch_size, gen)                 # (B, H, D), (B,)
        with torch.autocast(**amp):
            loss = diff.loss(model, x0)                              # Sec. 3.1
            vloss = diff.value_loss(value, x0, target) if step <= VALUE_STEPS else 0  # 200k
        opt.zero_grad(set_to_none=True)
        (loss + vloss).backward()            # disjoint parameters: one backward trains both
        opt.step()
        if (decay := ema_decay(step, args.ema_every, args.ema_start)) is not None:
            ema_update(model_ema, model, decay)
            ema_update(value_ema, value, decay)
        if run.every(LOG_EVERY):
            run.log(**{"losses/diffusion_loss": loss, "losses/value_loss": vloss})
        if args.eval_episodes > 0 and run.every(args.eval_every):
            run.log(**(metrics := run_eval(planner, args)))
            run.save()
    run.finish()
    return metrics


if __name__ == "__main__":
    main()
