"""TAP: Trajectory Autoencoding Planner (Jiang et al. 2022, "Efficient Planning in a Compact Latent
Action Space", arXiv 2208.10291; official code github.com/ZhengyaoJiang/latentplan).

Sec. 3 of the paper as the official code runs it: steps [s, a, r, R, done], z-scored (R the TT
value target, reward -100 at true terminals), in 24-step chunks; a state-conditional VQ-VAE whose
causal encoder is max-pooled every L = 3 steps into 8 codes of a 512-code EMA codebook and whose
decoder maps (s_0, codes) back to the chunk; a transformer prior p(z_k | z_<k, s_0); a beam search
over H / L = 5 codes (beam 64 x expand 4) scored by predicted return plus a capped prior
log-likelihood; the first decoded action is executed and the agent replans every step.
Defaults are official (config/vqvae.py, scripts/train.py): width n_embd * n_head = 512 for VQ-VAE
and prior, 4 layers, 4 heads, dropout 0.1, 512 codes of 512 dims, batch 512, AdamW 2e-4, clip 1.

Named deviations (reason):
  - Training length in gradient steps (--total-steps, --prior-steps), not epochs: one budget unit.
  - Plain causal attention: the official mask also hides key position obs + act + 1 (15 on hopper;
    none within 24 steps on halfcheetah / walker2d), a leftover of TT's value-token mask.
  - Speed: beam search extends prefixes with key-value caches and decodes equal candidates once
    (official: re-decodes every prefix; same plans, tested); all episodes plan in one batch.
  - Offline data from make_datasets.py on Gymnasium v5: scores are "D4RL-normalized".

Run:       python tap.py --env hopper        (both stages, then evaluation; sized for a GPU)
Stages:    python tap.py --stage vqvae;  python tap.py --stage prior --checkpoint RUN/checkpoint.pt
Evaluate:  python tap.py --eval-only --checkpoint RUN/checkpoint.pt [--planner sample]
CPU-sized flags (a smaller model, shorter runs) are in README.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args:
    exp_name: str = "tap"
    """name of this experiment (part of the run folder name)"""
    seed: int = 0
    """random seed (training, planner samples, evaluation episodes)"""
    cuda: bool = True
    """use the GPU when one is available"""
    track: bool = False
    """log to Weights & Biases"""
    tensorboard: bool = False
    """log to TensorBoard"""
    env: str = "hopper"
    """environment: hopper, halfcheetah, walker2d (or a registered Gymnasium id)"""
    dataset: str = "medium"
    """D4RL-style dataset (random, medium, medium-replay, expert, medium-expert) or a Minari id"""
    dataset_path: Optional[str] = None
    """read the dataset from this .npz / .hdf5 file instead"""
    stage: str = "both"
    """vqvae, prior (a fresh prior on the VQ-VAE of --checkpoint) or both"""
    total_steps: int = 100_000
    """VQ-VAE gradient steps (official: 50 epochs of a 1M-step dataset at batch 512, ~100k)"""
    prior_steps: int = 100_000
    """prior gradient steps (official: the same 50 epochs)"""
    batch_size: int = 512
    """chunks per gradient step"""
    lr: float = 2e-4
    """AdamW learning rate, constant (official lr_decay False)"""
    eval_every: int = 0
    """also evaluate every this many steps of the prior stage (0: only at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, planned in one batch"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the environment's limit)"""
    bf16: bool = False
    """bfloat16 autocast for training and planning"""
    resume: Optional[str] = None
    """checkpoint to continue training from, exactly (same --stage and step flags)"""
    eval_only: bool = False
    """only evaluate --checkpoint (its architecture; planning flags from this command)"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only, or whose VQ-VAE --stage prior trains a fresh prior on"""
    n_layer: int = 4
    """transformer layers of the encoder, the decoder and the prior each"""
    n_embd: int = 512
    """transformer width of VQ-VAE and prior (official n_embd * n_head = 128 x 4)"""
    code_dim: int = 512
    """dimension of a codebook vector (official trajectory_embd)"""
    n_codes: int = 512
    """K: codebook size"""
    latent_step: int = 3
    """L: steps per latent code (max-pool window and stride)"""
    planner: str = "beam"
    """beam (official beam_with_prior) or sample (official sample_with_prior)"""
    horizon: int = 15
    """planning horizon H in steps (H // L codes)"""
    beam_width: int = 64
    """beams kept per search depth"""


SEQ_LEN = 24  # steps per chunk (official subsampled_sequence_length 25 -> 24 input steps)
N_HEAD, DROPOUT = 4, 0.1  # official n_head; embedding, attention and residual dropout
EMA_DECAY = 0.99  # codebook moving averages (VQ-VAE, van den Oord et al. 2017, App. A.1)
ACTION_WEIGHT = 5.0  # reconstruction weight of action dims, others 1 (official action_weight)
DISCOUNT, PENALTY = 0.99, -100.0  # value target and planning; reward of a true terminal (TT)
WEIGHT_DECAY, GRAD_CLIP = 0.1, 1.0  # AdamW (betas 0.9, 0.95) on matmul weights only
N_EXPAND = 4  # codes drawn per beam and depth (official n_expand)
PROB_THRESHOLD, PROB_WEIGHT = 0.05, 500.0  # likelihood cap per code, weight of the capped term
N_SAMPLES, ROUNDS = 4096, 2  # --planner sample: official nb_samples over `rounds` rounds
LOG_EVERY = 100  # steps between loss logs
ARCH = ("n_layer", "n_embd", "code_dim", "n_codes", "latent_step")  # from a checkpoint
PLAN = ("planner", "horizon", "beam_width", "bf16", "seed")  # this command's, with --eval-only


# ---- Data: [s, a, r, R, done] chunks (official datasets/sequence.py) ----
class ChunkData:
    """All episodes z-scored and laid end to end on the device, each followed by SEQ_LEN - 1
    padding rows (done = 1; input = the normalized zero vector, as the official padding_vector),
    so a training chunk is one slice from any start but an episode's last step (official)."""

    def __init__(self, data: dict, device, stats: Optional[dict] = None):
        self.obs_dim, self.act_dim = data["observations"].shape[1], data["actions"].shape[1]
        rows, starts, pos = [], [], 0
        for ep in common.split_episodes(data):
            r = ep["rewards"].astype(np.float64)  # a copy
            if ep["terminals"][-1]:
                r[-1] = PENALTY  # a true terminal's reward -> -100
            value = np.append(common.returns_to_go(r, DISCOUNT)[1:], 0.0)  # R_t excludes r_t
            rows.append(np.concatenate([ep["observations"], ep["actions"], r[:, None],
                                        value[:, None]], 1))  # (n, obs + act + 2)
            rows.append(np.full((SEQ_LEN - 1, rows[-1].shape[1]), np.nan))  # padding
            starts.append(pos + np.arange(max(len(r) - 1, 1)))
            pos += len(r) + SEQ_LEN - 1
        joined = np.concatenate(rows)
        real = ~np.isnan(joined[:, 0])
        if stats is None:  # reward statistics before the penalty (official SequenceDataset)
            mean, std = joined[real].mean(0), joined[real].std(0)
            mean[-2], std[-2] = data["rewards"].mean(), data["rewards"].std()
            stats = dict(mean=torch.tensor(mean, dtype=torch.float32),
                         std=torch.tensor(np.maximum(std, 1e-6), dtype=torch.float32))
        self.stats = stats
        joined[~real] = 0.0
        joined = (joined - stats["mean"].numpy()) / stats["std"].numpy()  # padding: normalized 0
        done = (~real).astype(np.float32)[:, None]
        self.rows = torch.tensor(np.concatenate([joined, done], 1), dtype=torch.float32,
                                 device=device)  # (N + padding, D) with D = obs + act + 3
        self.starts = torch.tensor(np.concatenate(starts), device=device)
        self.offsets = torch.arange(SEQ_LEN, device=device)

    def sample(self, batch_size: int, gen: torch.Generator):
        """x (B, T, D) chunks with done last; mask (B, T): 1 on real steps."""
        i = torch.randint(len(self.starts), (batch_size,), device=self.starts.device, generator=gen)
        x = self.rows[self.starts[i, None] + self.offsets]
        return x, 1.0 - x[..., -1]


# ---- Model (Sec. 3; official models/vqvae.py) ----
class Block(nn.Module):
    """Pre-LayerNorm causal transformer block (official Block)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(DROPOUT))
        self.drop = nn.Dropout(DROPOUT)

    def heads(self, x):  # (B, T, C) -> q, k, v each (B, h, T, C / h)
        B, T, C = x.shape
        return self.qkv(self.ln1(x)).view(B, T, 3, N_HEAD, C // N_HEAD).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.heads(x)
        p = DROPOUT if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, h, T, c)
        x = x + self.drop(self.proj(y.transpose(1, 2).flatten(2)))  # (B, T, C)
        return x + self.mlp(self.ln2(x))


class EMACodebook(nn.Module):
    """K codes of dimension D, nearest-neighbour quantization with straight-through gradients
    (VQ-VAE Eq. 3) and exponential-moving-average updates instead of a codebook loss (App. A.1)."""

    def __init__(self, K: int, D: int):
        super().__init__()
        emb = torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K)  # official init
        self.register_buffer("embedding", emb)
        self.register_buffer("ema_count", torch.ones(K))
        self.register_buffer("ema_w", emb.clone())

    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def indices(self, z):  # (..., D) -> (...) index of the nearest code
        flat, e = z.float().reshape(-1, z.shape[-1]), self.embedding
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)  # (N, K)
        return d.argmin(1).view(z.shape[:-1])

    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def forward(self, z_e):
        """z_e (B, M, D) -> z_st (the codes, gradients straight through to z_e), z_q (the codes
        after this step's EMA update, for the commitment loss, as official), idx (B, M)."""
        z_e = z_e.float()
        idx = self.indices(z_e.detach())
        z_st = z_e + (self.embedding[idx] - z_e).detach()  # d z_st / d z_e = I
        if self.training:  # N_i <- g N_i + (1 - g) n_i;  m_i <- g m_i + (1 - g) sum z_e;  e = m / N
            onehot = F.one_hot(idx.flatten(), len(self.embedding)).float()  # (B*M, K)
            self.ema_count.mul_(EMA_DECAY).add_(onehot.sum(0), alpha=1 - EMA_DECAY)
            dw = onehot.t() @ z_e.detach().flatten(0, 1)  # (K, D)
            self.ema_w.mul_(EMA_DECAY).add_(dw, alpha=1 - EMA_DECAY)
            self.embedding.copy_(self.ema_w / self.ema_count[:, None])
        return z_st, self.embedding[idx], idx


class VQVAE(nn.Module):
    """State-conditional VQ-VAE over chunks x (B, T, D) of [s, a, r, R, done] (Sec. 3)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        C, self.L = args.n_embd, args.latent_step
        self.obs_dim, self.act_dim, self.D = obs_dim, act_dim, obs_dim + act_dim + 3
        self.embed = nn.Linear(self.D, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, SEQ_LEN, C))  # encoder and decoder share it
        self.drop = nn.Dropout(DROPOUT)
        self.encoder = nn.Sequential(*[Block(C) for _ in range(args.n_layer)])
        self.cast = nn.Linear(C, args.code_dim)
        self.codebook = EMACodebook(args.n_codes, args.code_dim)
        self.latent_mixing = nn.Linear(obs_dim + args.code_dim, C)
        self.decoder = nn.Sequential(*[Block(C) for _ in range(args.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.predict = nn.Linear(C, self.D)
        self.apply(init_weights)

    def encode(self, x):
        """x (B, T, D) -> z_e (B, T / L, code_dim); causal: code j sees steps < (j + 1) L."""
        h = self.encoder(self.drop(self.embed(x) + self.pos_emb[:, : x.shape[1]]))  # (B, T, C)
        h = F.max_pool1d(h.transpose(1, 2), self.L, stride=self.L).transpose(1, 2)  # (B, T/L, C)
        return self.cast(h)

    def decode(self, z, state):
        """z (B, M, code_dim) codes, state (B, obs) s_0 -> (B, M L, D), done as a logit. Each
        code is repeated L times; causal, so a prefix of codes decodes a prefix of the chunk."""
        h = self.latent_mixing(torch.cat([state[:, None].expand(-1, z.shape[1], -1), z], -1))
        h = h.repeat_interleave(self.L, 1)  # (B, M L, C); no input dropout (official)
        out = self.predict(self.ln_f(self.decoder(h + self.pos_emb[:, : h.shape[1]])))
        return torch.cat([out[..., : self.obs_dim] + state[:, None], out[..., self.obs_dim:]], -1)

    def decode_codes(self, idx, state):
        """idx (B, M) code indices -> (B, M L, D) with done as a probability (official)."""
        out = self.decode(self.codebook.embedding[idx], state)
        return torch.cat([out[..., :-1], torch.sigmoid(out[..., -1:])], -1)

    def loss(self, x, mask):
        """Official VQContinuousVAE losses: MSE weighted (actions x ACTION_WEIGHT) on real steps,
        BCE on done over all steps, commitment ||z_e - sg(e)||^2 (VQ-VAE Eq. 3 with EMA codes)."""
        z_e = self.encode(x)
        z_st, z_q, _ = self.codebook(z_e)
        out = self.decode(z_st, x[:, 0, : self.obs_dim])  # (B, T, D)
        w = torch.ones(self.D - 1, device=x.device)
        w[self.obs_dim: self.obs_dim + self.act_dim] = ACTION_WEIGHT
        mse = ((out[..., :-1] - x[..., :-1]).pow(2) * w * mask[..., None]).mean()
        bce = F.binary_cross_entropy_with_logits(out[..., -1].float(), x[..., -1])
        return mse, bce, F.mse_loss(z_e.float(), z_q), out


class Prior(nn.Module):
    """Autoregressive transformer p(z_k | z_<k, s_0) over the codes (Sec. 3; official
    TransformerPrior): a zero start token, the state embedding added at every position."""

    def __init__(self, obs_dim: int, args: Args):
        super().__init__()
        C = args.n_embd
        self.tok_emb = nn.Embedding(args.n_codes, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, SEQ_LEN // args.latent_step, C))
        self.state_emb = nn.Linear(obs_dim, C)
        self.drop = nn.Dropout(DROPOUT)
        self.blocks = nn.Sequential(*[Block(C) for _ in range(args.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, args.n_codes, bias=False)
        self.apply(init_weights)

    def forward(self, idx, state):
        """idx (B, t) codes so far (t may be 0), state (B, obs) -> logits (B, t + 1, K)."""
        tok = F.pad(self.tok_emb(idx), (0, 0, 1, 0))  # (B, t + 1, C): zero start token first
        h = tok + self.pos_emb[:, : tok.shape[1]] + self.state_emb(state)[:, None]
        return self.head(self.ln_f(self.blocks(self.drop(h))))


def prior_loss(prior: Prior, vqvae: VQVAE, x):
    """Official PriorTrainer: NLL of the codes of chunks x (B, T, D) under the prior, given each
    chunk's first state; the codes come from the frozen encoder (eval mode, nearest code)."""
    with torch.no_grad():
        codes = vqvae.eval().codebook.indices(vqvae.encode(x))  # (B, T / L)
    logits = prior(codes[:, :-1], x[:, 0, : vqvae.obs_dim])  # (B, T / L, K)
    return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())


def init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def make_optimizer(model: nn.Module, args: Args):
    """AdamW, weight decay on Linear weights only (official configure_optimizers)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    groups = [[p for p in model.parameters() if (id(p) in decay) == d] for d in (True, False)]
    return torch.optim.AdamW([dict(params=groups[0], weight_decay=WEIGHT_DECAY),
                              dict(params=groups[1], weight_decay=0.0)], lr=args.lr,
                             betas=(0.9, 0.95))


# ---- Speed: key-value caches for planning. The decoder and the prior are causal, so these give
# ---- the plain passes above exactly (tests/test_tap.py) at the cost of the new positions only.
def block_cached(blk: Block, x, past=None):
    """x (B, T, C) new positions after cached (k, v) of (B, h, P, c) -> output, (k, v) of P + T."""
    q, k, v = blk.heads(x)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    P, T = k.shape[2] - x.shape[1], x.shape[1]
    mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)  # new i sees <= P + i
    x = x + blk.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
                     .flatten(2))
    return x + blk.mlp(blk.ln2(x)), (k, v)


def decode_next(vqvae: VQVAE, z, state, past=None):
    """Code number len(past) / L: z (B, code_dim), state (B, obs) -> its L decoded steps
    (B, L, D) with done as a probability, and the extended per-layer cache."""
    P = 0 if past is None else past[0][0].shape[2]
    h = vqvae.latent_mixing(torch.cat([state, z], -1))[:, None].expand(-1, vqvae.L, -1)
    h, new = h + vqvae.pos_emb[:, P: P + vqvae.L], []
    for i, blk in enumerate(vqvae.decoder):
        h, kv = block_cached(blk, h, None if past is None else past[i])
        new.append(kv)
    out = vqvae.predict(vqvae.ln_f(h))  # (B, L, D)
    out = torch.cat([out[..., : vqvae.obs_dim] + state[:, None], out[..., vqvae.obs_dim: -1],
                     torch.sigmoid(out[..., -1:])], -1)
    return out, new


def prior_next(prior: Prior, idx, state, past=None):
    """idx (B,) the newest code (None at the start), state (B, obs) -> logits of the next code
    (B, K) and the extended cache; equals prior(all codes, state)[:, -1]."""
    P = 0 if past is None else past[0][0].shape[2]
    tok = torch.zeros_like(prior.pos_emb[0, 0]) if idx is None else prior.tok_emb(idx)
    h, new = (tok + prior.pos_emb[0, P] + prior.state_emb(state))[:, None], []  # (B, 1, C)
    for i, blk in enumerate(prior.blocks):
        h, kv = block_cached(blk, h, None if past is None else past[i])
        new.append(kv)
    return prior.head(prior.ln_f(h))[:, 0], new


def take(cache, rows):
    return None if cache is None else [(k[rows], v[rows]) for k, v in cache]


# ---- Planning (Sec. 3; official search/optimizer.py) ----
def objective(r, v, logp, n_codes: int, discount=DISCOUNT, threshold=PROB_THRESHOLD,
              weight=PROB_WEIGHT):
    """Score of decoded plans (official beam_with_prior): r (N, T) rewards and v (N,) the value
    R_{T-1} of the last decoded step (denormalized), logp (N,) log p(z_1..z_k | s_0), n_codes the
    codes of a FULL plan (the cap is the same at every depth) -> (N,)
        gamma sum_{i<T-1} gamma^i r_i + gamma^T v + weight clamp(logp, -1e5, n_codes log threshold).
    The cap: plans likelier than `threshold` per code tie on the bonus and are ranked by return."""
    disc = discount ** torch.arange(1, r.shape[1] + 1, device=r.device, dtype=r.dtype)
    ret = (r[:, :-1] * disc[:-1]).sum(1) + disc[-1] * v  # official cumprod discounts
    return ret + weight * logp.clamp(-1e5, n_codes * math.log(threshold))


class Planner:
    """Batched TAP agent: policy(obs (E, obs_dim) numpy) -> first actions (E, act_dim) numpy of
    the best plans; replans every step. Actions are not clamped (official; MuJoCo clips them)."""

    def __init__(self, vqvae: VQVAE, prior: Prior, stats: dict, args: Args, device="cpu",
                 n_expand=N_EXPAND, threshold=PROB_THRESHOLD, weight=PROB_WEIGHT,
                 n_samples=N_SAMPLES, rounds=ROUNDS, dedupe=True):
        self.vqvae, self.prior, self.args = vqvae.eval(), prior.eval(), args
        self.device = torch.device(device)
        self.mean, self.std = (torch.as_tensor(stats[k], device=device) for k in ("mean", "std"))
        self.n_plan, self.n_expand, self.threshold, self.weight = (
            args.horizon // args.latent_step, n_expand, threshold, weight)
        self.n_samples, self.rounds, self.dedupe = n_samples, rounds, dedupe
        if not 1 <= self.n_plan <= SEQ_LEN // args.latent_step:
            raise ValueError(f"--horizon {args.horizon} gives {self.n_plan} codes: use a horizon "
                             f"from {args.latent_step} to {SEQ_LEN} (the chunk length)")
        self.gen = torch.Generator(device=device).manual_seed(args.seed)

    def rewards_values(self, pred):  # (N, T, D) decoded -> denormalized r, R (N, T)
        return (pred[..., -3] * self.std[-2] + self.mean[-2],
                pred[..., -2] * self.std[-1] + self.mean[-1])

    def draw(self, logits, n: int):
        """n codes per row from softmax(logits (N, K)) -> codes (N, n), their log-probs (N, n)."""
        logp = F.log_softmax(logits.float(), -1)
        codes = torch.multinomial(logp.exp(), n, replacement=True, generator=self.gen)
        return codes, logp.gather(1, codes)

    @torch.no_grad()
    def beam(self, s):
        """s (E, obs) normalized -> first decoded step (E, D) and codes (E, H / L) of the best
        plan. Official beam_with_prior: at depth k each beam draws N_EXPAND codes from the prior
        (beam_width * N_EXPAND at k = 0), every prefix is decoded and scored by `objective`, the
        best beam_width per state survive, and the best one at the last depth."""
        E, dev, width = s.shape[0], s.device, self.args.beam_width
        logits, p_cache = prior_next(self.prior, None, s)  # (E, K): p(z_1 | s_0)
        codes, rew = torch.zeros(E, 0, dtype=torch.long, device=dev), torch.zeros(E, 0, device=dev)
        logp, d_cache, first, n_beam = torch.zeros(E, device=dev), None, None, 1
        for k in range(self.n_plan):
            n = width * self.n_expand if k == 0 else self.n_expand
            new, lp = self.draw(logits, n)  # (E * n_beam, n)
            parent = torch.arange(E * n_beam, device=dev).repeat_interleave(n)  # candidate -> beam
            cand = torch.cat([codes[parent], new.reshape(-1, 1)], 1)  # (E * n_beam * n, k + 1)
            rows = inv = torch.arange(len(cand), device=dev)  # plain: decode every candidate
            if self.dedupe:  # Speed: equal (state, codes) rows, drawn with replacement, decode once
                key = torch.cat([(parent // n_beam)[:, None], cand], 1)
                key, inv = torch.unique(key, dim=0, return_inverse=True)  # (U, k + 2), (N,)
                rows = torch.zeros(len(key), dtype=torch.long, device=dev).scatter_(0, inv, rows)
            out, d_new = decode_next(self.vqvae, self.vqvae.codebook.embedding[cand[rows, -1]],
                                     s[parent[rows] // n_beam], take(d_cache, parent[rows]))
            out = out[inv]  # (N, L, D): the decoded steps of every candidate
            r, v = self.rewards_values(out.float())  # steps k L .. k L + L - 1
            rew_c, logp_c = torch.cat([rew[parent], r], 1), logp[parent] + lp.reshape(-1)
            score = objective(rew_c, v[:, -1], logp_c, self.n_plan, threshold=self.threshold,
                              weight=self.weight)
            keep = width if k < self.n_plan - 1 else 1
            top = score.view(E, -1).topk(min(keep, n_beam * n), 1).indices  # (E, keep)
            sel = (top + torch.arange(E, device=dev)[:, None] * (n_beam * n)).flatten()
            first = out[sel, 0] if k == 0 else first[parent[sel]]  # (E * keep, D)
            codes, rew, logp, n_beam = cand[sel], rew_c[sel], logp_c[sel], top.shape[1]
            d_cache = take(d_new, inv[sel])
            if k < self.n_plan - 1:  # the prior's next-code distribution for every kept beam
                logits, p_cache = prior_next(self.prior, codes[:, -1], s.repeat_interleave(
                    n_beam, 0), take(p_cache, parent[sel]))
        return first, codes

    @torch.no_grad()
    def sample(self, s):
        """Official sample_with_prior: per round, n_samples / rounds code sequences from the prior,
        the best by `objective`; across rounds, the best by return alone (no likelihood bonus)."""
        E, M = s.shape[0], self.n_samples // self.rounds
        st, best = s.repeat_interleave(M, 0), []
        for _ in range(self.rounds):
            start = torch.zeros(E, 0, dtype=torch.long, device=s.device)
            idx, lp = self.draw(self.prior(start, s)[:, -1], M)  # (E, M) first codes
            idx, logp = idx.reshape(-1, 1), lp.flatten()
            for _ in range(self.n_plan - 1):
                nxt, lp = self.draw(self.prior(idx, st)[:, -1], 1)
                idx, logp = torch.cat([idx, nxt], 1), logp + lp[:, 0]
            pred = self.vqvae.decode_codes(idx, st).float()  # (E M, n_plan L, D)
            r, v = self.rewards_values(pred)
            score = objective(r, v[:, -1], logp, self.n_plan, threshold=self.threshold,
                              weight=self.weight)  # (E M,)
            i = score.view(E, M).argmax(1) + torch.arange(E, device=s.device) * M  # round's best
            ret = objective(r[i], v[i, -1], logp[i], self.n_plan, weight=0.0)  # return only
            best.append((ret, pred[i, 0], idx[i]))
        pick = torch.stack([b[0] for b in best], 1).argmax(1)  # (E,) round of the best return
        rows = torch.arange(E, device=s.device)
        return (torch.stack([b[1] for b in best], 1)[rows, pick],
                torch.stack([b[2] for b in best], 1)[rows, pick])

    def __call__(self, obs):
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
        if obs.ndim != 2 or obs.shape[1] != self.vqvae.obs_dim:
            raise ValueError(f"observations of shape {tuple(obs.shape)}: this agent takes "
                             f"(n, {self.vqvae.obs_dim}); is it the env it was trained on?")
        o = self.vqvae.obs_dim
        a = slice(o, o + self.vqvae.act_dim)
        s = (obs - self.mean[:o]) / self.std[:o]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.bf16):
            first, _ = self.beam(s) if self.args.planner == "beam" else self.sample(s)
        return (first[:, a].float() * self.std[a] + self.mean[a]).cpu().numpy()  # first action


def load_policy(path, device="cpu", **planning) -> Planner:
    """The agent of a tap.py checkpoint, e.g. load_policy("runs/RUN/checkpoint.pt"); keywords
    override planning settings (planner, horizon, beam_width, bf16, seed)."""
    ckpt = common.load_checkpoint(path, "tap")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    args = dataclasses.replace(args, **planning)
    vqvae = VQVAE(ckpt["obs_dim"], ckpt["act_dim"], args)
    prior = Prior(ckpt["obs_dim"], args)
    vqvae.load_state_dict(ckpt["vqvae"])
    prior.load_state_dict(ckpt["prior"])
    stats = dict(mean=ckpt["mean"], std=ckpt["std"])
    return Planner(vqvae.to(device), prior.to(device), stats, args, device)


# ---- Training ----
def check_args(args: Args) -> None:
    for name, value, allowed in (("stage", args.stage, ("vqvae", "prior", "both")),
                                 ("planner", args.planner, ("beam", "sample"))):
        if value not in allowed:
            raise ValueError(f"--{name} {value!r}: use one of {', '.join(allowed)}")
    if SEQ_LEN % args.latent_step:
        raise ValueError(f"--latent-step {args.latent_step} must divide the chunk ({SEQ_LEN})")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint runs/RUN/checkpoint.pt")
    if args.stage == "prior" and not (args.checkpoint or args.resume):
        raise ValueError("--stage prior needs --checkpoint RUN/checkpoint.pt (a trained VQ-VAE)")


def evaluate(policy: Planner, args: Args, env: str, dataset: str) -> dict:
    """Vectorized episodes (common.evaluate, progress in environment steps)."""
    res = common.evaluate(policy, env, n_episodes=args.eval_episodes, seed=args.seed,
                          max_steps=args.eval_max_steps, dataset=dataset)
    return {"eval/return_mean": res["returns"].mean(), "eval/return_std": res["returns"].std(),
            "eval/normalized_score": res["normalized"].mean(),
            "eval/length_mean": res["lengths"].mean()}


def update(model: nn.Module, optimizer, loss) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    check_args(args)
    device = common.get_device(args.cuda)
    if args.eval_only:  # the checkpoint's architecture and env; planning flags of this command
        policy = load_policy(args.checkpoint, device, **{k: getattr(args, k) for k in PLAN})
        metrics = evaluate(policy, args, policy.args.env, policy.args.dataset)
        print(f"[tap] {args.checkpoint}: D4RL-normalized {metrics['eval/normalized_score']:.1f}")
        return metrics
    source = args.resume or (args.checkpoint if args.stage == "prior" else None)
    ckpt = common.load_checkpoint(source, "tap") if source else None
    for k in ARCH if ckpt else ():  # the architecture is the checkpoint's
        setattr(args, k, ckpt["args"][k])
    common.set_seed(args.seed)
    data = common.load_dataset(args.env, args.dataset, path=args.dataset_path)
    args.env = data.env
    chunks = ChunkData(data, device, None if ckpt is None else dict(mean=ckpt["mean"],
                                                                    std=ckpt["std"]))
    obs_dim, act_dim = chunks.obs_dim, chunks.act_dim
    if ckpt is not None and (ckpt["obs_dim"], ckpt["act_dim"]) != (obs_dim, act_dim):
        raise ValueError(f"{source} was trained on obs/act dims {ckpt['obs_dim']}/"
                         f"{ckpt['act_dim']}, this data has {obs_dim}/{act_dim}: pass its --env")
    vqvae, prior = VQVAE(obs_dim, act_dim, args).to(device), Prior(obs_dim, args).to(device)
    if ckpt is not None and not args.resume:  # --stage prior: its VQ-VAE, a fresh prior
        vqvae.load_state_dict(ckpt["vqvae"])
    opt_vq, opt_prior = make_optimizer(vqvae, args), make_optimizer(prior, args)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    run = common.Run(args, "tap", extra=dict(chunks.stats, obs_dim=obs_dim, act_dim=act_dim),
                     vqvae=vqvae, prior=prior, opt_vq=opt_vq, opt_prior=opt_prior, sampler=gen)
    n_vq = args.total_steps if args.stage != "prior" else 0
    n_prior = args.prior_steps if args.stage != "vqvae" else 0
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)
    metrics = {}
    for step in run.loop(n_vq + n_prior):
        x, mask = chunks.sample(args.batch_size, gen)  # (B, T, D), (B, T)
        if step <= n_vq:  # stage 1: the VQ-VAE
            with autocast:
                mse, bce, commit, _ = vqvae.train().loss(x, mask)
            update(vqvae, opt_vq, mse + bce + commit)
            losses = {"losses/reconstruction": mse, "losses/done_bce": bce,
                      "losses/commitment": commit}
        else:  # stage 2: the prior on the codes of the frozen encoder (official trainprior.py)
            with autocast:
                loss = prior_loss(prior.train(), vqvae, x)
            update(prior, opt_prior, loss)
            losses = {"losses/prior_nll": loss}
        if run.every(LOG_EVERY):
            run.log(**losses)
        if step > n_vq and (run.every(args.eval_every) or step == run.total):
            planner = Planner(vqvae, prior, chunks.stats, args, device)
            metrics = evaluate(planner, args, args.env, args.dataset)
            run.log(**metrics)
            run.save()
    run.finish()
    return dict(metrics, step=run.step, checkpoint=str((run.dir / "checkpoint.pt").resolve()))


if __name__ == "__main__":
    main()
