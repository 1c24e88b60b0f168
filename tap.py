"""TAP: Trajectory Autoencoding Planner (Jiang et al. 2022, "Efficient Planning in a Compact
Latent Action Space", arXiv 2208.10291).

What this file reproduces
  1. Data: every step is the vector [s, a, r, R, done], z-scored; R is the Trajectory Transformer
     value target (discounted reward-to-go from the next step, gamma 0.99, reward at a true
     terminal replaced by -100). Training samples are 24-step chunks; steps past the end of an
     episode are padding (done = 1, no reconstruction loss).
  2. A state-conditional VQ-VAE (paper, method section): a causal transformer encoder,
     max-pooled every L = 3 steps (8 latent codes per chunk), a codebook of K = 512 vectors updated by
     exponential moving averages (decay 0.99), straight-through gradients. The decoder gets
     (current state, codes), repeats each code L times, and decodes causally, so a prefix of
     codes decodes into a prefix of the trajectory. Loss: weighted MSE (action x5) + BCE on
     done + commitment.
  3. An autoregressive transformer prior over the codes of the frozen encoder, conditioned on
     the current state (state embedding added at every position) (paper, method: prior).
  4. Planning (paper, method: planning): beam search in latent space over H / L codes (H = 15 -> 5
     codes), beam 64 x expand 4, candidate codes sampled from the prior, every prefix decoded
     and scored by
         objective = sum_t gamma^t r_t + gamma^T R_{T-1}
                     + 500 * min(log p_prior(z_1..z_k), (H / L) * log 0.05).
     The clamp is a cap: every plan whose joint prior log-likelihood is above the threshold
     (on average 0.05 per code) gets the same bonus, so among plausible plans the predicted
     return decides; less likely plans lose 500 per nat below it. This is the official
     code's `beam_with_prior` (clamp(acc_logp, -1e5, log(threshold) * steps // latent_step),
     the cap uses the number of codes of the full plan at every search depth). The first
     action of the best plan is executed and the agent replans every step. Prefixes are
     extended with key-value caches (prior and decoder are causal), so each search depth costs
     one prior token per beam and L decoder steps per candidate; tests check the result equals
     the official re-decoding of every prefix. Prior sampling
     (`--planner sample`: sample full code sequences from the prior, keep the best) is the
     paper's alternative. Both are batched over all evaluation episodes at once.

Defaults follow the official code (github.com/ZhengyaoJiang/latentplan, config/vqvae.py):
VQ-VAE transformer width 128 with 512-d codes, prior width 512 (n_embd * n_head), 4 layers,
4 heads, dropout 0.1, AdamW lr 2e-4 (constant) betas (0.9, 0.95) weight decay 0.1, grad clip 1,
batch 512. (The 512 often quoted as "the width" is the code / prior width; the official VQ-VAE
transformer is 128 wide.) As in the official code, the reward column is z-scored with the
statistics of the rewards before the -100 terminal penalty, so a terminal reward stands out.

Named deviations
  - Scoring uses the plain discounted sum sum_{t<T} gamma^t r_t + gamma^T R_{T-1} (R excludes
    r_t, as in TT); the official code drops r_{T-1} and multiplies by one extra gamma. The
    ranking differs only through the last reward.
  - Training length is counted in gradient steps (--total-steps for the VQ-VAE, --prior-steps
    for the prior) instead of epochs (official: 50 epochs of a 1M dataset ~ 100k steps).
  - The official causal mask also hides every (obs+act+2)-th position, a leftover of TT's
    value masking that has no meaning for 24-step chunks; we use a plain causal mask.
  - Datasets are generated offline (see common.py), so scores are "D4RL-normalized".

Quick run (CPU, one thread; measured on a shared 2-core machine: 11.7 + 7.2 min of training,
1.5 and 0.8 min for the 5-episode evaluations): a small model trained 3000 VQ-VAE / 2000 prior steps, then
resumed to 6000 / 4000 steps; hopper/medium D4RL-normalized 28.8 after the first command and
32.5 after the second (dataset mean 31.0), 5 episodes each:
    python tap.py --env hopper --n-embd 64 --code-dim 64 --n-layer 2 --prior-n-embd 128 \
        --prior-n-layer 2 --batch-size 64 --lr 1e-3 --total-steps 3000 --prior-steps 2000 \
        --beam-width 32 --eval-episodes 5 --no-cuda --run-dir runs/hopper__tap_cpu__0
    python tap.py ...same flags... --total-steps 6000 --prior-steps 4000 \
        --resume runs/hopper__tap_cpu__0/checkpoint.pt --run-dir runs/hopper__tap_cpu__0_resume
Full run (GPU):  python tap.py --env hopper
One stage only:  python tap.py --stage vqvae;  python tap.py --stage prior --checkpoint RUN/checkpoint.pt
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional
    tqdm = common.tqdm


@dataclass
class Args:
    exp_name: str = "tap"
    """name of this experiment (part of the run folder name)"""
    seed: int = 0
    """random seed"""
    cuda: bool = True
    """use the GPU when one is available"""
    track: bool = False
    """log to Weights & Biases"""
    tensorboard: bool = False
    """log to TensorBoard"""
    env: str = "hopper"
    """environment: hopper, halfcheetah or walker2d"""
    dataset: str = "medium"
    """D4RL-style dataset name (random, medium, medium-replay, expert, medium-expert)"""
    dataset_path: Optional[str] = None
    """read the dataset from this .npz / .hdf5 file instead"""
    stage: str = "both"
    """what to train: vqvae, prior, or both (prior alone needs --checkpoint or --resume with a VQ-VAE)"""
    total_steps: int = 100_000
    """VQ-VAE gradient steps (official: 50 epochs of a 1M-transition dataset at batch 512)"""
    prior_steps: int = 100_000
    """prior gradient steps"""
    eval_every: int = 0
    """evaluate every this many prior steps (0: only at the end)"""
    eval_episodes: int = 10
    """evaluation episodes (run at once, vectorized)"""
    max_episode_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's limit)"""
    log_every: int = 100
    """log losses every this many steps"""
    resume: Optional[str] = None
    """checkpoint to continue training from"""
    eval_only: bool = False
    """only evaluate --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate (--eval-only) or whose VQ-VAE --stage prior uses"""
    bf16: bool = False
    """bfloat16 autocast for forward passes"""
    run_dir: Optional[str] = None
    """run folder (default runs/{env}__{exp_name}__{seed}__{time})"""
    # data (official config/vqvae.py)
    seq_len: int = 24
    """steps per training chunk (official subsampled_sequence_length 25 -> 24 input steps)"""
    discount: float = 0.99
    """discount of the value target R and of the planning objective"""
    termination_penalty: float = -100.0
    """reward that replaces the reward of a true terminal step (as in TT)"""
    # VQ-VAE
    latent_step: int = 3
    """L: steps per latent code (max-pool window)"""
    n_codes: int = 512
    """K: codebook size"""
    code_dim: int = 512
    """dimension of a codebook vector (official trajectory_embd)"""
    ema_decay: float = 0.99
    """decay of the EMA codebook updates"""
    n_layer: int = 4
    """encoder and decoder layers each"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 128
    """VQ-VAE transformer width"""
    dropout: float = 0.1
    """dropout of embeddings, attention and residual branches"""
    action_weight: float = 5.0
    """MSE weight of action dimensions (others 1)"""
    commit_weight: float = 1.0
    """weight of the commitment loss ||z_e - sg(z_q)||^2"""
    # prior
    prior_n_layer: int = 4
    """prior transformer layers"""
    prior_n_embd: int = 512
    """prior transformer width (official n_embd * n_head)"""
    # optimisation
    batch_size: int = 512
    """batch size (chunks)"""
    lr: float = 2e-4
    """AdamW learning rate (constant, as the official lr_decay=False)"""
    weight_decay: float = 0.1
    """AdamW weight decay on matmul weights"""
    grad_clip: float = 1.0
    """gradient norm clip"""
    # planning
    planner: str = "beam"
    """beam (beam search with the prior) or sample (best of prior samples)"""
    horizon: int = 15
    """planning horizon H in steps (H / L codes)"""
    beam_width: int = 64
    """beams kept per search depth"""
    n_expand: int = 4
    """codes sampled from the prior per beam"""
    prob_threshold: float = 0.05
    """per-code probability threshold of the likelihood cap"""
    prob_weight: float = 500.0
    """weight of the clamped prior log-likelihood in the objective"""
    n_samples: int = 4096
    """plans sampled per decision by --planner sample"""


ARCH = ("seq_len", "latent_step", "n_codes", "code_dim", "n_layer", "n_head", "n_embd", "dropout",
        "prior_n_layer", "prior_n_embd", "discount", "termination_penalty")


# --------------------------------------------------------------------------------------
# Data: [s, a, r, R, done] chunks
# --------------------------------------------------------------------------------------
class ChunkData:
    """All episodes z-scored and laid end to end on the device, each followed by seq_len - 1
    padding rows, so that a chunk is one slice starting at any step of an episode."""

    def __init__(self, data: dict, args: Args, device: torch.device, stats: Optional[dict] = None):
        obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
        rows, dones, starts, pos = [], [], [], 0
        raw_rewards = data["rewards"].astype(np.float64)
        for ep in common.split_episodes(data):
            r = ep["rewards"].astype(np.float64).copy()
            if ep["terminals"][-1]:
                r[-1] = args.termination_penalty  # TT: reward at a true terminal -> -100
            rtg = common.returns_to_go(r, args.discount)
            value = np.append(rtg[1:], 0.0)  # R_t = sum_k gamma^k r_{t+1+k}, excludes r_t (TT)
            n = len(r)
            rows.append(np.concatenate([ep["observations"], ep["actions"], r[:, None], value[:, None]], 1))
            rows.append(np.full((args.seq_len - 1, rows[-1].shape[1]), np.nan))  # padding, filled below
            dones.append(np.r_[np.zeros(n), np.ones(args.seq_len - 1)])
            starts.append(pos + np.arange(max(n - 1, 1)))  # official: every start but the last step
            pos += n + args.seq_len - 1
        joined = np.concatenate(rows)  # (N + pad, obs + act + 2)
        valid = ~np.isnan(joined[:, 0])
        if stats is None:  # reward statistics before the penalty, as the official code
            mean, std = joined[valid].mean(0), joined[valid].std(0)
            mean[-2], std[-2] = raw_rewards.mean(), raw_rewards.std()
            stats = dict(mean=mean.astype(np.float32), std=np.maximum(std, 1e-6).astype(np.float32),
                         obs_dim=obs_dim, act_dim=act_dim)
        joined = (joined - stats["mean"]) / stats["std"]
        joined[~valid] = (0.0 - stats["mean"]) / stats["std"]  # padding = normalized zero vector (official)
        self.stats, self.obs_dim, self.act_dim = stats, obs_dim, act_dim
        self.joined = torch.as_tensor(joined, dtype=torch.float32, device=device)
        self.done = torch.as_tensor(np.concatenate(dones), dtype=torch.float32, device=device)
        self.starts = torch.as_tensor(np.concatenate(starts), dtype=torch.long, device=device)
        self.offsets = torch.arange(args.seq_len, device=device)

    def sample(self, batch_size: int, gen: torch.Generator):
        """x (B, T, obs+act+2+1) with done as the last column; mask (B, T) of real steps."""
        i = torch.randint(len(self.starts), (batch_size,), device=self.starts.device, generator=gen)
        idx = self.starts[i, None] + self.offsets  # (B, T)
        done = self.done[idx]  # (B, T)
        return torch.cat([self.joined[idx], done[..., None]], -1), 1.0 - done


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LayerNorm causal transformer block on SDPA."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)
        return x + self.mlp(self.ln2(x))

    def cached(self, x, past=None):
        """Inference on new positions x (B, T, C) after cached keys / values past = (k, v) of
        (B, h, P, C/h): returns (output, (k, v) of all P + T positions). Same result as forward()."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, h, P+T, C/h)
        P = k.shape[2] - T
        mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)  # new step i sees 0..P+i
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x)), (k, v)


class EMACodebook(nn.Module):
    """VQ codebook with EMA updates (van den Oord et al. 2017, App. A.1; TAP Sec. 3.1)."""

    def __init__(self, K: int, D: int, decay: float):
        super().__init__()
        self.decay = decay
        emb = torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K)
        self.register_buffer("embedding", emb)
        self.register_buffer("ema_count", torch.ones(K))
        self.register_buffer("ema_w", emb.clone())

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def indices(self, z):  # (..., D) -> (...) nearest code
        flat = z.float().reshape(-1, z.shape[-1])
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embedding.t() + self.embedding.pow(2).sum(1)
        return d.argmin(1).view(z.shape[:-1])

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z_e):
        """z_e (B, M, D) -> (straight-through z_q, z_q, indices); EMA update in training mode."""
        z_e = z_e.float()  # distances and EMA statistics in fp32, also under --bf16
        idx = self.indices(z_e.detach())
        z_q = self.embedding[idx]  # (B, M, D)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx.reshape(-1), self.embedding.shape[0]).type_as(z_e)  # (B*M, K)
                self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.ema_w.mul_(self.decay).add_(onehot.t() @ z_e.detach().reshape(-1, z_e.shape[-1]), alpha=1 - self.decay)
                self.embedding.copy_(self.ema_w / self.ema_count[:, None])
        z_st = z_e + (z_q - z_e).detach()  # straight-through estimator: d z_st / d z_e = I
        return z_st, z_q, idx


class VQVAE(nn.Module):
    """State-conditional VQ-VAE over [s, a, r, R, done] chunks (paper, method section)."""

    def __init__(self, obs_dim: int, act_dim: int, a: Args):
        super().__init__()
        self.obs_dim, self.act_dim, self.L = obs_dim, act_dim, a.latent_step
        self.D = obs_dim + act_dim + 3  # s, a, r, R, done
        self.embed = nn.Linear(self.D, a.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, a.seq_len, a.n_embd))  # shared by encoder and decoder (official)
        self.drop = nn.Dropout(a.dropout)
        self.encoder = nn.Sequential(*[Block(a.n_embd, a.n_head, a.dropout) for _ in range(a.n_layer)])
        self.cast = nn.Linear(a.n_embd, a.code_dim)
        self.codebook = EMACodebook(a.n_codes, a.code_dim, a.ema_decay)
        self.latent_mixing = nn.Linear(a.code_dim + obs_dim, a.n_embd)
        self.decoder = nn.Sequential(*[Block(a.n_embd, a.n_head, a.dropout) for _ in range(a.n_layer)])
        self.ln_f = nn.LayerNorm(a.n_embd)
        self.predict = nn.Linear(a.n_embd, self.D)
        self.apply(_init_weights)

    def encode(self, x):
        """x (B, T, D) -> continuous features z_e (B, T/L, code_dim). Causal: code j sees steps < (j+1) L."""
        h = self.drop(self.embed(x) + self.pos_emb[:, : x.shape[1]])  # (B, T, C)
        h = self.encoder(h)
        h = F.max_pool1d(h.transpose(1, 2), self.L, self.L).transpose(1, 2)  # (B, T/L, C)
        return self.cast(h)

    def decode(self, z, state):
        """z (B, M, code_dim), state (B, obs) -> (B, M*L, D) with done as a logit. Causal in the codes."""
        B, M, _ = z.shape
        h = self.latent_mixing(torch.cat([state[:, None].expand(B, M, -1), z], -1))  # (B, M, C)
        h = h.repeat_interleave(self.L, 1)  # (B, M*L, C): each code covers L steps
        h = self.decoder(self.drop(h + self.pos_emb[:, : h.shape[1]]))
        out = self.predict(self.ln_f(h))  # (B, M*L, D)
        return torch.cat([out[..., : self.obs_dim] + state[:, None], out[..., self.obs_dim:]], -1)  # states relative to s_0 (official)

    @torch.no_grad()
    def decode_next(self, z, state, past=None):
        """Decode one more code with a key-value cache: z (B, code_dim) is code number
        len(past) / L -> (B, L, D) with done as a probability, and the extended cache. Equal to
        the matching L steps of decode_codes (the decoder is causal), at the cost of L positions."""
        P = 0 if past is None else past[0][0].shape[2]
        h = self.latent_mixing(torch.cat([state, z], -1))[:, None].expand(-1, self.L, -1)  # (B, L, C)
        h = h + self.pos_emb[:, P: P + self.L]
        new = []
        for i, blk in enumerate(self.decoder):
            h, kv = blk.cached(h, None if past is None else past[i])
            new.append(kv)
        out = self.predict(self.ln_f(h))  # (B, L, D)
        out = torch.cat([out[..., : self.obs_dim] + state[:, None], out[..., self.obs_dim: -1],
                         torch.sigmoid(out[..., -1:])], -1)
        return out, new

    def decode_codes(self, idx, state):
        """idx (B, M) code indices -> (B, M*L, D) with done as a probability."""
        out = self.decode(self.codebook.embedding[idx], state)
        return torch.cat([out[..., :-1], torch.sigmoid(out[..., -1:])], -1)

    def forward(self, x, mask, action_weight: float):
        """Reconstruction + BCE + commitment losses of a batch (paper, method: state-conditional VQ-VAE)."""
        z_e = self.encode(x)
        z_st, z_q, idx = self.codebook(z_e)
        out = self.decode(z_st, x[:, 0, : self.obs_dim])
        w = torch.ones(self.D - 1, device=x.device)
        w[self.obs_dim: self.obs_dim + self.act_dim] = action_weight  # action x5
        mse = ((out[..., :-1] - x[..., :-1]).pow(2) * w * mask[..., None]).mean()  # padding steps excluded
        bce = F.binary_cross_entropy_with_logits(out[..., -1], x[..., -1])
        commit = F.mse_loss(z_e, z_q.detach())
        return mse, bce, commit, idx


class Prior(nn.Module):
    """Autoregressive transformer over codes, p(z_j | z_<j, s_0) (paper, method: prior)."""

    def __init__(self, obs_dim: int, a: Args):
        super().__init__()
        d = a.prior_n_embd
        self.tok_emb = nn.Embedding(a.n_codes, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, a.seq_len // a.latent_step, d))
        self.state_emb = nn.Linear(obs_dim, d)
        self.drop = nn.Dropout(a.dropout)
        self.blocks = nn.Sequential(*[Block(d, a.n_head, a.dropout) for _ in range(a.prior_n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, a.n_codes, bias=False)
        self.apply(_init_weights)

    def forward(self, idx, state):
        """idx (B, t) codes so far (t may be 0), state (B, obs) -> logits (B, t+1, K)."""
        B, t = idx.shape
        tok = torch.cat([torch.zeros(B, 1, self.tok_emb.embedding_dim, device=state.device),
                         self.tok_emb(idx)], 1)  # (B, t+1, d): a zero start token, then the codes
        h = self.drop(tok + self.pos_emb[:, : t + 1] + self.state_emb(state)[:, None])  # state added at every position
        return self.head(self.ln_f(self.blocks(h)))

    @torch.no_grad()
    def next_logits(self, idx, state, past=None):
        """Key-value-cached forward: idx (B,) the newest code (None at the start) -> logits of the
        next code (B, K) and the extended cache. Equal to forward(...)[:, -1]."""
        P = 0 if past is None else past[0][0].shape[2]
        tok = self.tok_emb(idx) if idx is not None else torch.zeros(state.shape[0], self.tok_emb.embedding_dim,
                                                                      device=state.device)
        h = (tok + self.pos_emb[0, P] + self.state_emb(state))[:, None]  # (B, 1, d)
        new = []
        for i, blk in enumerate(self.blocks):
            h, kv = blk.cached(h, None if past is None else past[i])
            new.append(kv)
        return self.head(self.ln_f(h))[:, 0], new


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def make_optimizer(model: nn.Module, a: Args):
    """AdamW, weight decay on matmul weights only (official configure_optimizers)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_emb" not in n and "tok_emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_emb" not in n and "tok_emb" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))


# --------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------
def rewards_values(pred, stats):
    """Denormalized rewards r_t and values R_t (N, T) of decoded steps pred (N, T, D)."""
    r = pred[..., -3] * stats["std"][-2] + stats["mean"][-2]
    v = pred[..., -2] * stats["std"][-1] + stats["mean"][-1]
    return r, v


def likelihood_bonus(logp, n_codes_plan: int, threshold: float, weight: float):
    """weight * min(log p(z), n_codes_plan * log threshold) (official beam_with_prior): a cap, so
    plans above the threshold tie on it and are ranked by return; less likely plans are penalized."""
    return weight * torch.clamp(logp, max=n_codes_plan * math.log(threshold))


def plan_objective(pred, logp, stats, discount: float, n_codes_plan: int, threshold: float, weight: float):
    """pred (N, T, D) normalized decoded steps, logp (N,) joint prior log-prob -> objective (N,)
    = sum_{t<T} gamma^t r_t + gamma^T R_{T-1} + likelihood bonus (paper, method: planning)."""
    r, v = rewards_values(pred, stats)
    T = pred.shape[1]
    disc = discount ** torch.arange(T, device=pred.device, dtype=pred.dtype)
    return (r * disc).sum(1) + discount ** T * v[:, -1] + likelihood_bonus(logp, n_codes_plan, threshold, weight)


def _take(cache, rows):
    """Select rows of a per-layer list of (k, v) caches."""
    return [(k[rows], v[rows]) for k, v in cache]


class Planner:
    """Batched latent-space planner (paper, method: planning); call it on (E, obs) raw observations."""

    def __init__(self, vqvae: VQVAE, prior: Prior, stats: dict, a: Args, act_low, act_high, device):
        self.vqvae, self.prior, self.a, self.device = vqvae.eval(), prior.eval(), a, device
        self.stats = {k: torch.as_tensor(stats[k], device=device) for k in ("mean", "std")}
        self.obs_dim, self.act_dim = vqvae.obs_dim, vqvae.act_dim
        self.n_plan = a.horizon // a.latent_step  # H / L codes
        if self.n_plan < 1 or self.n_plan > a.seq_len // a.latent_step:
            raise ValueError(f"--horizon {a.horizon} gives {self.n_plan} codes; use a horizon between "
                             f"{a.latent_step} and {a.seq_len} (the chunk length)")
        self.low = torch.as_tensor(act_low, dtype=torch.float32, device=device)
        self.high = torch.as_tensor(act_high, dtype=torch.float32, device=device)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(a.seed)

    def _draw(self, logits, n):
        """n codes per row from softmax(logits) (N, K) -> codes (N, n), log-probs (N, n)."""
        logp_all = F.log_softmax(logits.float(), -1)
        codes = torch.multinomial(logp_all.exp(), n, replacement=True, generator=self.gen)
        return codes, logp_all.gather(1, codes)

    @torch.no_grad()
    def beam(self, s):
        """s (E, obs) normalized -> first decoded step (E, D) of the best plan.

        The official beam_with_prior: at depth k every beam draws n_expand codes from the prior
        (beam_width * n_expand at k = 0), every candidate prefix is decoded and scored, the best
        beam_width per state survive, and the best single plan at the last depth. Because the
        prior and the decoder are causal, a candidate only computes its new code (prior) and its
        L new steps (decoder) on top of its parent's key-value caches; the result is the same as
        re-decoding every prefix from scratch (see tests/test_tap.py)."""
        a, E, L, dev = self.a, s.shape[0], self.vqvae.L, s.device
        logits, p_cache = self.prior.next_logits(None, s)  # (E, K): p(z_1 | s_0)
        d_cache, n_beam = None, 1
        ret, logp = torch.zeros(E, device=dev), torch.zeros(E, device=dev)
        for k in range(self.n_plan):
            n = a.beam_width * a.n_expand if k == 0 else a.n_expand
            codes, lp = self._draw(logits, n)  # (E*n_beam, n)
            parent = torch.arange(E * n_beam, device=dev).repeat_interleave(n)  # candidate -> its beam
            codes, logp_c = codes.reshape(-1), logp[parent] + lp.reshape(-1)  # (E*n_beam*n,)
            st = s.repeat_interleave(n_beam * n, 0)  # (E*n_beam*n, obs)
            out, d_new = self.vqvae.decode_next(self.vqvae.codebook.embedding[codes], st,
                                                None if d_cache is None else _take(d_cache, parent))
            r, v = rewards_values(out.float(), self.stats)  # (N, L) steps k*L .. k*L+L-1
            disc = a.discount ** torch.arange(k * L, (k + 1) * L, device=dev, dtype=r.dtype)
            ret_c = ret[parent] + (r * disc).sum(1)  # sum_{t<T} gamma^t r_t, T = (k+1) L
            score = ret_c + a.discount ** ((k + 1) * L) * v[:, -1] + \
                likelihood_bonus(logp_c, self.n_plan, a.prob_threshold, a.prob_weight)
            keep = a.beam_width if k < self.n_plan - 1 else 1
            top = score.view(E, -1).topk(min(keep, n_beam * n), 1).indices  # (E, keep)
            sel = (top + torch.arange(E, device=dev)[:, None] * (n_beam * n)).reshape(-1)
            first = out[sel, 0] if k == 0 else first[parent[sel]]  # (E*keep, D) first step of each beam
            ret, logp, d_cache, n_beam = ret_c[sel], logp_c[sel], _take(d_new, sel), top.shape[1]
            if k < self.n_plan - 1:  # the prior's distribution of the next code of every kept beam
                logits, p_cache = self.prior.next_logits(codes[sel], s.repeat_interleave(n_beam, 0),
                                                         _take(p_cache, parent[sel]))
        return first  # (E, D)

    @torch.no_grad()
    def sample(self, s):
        """Prior sampling: n_samples full code sequences per state, keep the best objective."""
        a, E, n = self.a, s.shape[0], self.a.n_samples
        st = s.repeat_interleave(n, 0)  # (E*n, obs)
        idx = torch.zeros(E * n, 0, dtype=torch.long, device=s.device)
        logp = torch.zeros(E * n, device=s.device)
        for _ in range(self.n_plan):
            codes, lp = self._draw(self.prior(idx, st)[:, -1], 1)
            idx, logp = torch.cat([idx, codes], 1), logp + lp[:, 0]
        pred = self.vqvae.decode_codes(idx, st).float()  # (E*n, H', D)
        score = plan_objective(pred, logp, self.stats, a.discount, self.n_plan, a.prob_threshold, a.prob_weight)
        best = score.view(E, n).argmax(1) + torch.arange(E, device=s.device) * n
        return pred[best, 0]  # (E, D)

    def act(self, obs):
        """obs (E, obs_dim) raw -> first action of the best plan (E, act_dim), within bounds."""
        mean, std = self.stats["mean"], self.stats["std"]
        s = (torch.as_tensor(obs, dtype=torch.float32, device=self.device) - mean[: self.obs_dim]) / std[: self.obs_dim]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.a.bf16):
            plan = self.beam(s) if self.a.planner == "beam" else self.sample(s)
        sl = slice(self.obs_dim, self.obs_dim + self.act_dim)
        act = plan[:, sl].float() * std[sl] + mean[sl]  # first action executed; replan every step
        return torch.maximum(torch.minimum(act, self.high), self.low)

    __call__ = act


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def build(obs_dim, act_dim, a: Args, device):
    vqvae, prior = VQVAE(obs_dim, act_dim, a).to(device), Prior(obs_dim, a).to(device)
    return vqvae, prior, make_optimizer(vqvae, a), make_optimizer(prior, a)


def run_eval(vqvae, prior, stats, a: Args, device) -> dict:
    env = common.make_env(a.env)
    low, high = env.action_space.low, env.action_space.high
    env.close()
    modes = (vqvae.training, prior.training)
    planner = Planner(vqvae, prior, stats, a, low, high, device)
    t = time.perf_counter()
    res = common.evaluate(planner, a.env, n_episodes=a.eval_episodes, seed=a.seed + 10_000,
                          progress=True, max_steps=a.max_episode_steps)
    vqvae.train(modes[0]), prior.train(modes[1])
    secs = time.perf_counter() - t
    return {"eval/return_mean": float(res["returns"].mean()), "eval/return_std": float(res["returns"].std()),
            "eval/normalized_score": float(np.mean(res["normalized"])),
            "eval/length_mean": float(res["lengths"].mean()),
            "eval/decision_ms": 1000 * secs / max(int(res["lengths"].max()), 1)}


def check_compatible(ckpt: dict, obs_dim: int, act_dim: int, a: Args, path: str):
    st = ckpt["stats"]
    if (st["obs_dim"], st["act_dim"]) != (obs_dim, act_dim):
        raise ValueError(f"checkpoint {path} was trained with obs/act dims {st['obs_dim']}/{st['act_dim']}, "
                         f"but {a.env} has {obs_dim}/{act_dim}: pass the --env it was trained on "
                         f"({ckpt['args'].get('env')})")


def main(argv=None) -> dict:
    a = common.parse_args(Args, argv)
    if a.stage not in ("vqvae", "prior", "both"):
        raise ValueError(f"--stage {a.stage!r}: use vqvae, prior or both")
    if a.planner not in ("beam", "sample"):
        raise ValueError(f"--planner {a.planner!r}: use beam or sample")
    if a.seq_len % a.latent_step:
        raise ValueError(f"--seq-len {a.seq_len} must be a multiple of --latent-step {a.latent_step}")
    source = a.checkpoint if (a.eval_only or (a.stage == "prior" and not a.resume)) else a.resume
    if (a.eval_only or a.stage == "prior") and source is None:
        raise ValueError("--eval-only and --stage prior need --checkpoint PATH (a run with a trained VQ-VAE)")
    ckpt = common.load_checkpoint(source, required=("vqvae", "prior", "stats", "args")) if source else None
    if ckpt is not None:  # the architecture is the checkpoint's; planning / budget flags stay this run's
        for k in ARCH:
            setattr(a, k, ckpt["args"][k])
    common.set_seed(a.seed)
    device = common.get_device(a.cuda)
    obs_dim, act_dim = common.env_dims(a.env)
    if ckpt is not None:
        check_compatible(ckpt, obs_dim, act_dim, a, source)
    vqvae, prior, opt_vq, opt_prior = build(obs_dim, act_dim, a, device)
    vq_step = prior_step = 0
    if ckpt is not None:
        vqvae.load_state_dict(ckpt["vqvae"])
        prior.load_state_dict(ckpt["prior"])
        stats = ckpt["stats"]
    if a.eval_only:
        m = run_eval(vqvae, prior, stats, a, device)
        print(f"[tap] eval-only {source}: return {m['eval/return_mean']:.1f} +- {m['eval/return_std']:.1f}, "
              f"D4RL-normalized {m['eval/normalized_score']:.1f}")
        return m

    data = common.load_dataset(a.env, a.dataset, path=a.dataset_path)
    chunks = ChunkData(data, a, device, stats=ckpt["stats"] if ckpt else None)
    stats = chunks.stats
    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)
    if ckpt is not None and a.resume:  # exact continuation: optimizers, counters, every RNG
        opt_vq.load_state_dict(ckpt["opt_vq"]), opt_prior.load_state_dict(ckpt["opt_prior"])
        vq_step, prior_step = ckpt["vq_step"], ckpt["prior_step"]
        common.set_rng_state(ckpt["rng"])
        gen.set_state(ckpt["gen"])
    elif ckpt is not None:  # --stage prior --checkpoint: keep the VQ-VAE, train a fresh prior
        vq_step = ckpt["vq_step"]
    logger = common.RunLogger(a, "tap", run_dir=a.run_dir, tensorboard=a.tensorboard, track=a.track)
    ckpt_path = logger.dir / "checkpoint.pt"

    def save():
        common.save_checkpoint(ckpt_path, dict(
            vqvae=vqvae.state_dict(), prior=prior.state_dict(), opt_vq=opt_vq.state_dict(),
            opt_prior=opt_prior.state_dict(), vq_step=vq_step, prior_step=prior_step, stats=stats,
            rng=common.rng_state(), gen=gen.get_state(), args=asdict(a)))

    n_vq = a.total_steps - vq_step if a.stage in ("vqvae", "both") else 0
    n_pr = a.prior_steps - prior_step if a.stage in ("prior", "both") else 0
    metrics, last_eval = {}, float("nan")
    ac = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)
    bar = tqdm(total=max(n_vq, 0) + max(n_pr, 0), desc="tap", unit="step")
    t0, t_log = time.perf_counter(), time.perf_counter()
    try:
        vqvae.train()
        while vq_step < a.total_steps and a.stage in ("vqvae", "both"):
            x, mask = chunks.sample(a.batch_size, gen)
            with ac():
                mse, bce, commit, _ = vqvae(x, mask, a.action_weight)
                loss = mse + bce + a.commit_weight * commit
            opt_vq.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vqvae.parameters(), a.grad_clip)
            opt_vq.step()
            vq_step += 1
            bar.update(1)
            if vq_step % a.log_every == 0 or vq_step == a.total_steps:
                sps = a.log_every / max(time.perf_counter() - t_log, 1e-9)
                t_log = time.perf_counter()
                metrics = {"losses/vq_total": loss.item(), "losses/reconstruction": mse.item(),
                           "losses/done_bce": bce.item(), "losses/commitment": commit.item(), "charts/SPS": sps}
                logger.log(vq_step, **metrics)
                bar.set_postfix(stage="vqvae", loss=f"{loss.item():.4f}")
        vqvae.eval()  # frozen encoder for the prior (paper, method: prior)
        prior.train()
        while prior_step < a.prior_steps and a.stage in ("prior", "both"):
            x, _ = chunks.sample(a.batch_size, gen)
            with torch.no_grad(), ac():
                codes = vqvae.codebook.indices(vqvae.encode(x).float())  # (B, T/L)
            with ac():
                logits = prior(codes[:, :-1], x[:, 0, :obs_dim])  # (B, T/L, K)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
            opt_prior.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(prior.parameters(), a.grad_clip)
            opt_prior.step()
            prior_step += 1
            bar.update(1)
            if prior_step % a.log_every == 0 or prior_step == a.prior_steps:
                sps = a.log_every / max(time.perf_counter() - t_log, 1e-9)
                t_log = time.perf_counter()
                metrics = {"losses/prior_nll": loss.item(), "charts/SPS": sps}
                logger.log(a.total_steps + prior_step, **metrics)
                bar.set_postfix(stage="prior", loss=f"{loss.item():.4f}", score=f"{last_eval:.1f}")
            if a.eval_every and prior_step % a.eval_every == 0 and prior_step < a.prior_steps:
                m = run_eval(vqvae, prior, stats, a, device)
                last_eval = m["eval/normalized_score"]
                logger.log(a.total_steps + prior_step, **m)
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"\n[tap] interrupted: checkpoint saved to {ckpt_path} (continue with --resume {ckpt_path})")
        sys.exit(130)
    bar.close()
    save()
    train_s = time.perf_counter() - t0
    out = dict(metrics, vq_step=vq_step, prior_step=prior_step, train_seconds=train_s, checkpoint=str(ckpt_path))
    if a.stage != "vqvae" and prior_step > 0:
        m = run_eval(vqvae, prior, stats, a, device)
        logger.log(a.total_steps + prior_step, **m)
        out.update(m)
        print(f"[tap] {a.env}/{a.dataset}: return {m['eval/return_mean']:.1f} +- {m['eval/return_std']:.1f} over "
              f"{a.eval_episodes} episodes, D4RL-normalized {m['eval/normalized_score']:.1f} "
              f"(training {train_s / 60:.1f} min, {m['eval/decision_ms']:.0f} ms per batched decision)")
    logger.close()
    return out


if __name__ == "__main__":
    main()
