"""Trajectory Transformer (Janner, Li & Levine 2021, "Offline Reinforcement Learning as One Big
Sequence Modeling Problem", arXiv 2106.02039), with a cached, batched beam search.

What this file reproduces (paper Sec. 3 and the official code's defaults):
  * every dimension discretized separately into N=100 bins (quantile bins, as the official code;
    uniform with --discretizer uniform), transitions tokenized as [s_1..s_obs, a_1..a_act, r, V]
    (Sec. 3.1), value target V_t = sum_k gamma^k r_{t+1+k} (gamma 0.99, excludes r_t, reward
    -100 at true terminals), per-dimension vocabularies (token + dim * N) plus a stop token;
  * a GPT (4 layers, 4 heads, width 128, dropout 0.1) whose attention is causal AND hides every
    value-token column, one output head per position in the transition, cross-entropy with
    weights obs 1 / action 5 / reward 1 / value 1 (Sec. 3.2), AdamW 6e-4 (0.9, 0.95), weight decay
    0.1 on matmul weights, clip 1.0, batch 256, windows of 10 transitions, warmup then cosine to 10%;
  * beam search as the official planner (Sec. 3.3, Alg. 1 with reward-to-go): context = last 5
    transitions, horizon 15, beam 128, expand 2, actions from the top ~40% of probability mass
    (cdf 0.6), greedy observations, reward and value scored by their expectation, score
    sum_i gamma^i r_i + gamma^(t+1) V_t, replanning every step; per-dataset overrides.

What is new: a key-value cache for the planner (the official code recomputes the whole context
for each of the ~229 tokens of a decision). The cache keeps the value-column mask and the
official sliding context: the context window moves by one whole transition at a time, which
shifts every position embedding, so the cache is refilled once per transition and extended one
token at a time in between; beam selection / expansion re-index the cache rows (lazily: a
gather is skipped when the window is about to be refilled anyway). A refill computes each
distinct window prefix once (beams share the real context and their ancestors), and a cached
pass runs its last layer for the last position only (keys / values of all positions are still
stored). All of it is exact: same plans, logits equal to ~1e-6. Planning is batched over beams
AND evaluation episodes (one planner call for all N environments). `--no-kv-cache` runs the
uncached path (same planner, full-window forward per token, as the official code) to verify.

Named deviations:
  * the cosine schedule is clamped at 10% after `decay_frac` of training (the official trainer's
    max(0.1, 0.5 (1 + cos(pi progress))) has no clamp on progress, so its lr rises again after
    `final_tokens`); the per-token schedule is expressed in steps, and warmup and decay
    are fractions of --total-steps (official 50 epochs: warmup 1 epoch = 2%, cosine over 20
    epochs = 40%) so short runs keep the same shape;
  * greedy tokens (k_obs = k_rew = 1) use argmax instead of a multinomial draw on a one-hot
    distribution (identical except for exact ties; draws no random numbers);
  * the official hopper-medium config replans every 5 steps (plan_freq 5); we keep the paper's
    every-step default and expose --plan-freq.

Quick run (CPU, one thread, 18 min of training; see README for the score it reached):
    python tt.py --env hopper --dataset medium --no-cuda --batch-size 64 --total-steps 1000 \
        --warmup-frac 0.05 --decay-frac 1 --time-budget-min 18 --bf16 --eval-episodes 0 --run-dir runs/tt_cpu
    python tt.py --env hopper --dataset medium --no-cuda --eval-only --checkpoint runs/tt_cpu/checkpoint.pt \
        --horizon 5 --beam-width 32 --eval-episodes 5 --max-episode-steps 500 --bf16
"""
from __future__ import annotations

import math
import os
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
except ImportError:  # pragma: no cover
    tqdm = common.tqdm


@dataclass
class Args:
    exp_name: str = "tt"
    """name of this experiment (used in the run directory)"""
    seed: int = 0
    """seed of the run (data sampling, dropout, planning, evaluation episodes)"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "hopper"
    """environment: hopper, halfcheetah or walker2d (Gymnasium v5)"""
    dataset: str = "medium"
    """dataset: random, medium, medium-replay, expert, medium-expert, or a Minari id"""
    dataset_path: Optional[str] = None
    """read the dataset from this .npz / .hdf5 file instead"""
    # --- data (Sec. 3.1) ---
    n_bins: int = 100
    """N, bins per dimension"""
    discretizer: str = "quantile"
    """quantile (official code) or uniform bins"""
    discount: float = 0.99
    """gamma of the value target and of the planner's score"""
    termination_penalty: float = -100.0
    """reward that replaces r_t at a true terminal (official code)"""
    seq_len: int = 10
    """transitions per training window"""
    max_path_length: int = 1000
    """episode length cap; window positions past it get no loss"""
    # --- model (Sec. 3.2) ---
    n_layer: int = 4
    """transformer layers"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 128
    """width"""
    dropout: float = 0.1
    """embedding, attention and residual dropout"""
    action_weight: float = 5.0
    """loss weight of action tokens"""
    reward_weight: float = 1.0
    """loss weight of reward tokens"""
    value_weight: float = 1.0
    """loss weight of value tokens"""
    # --- optimization ---
    learning_rate: float = 6e-4
    """AdamW learning rate"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    weight_decay: float = 0.1
    """weight decay on matmul weights only"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    batch_size: int = 256
    """windows per step"""
    total_steps: int = 195_313
    """training steps (official: 50 epochs of 1M windows at batch 256)"""
    warmup_frac: float = 0.02
    """linear warmup, fraction of total_steps (official: 1 of 50 epochs)"""
    decay_frac: float = 0.4
    """the cosine decay to 0.1 x lr ends here, fraction of total_steps (official: 20 of 50 epochs)"""
    time_budget_min: Optional[float] = None
    """stop training after this many minutes (CPU budget runs; the schedule keeps total_steps)"""
    # --- planning (Sec. 3.3) ---
    horizon: Optional[int] = None
    """planning horizon H (default 15, or the official per-dataset override)"""
    beam_width: Optional[int] = None
    """beam width (default 128, or the official per-dataset override)"""
    n_expand: int = 2
    """candidates per beam at each step"""
    cdf_act: float = 0.6
    """actions are sampled from the top (1 - cdf_act) of probability mass"""
    max_context_transitions: int = 5
    """transitions of history the planner conditions on"""
    plan_freq: int = 1
    """replan every this many steps (1: every step)"""
    kv_cache: bool = True
    """plan with the key-value cache (--no-kv-cache: recompute the full context per token)"""
    max_episode_steps: Optional[int] = None
    """cap evaluation episodes at this many steps (default: the env's limit)"""
    # --- runs ---
    eval_every: int = 0
    """evaluate every this many steps (0: only at the end; planning is expensive)"""
    eval_episodes: int = 10
    """evaluation episodes, run in parallel and planned in one batch"""
    log_every: int = 100
    """log losses every this many steps"""
    save_every: int = 1000
    """write checkpoint.pt every this many steps"""
    resume: Optional[str] = None
    """continue training from this checkpoint"""
    eval_only: bool = False
    """only evaluate --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    bf16: bool = False
    """bfloat16 autocast for training and planning (fp32 is the default, for fidelity)"""
    run_dir: Optional[str] = None
    """run directory (default runs/{env}__{exp_name}__{seed}__{time})"""


# Official per-dataset planning overrides (config/offline.py of the official code; the beam 32
# of halfcheetah is from an earlier version of that file).
PLAN_DEFAULTS = dict(horizon=15, beam_width=128)
PLAN_OVERRIDES = {
    ("halfcheetah", "medium"): dict(horizon=5, beam_width=32),
    ("halfcheetah", "medium-replay"): dict(horizon=5, beam_width=32),
    ("halfcheetah", "medium-expert"): dict(horizon=5),
    ("walker2d", "medium-expert"): dict(horizon=5),
}


def plan_config(args: Args) -> dict:
    cfg = {**PLAN_DEFAULTS, **PLAN_OVERRIDES.get((args.env, args.dataset), {})}
    for k in ("horizon", "beam_width"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(n_expand=args.n_expand, cdf_act=args.cdf_act, discount=args.discount,
               context=args.max_context_transitions)
    if args.plan_freq > cfg["horizon"]:
        raise ValueError(f"--plan-freq {args.plan_freq} exceeds the horizon {cfg['horizon']}; "
                         f"lower --plan-freq or raise --horizon")
    return cfg


# ======================================================================================
# Data: per-dimension discretization (Sec. 3.1) and training windows
# ======================================================================================
class Discretizer:
    """N bins per dimension. thresholds: (N+1, D) bin edges; token i of dim d covers
    [thresholds[i, d], thresholds[i+1, d])."""

    def __init__(self, thresholds):
        self.th = torch.as_tensor(thresholds, dtype=torch.float32)  # (N+1, D)
        self.N = self.th.shape[0] - 1

    @classmethod
    def fit(cls, data: np.ndarray, n_bins: int, kind: str = "quantile") -> "Discretizer":
        if kind == "quantile":  # official: sorted data at N+1 evenly spaced ranks (min ... max)
            ranks = np.linspace(0, len(data) - 1, n_bins + 1).astype(int)
            th = np.sort(data, axis=0)[ranks]
        elif kind == "uniform":
            th = np.linspace(data.min(0), data.max(0), n_bins + 1)
        else:
            raise ValueError(f"unknown --discretizer {kind!r}: use quantile or uniform")
        return cls(th.astype(np.float32))

    def to(self, device):
        self.th = self.th.to(device)
        return self

    def discretize(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x (..., k) of dims start..start+k -> long tokens in [0, N-1]: largest i with x >= th[i]."""
        k = x.shape[-1]
        edges = self.th[:, start:start + k].T.contiguous()                 # (k, N+1)
        flat = x.reshape(-1, k).T.contiguous().to(edges.dtype)            # (k, M)
        idx = torch.searchsorted(edges, flat, right=True) - 1
        return idx.clamp(0, self.N - 1).T.reshape(x.shape)

    def reconstruct(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Tokens (..., k) -> bin midpoints (the stop token N is clipped to the last bin)."""
        k = idx.shape[-1]
        mids = (self.th[:-1, start:start + k] + self.th[1:, start:start + k]) / 2   # (N, k)
        flat = idx.reshape(-1, k).clamp(0, self.N - 1)
        return torch.gather(mids, 0, flat).reshape(idx.shape)

    def expectation(self, probs: torch.Tensor, dim: int) -> torch.Tensor:
        """E[x_dim] under probs (B, N+1) over tokens; the stop-token mass is dropped, not
        renormalized (official `rew_val_expectation`)."""
        mids = (self.th[:-1, dim] + self.th[1:, dim]) / 2                 # (N,)
        return probs[:, :self.N].float() @ mids


def build_transitions(data: dict, gamma: float, penalty: float):
    """Per episode [s, a, r, V] rows (Sec. 3.1): r_t -> penalty at true terminals, and
    V_t = sum_k gamma^k r_{t+1+k} (excludes r_t). Returns (joined (M, D) float32, episode lengths)."""
    rows, lengths = [], []
    for ep in common.split_episodes(data):
        r = ep["rewards"].astype(np.float64).copy()
        r[ep["terminals"]] = penalty
        G = common.returns_to_go(r, gamma)                      # G_t = r_t + gamma G_{t+1}
        V = np.append(G[1:], 0.0)                               # V_t = G_{t+1}
        rows.append(np.concatenate([ep["observations"], ep["actions"], r[:, None], V[:, None]], 1))
        lengths.append(len(r))
    return np.concatenate(rows).astype(np.float32), np.array(lengths)


class WindowSampler:
    """Windows of `seq_len` transitions as flat token rows, on the device. Each episode is
    followed by seq_len-1 rows of stop tokens; a window may start at steps 0..len-2 of an
    episode (official `SequenceDataset` indices)."""

    def __init__(self, tokens: np.ndarray, lengths, seq_len: int, stop: int, max_path_length: int,
                 device, seed: int):
        D = tokens.shape[1]
        pad = np.full((seq_len - 1, D), stop, dtype=np.int16)
        parts, starts, steps0, off = [], [], [], 0
        for L, ep in zip(lengths, np.split(tokens.astype(np.int16), np.cumsum(lengths)[:-1])):
            parts += [ep, pad]
            n = max(L - 1, 1)
            starts.append(off + np.arange(n))
            steps0.append(np.arange(n))
            off += L + seq_len - 1
        self.tokens = torch.as_tensor(np.concatenate(parts), device=device)      # (rows, D) int16
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)     # (n_windows,)
        self.step0 = torch.as_tensor(np.concatenate(steps0), device=device)      # time index of row 0
        self.seq_len, self.D, self.max_path_length = seq_len, D, max_path_length
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def __len__(self):
        return len(self.starts)

    def sample(self, batch_size: int):
        i = torch.randint(len(self.starts), (batch_size,), device=self.starts.device, generator=self.gen)
        k = torch.arange(self.seq_len, device=i.device)
        rows = self.starts[i, None] + k                                          # (B, K)
        seq = self.tokens[rows].long().reshape(batch_size, -1)                   # (B, K*D)
        valid = (self.step0[i, None] + k) < self.max_path_length                 # (B, K)
        mask = valid[:, :, None].expand(-1, -1, self.D).reshape(batch_size, -1)  # (B, K*D)
        return seq[:, :-1], seq[:, 1:], mask[:, :-1].float()


# ======================================================================================
# Model: GPT with the value-column mask and per-position heads (Sec. 3.2)
# ======================================================================================
class KVCache:
    """Keys / values of the current context window, per layer: (rows, heads, max_len, head_dim)."""

    def __init__(self, n_layer: int, max_len: int, start: int):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.max_len, self.start, self.len = max_len, start, 0

    def gather(self, idx: torch.Tensor):
        """Beam selection / expansion: row r of the new cache is row idx[r] of the old one."""
        for i in range(len(self.k)):
            self.k[i], self.v[i] = self.k[i][idx], self.v[i][idx]


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, p: float):
        super().__init__()
        self.n_head, self.p = n_head, p
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)  # the official key / query / value Linears, fused
        self.proj = nn.Linear(d, d)
        self.resid_drop = nn.Dropout(p)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))

    def forward(self, x, mask, cache: Optional[KVCache], layer: int, pos0: int, last_only: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:  # write this chunk's keys / values, attend to the whole window
            if cache.k[layer] is None:
                shape = (B, self.n_head, cache.max_len, C // self.n_head)
                cache.k[layer] = k.new_empty(shape)
                cache.v[layer] = v.new_empty(shape)
            cache.k[layer][:, :, pos0:pos0 + T] = k
            cache.v[layer][:, :, pos0:pos0 + T] = v
            k, v = cache.k[layer][:, :, :pos0 + T], cache.v[layer][:, :, :pos0 + T]  # (B, h, S, hd)
        if last_only:  # last layer of a cached pass: keys / values of all positions, output of the last only
            x, q, mask, T = x[:, -1:], q[:, :, -1:], mask[-1:], 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)  # (B, h, T, hd)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Input: per-dimension tokens (0..N-1, N = stop) of a window that starts at a transition
    boundary; token at window position p is dimension p mod D."""

    def __init__(self, obs_dim: int, act_dim: int, N: int, block_size: int, n_layer=4, n_head=4,
                 n_embd=128, dropout=0.1):
        super().__init__()
        D = obs_dim + act_dim + 2
        self.obs_dim, self.act_dim, self.D, self.N, self.block_size = obs_dim, act_dim, D, N, block_size
        self.tok_emb = nn.Embedding(N * D + 1, n_embd)            # per-dimension vocabularies + stop
        self.pos_emb = nn.Parameter(torch.zeros(block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Parameter(torch.empty(D, n_embd, N + 1))  # one head per position in a transition
        self.apply(self._init)
        nn.init.normal_(self.head, std=0.02)
        # Sec. 3.2: causal, and no query ever attends to a value-token column. Built once.
        pos = torch.arange(block_size)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] % D != D - 1)     # (T, T) True = attend
        self.register_buffer("mask", mask, persistent=False)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def offset_tokens(self, idx, pos0: int = 0):
        """Per-dimension vocabularies: token i of dimension d -> i + d * N; stop (N) -> N * D."""
        dim = torch.arange(pos0, pos0 + idx.shape[1], device=idx.device) % self.D
        return torch.where(idx == self.N, self.N * self.D, idx + dim * self.N)

    def forward(self, idx, pos0: int = 0, cache: Optional[KVCache] = None, last_only: bool = False):
        """idx (B, T): tokens at window positions pos0..pos0+T-1 -> logits (B, T or 1, N+1)
        over the NEXT token. With a cache, positions < pos0 come from it."""
        B, T = idx.shape
        if pos0 + T > self.block_size:
            raise ValueError(f"window of {pos0 + T} tokens exceeds the block size {self.block_size}")
        dim = torch.arange(pos0, pos0 + T, device=idx.device) % self.D          # dimension of each token
        x = self.drop(self.tok_emb(self.offset_tokens(idx, pos0)) + self.pos_emb[pos0:pos0 + T])  # (B, T, C)
        mask = self.mask[pos0:pos0 + T, :pos0 + T]                             # (T, S)
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):  # with a cache, the last layer works on the last position only
            x = blk(x, mask, cache, i, pos0, last_only=last_only and cache is not None and i == n - 1)
        if last_only:
            x, dim = x[:, -1:], dim[-1:]
        x = self.ln_f(x)
        # the output at a position of dimension d predicts dimension d+1 with head d
        return torch.einsum("btc,tcv->btv", x, self.head[dim])                # (B, T, N+1)

    def loss(self, x, y, mask, weights):
        logits = self(x)                                                       # (B, T, N+1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none")
        return (ce.view_as(mask) * weights[: x.shape[1]] * mask).mean()        # official: mean over all

    def token_weights(self, seq_len, action_w, reward_w, value_w, device):
        """Loss weight of each TARGET position: obs 1 / act 5 / r 1 / V 1, shifted by one."""
        w = torch.cat([torch.ones(self.obs_dim), torch.full((self.act_dim,), action_w),
                       torch.tensor([reward_w, value_w])]).repeat(seq_len)[1:]
        return w.to(device)

    def param_groups(self, weight_decay):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight") and p.dim() >= 2
                 and "emb" not in n] + [self.head]
        ids = {id(p) for p in decay}
        return [dict(params=decay, weight_decay=weight_decay),
                dict(params=[p for p in self.parameters() if id(p) not in ids], weight_decay=0.0)]


# ======================================================================================
# Planner: beam search (Sec. 3.3) over a batch of environments, with or without a KV cache
# ======================================================================================
class Stream:
    """Rows of token sequences being extended; gives next-token logits at the last token.
    The window is the official one: at most `block` tokens, cropped a whole transition at a
    time so that it always starts at s^0."""

    def __init__(self, model: GPT, x: torch.Tensor, block: int, use_cache: bool):
        self.model, self.x, self.block, self.use_cache = model, x, block, use_cache
        self.cache, self.pending = None, None

    def window_start(self, L: int) -> int:
        D = self.model.D
        return 0 if L <= self.block else -(-(L - self.block) // D) * D

    def logits(self) -> torch.Tensor:
        L = self.x.shape[1]
        s = self.window_start(L)
        if not self.use_cache:  # official: one full forward of the window per token
            return self.model(self.x[:, s:], last_only=True)[:, 0]
        c = self.cache
        if c is None or c.start != s:  # the window moved: every position changed -> refill
            self.pending = None
            c, out = self.refill(s)
        else:
            if self.pending is not None:  # apply beam selection / expansion to the cache rows
                c.gather(self.pending)
                self.pending = None
            out = self.model(self.x[:, s + c.len:], pos0=c.len, cache=c, last_only=True)
        c.len = L - s
        return out[:, 0]

    def refill(self, s: int):
        """Fill a new cache with the window x[:, s:], one transition-sized chunk at a time,
        computing each distinct window prefix once (beams share their ancestors and the real
        context; a token's keys / values depend only on the window up to it). Exact."""
        w = self.x[:, s:]                                                   # (R, W)
        c = self.cache = KVCache(len(self.model.blocks), self.block, s)
        D, R, W = self.model.D, w.shape[0], w.shape[1]
        prev = None
        for c0 in range(0, W, D):
            c1 = min(W, c0 + D)
            uniq, inv = torch.unique(w[:, :c1], dim=0, return_inverse=True)   # (U, c1), (R,)
            rep = torch.zeros(len(uniq), dtype=torch.long, device=w.device).scatter_(
                0, inv, torch.arange(R, device=w.device))                     # one row per prefix
            if prev is not None:
                c.gather(prev[rep])                                           # cache rows: U_prev -> U
            out = self.model(uniq[:, c0:c1], pos0=c0, cache=c, last_only=True)
            prev = inv
        c.gather(prev)                                                        # U -> R rows
        return c, out[prev]

    def append(self, tok: torch.Tensor):
        self.x = torch.cat([self.x, tok[:, None]], 1)

    def select(self, idx: torch.Tensor):
        self.x = self.x[idx]
        if self.cache is not None:
            self.pending = idx if self.pending is None else self.pending[idx]


def filter_cdf(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Drop the least likely tokens whose cumulative mass is below `threshold` (official)."""
    probs = logits.softmax(-1)
    sorted_p, _ = probs.sort(-1)
    below = sorted_p.cumsum(-1) < threshold
    cut = (below * torch.arange(probs.shape[-1], device=probs.device)).argmax(-1)
    thr = sorted_p.gather(-1, cut[:, None])
    return logits.masked_fill(probs <= thr, -1000.0)


def sample_tokens(stream: Stream, n: int, gen, cdf=None, greedy=False):
    """Extend every row by n tokens; returns the raw probabilities (R, n, N+1)."""
    probs = []
    for _ in range(n):
        logits = stream.logits().float()
        probs.append(logits.softmax(-1))
        if greedy:
            tok = logits.argmax(-1)
        else:
            if cdf is not None:
                logits = filter_cdf(logits, cdf)
            tok = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
        stream.append(tok)
    return torch.stack(probs, 1)


@torch.no_grad()
def beam_plan(model: GPT, disc: Discretizer, prefix: torch.Tensor, horizon: int, beam_width: int,
              n_expand: int, cdf_act: float = 0.6, discount: float = 0.99, context: int = 5,
              use_cache: bool = True, gen=None, amp: bool = False):
    """Beam search for E environments at once. prefix (E, L): each env's last `context`
    transitions and current observation tokens. Returns the best plan per env (E, H, D)
    tokens and its score (E,)."""
    E, D, B = prefix.shape[0], model.D, beam_width
    obs_dim, act_dim, dev = model.obs_dim, model.act_dim, prefix.device
    block = min(model.block_size, context * D - 1)
    stream = Stream(model, prefix.repeat_interleave(B, 0), block, use_cache)  # (E*B, L)
    rewards = torch.zeros(E * B, horizon + 1, device=dev)
    discounts = discount ** torch.arange(horizon + 1, device=dev, dtype=torch.float32)
    env_base = torch.arange(E, device=dev)[:, None]
    # expansion index: per env, tile its B beams n_expand times (official x.repeat(n_expand, 1))
    expand = (env_base[:, None] * B + torch.arange(B, device=dev)).expand(E, n_expand, B).reshape(-1)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        for t in range(horizon):
            stream.select(expand)
            rewards = rewards[expand]
            sample_tokens(stream, act_dim, gen, cdf=cdf_act)                      # a_t ~ top 40% mass
            p = sample_tokens(stream, 2, gen, greedy=True)                        # r_t, V_t tokens
            rewards[:, t] = disc.expectation(p[:, 0], D - 2)                      # E[r_t]
            rewards[:, t + 1] = disc.expectation(p[:, 1], D - 1)                  # E[V_t]
            values = (rewards * discounts).sum(-1).view(E, B * n_expand)          # sum g^i r_i + g^(t+1) V
            values, inds = values.topk(B, dim=1)                                  # (E, B)
            keep = (inds + env_base * B * n_expand).reshape(-1)
            stream.select(keep)
            rewards = rewards[keep]
            if t < horizon - 1:
                sample_tokens(stream, obs_dim, gen, greedy=True)                  # s_{t+1} greedy
    plans = stream.x.view(E, B, -1, D)[:, :, -horizon:]                           # (E, B, H, D)
    best = values.argmax(1)
    return plans[torch.arange(E, device=dev), best], values.max(1).values


class TTPolicy:
    """Batched policy for common.evaluate: plans for every running episode in one call."""

    def __init__(self, model: GPT, disc: Discretizer, cfg: dict, use_cache=True, plan_freq=1,
                 seed=0, amp=False):
        self.model, self.disc, self.cfg = model, disc, cfg
        self.use_cache, self.plan_freq, self.amp = use_cache, plan_freq, amp
        self.dev = next(model.parameters()).device
        self.gen = torch.Generator(device=self.dev)
        self.gen.manual_seed(seed)

    def reset(self, n: int):
        self.context = torch.zeros(n, 0, self.model.D, dtype=torch.long, device=self.dev)  # (n, k, D)
        self.active = torch.ones(n, dtype=torch.bool, device=self.dev)
        self.plans = torch.zeros(n, self.cfg["horizon"], self.model.D, dtype=torch.long, device=self.dev)
        self.t = 0

    def __call__(self, obs):
        m, c = self.model, self.cfg
        obs_tok = self.disc.discretize(torch.as_tensor(obs, device=self.dev))           # (n, obs)
        if self.t % self.plan_freq == 0:
            rows = self.active.nonzero()[:, 0]
            ctx = self.context[rows].reshape(len(rows), -1)                             # (E, k*D)
            prefix = torch.cat([ctx, obs_tok[rows]], 1)
            plans, _ = beam_plan(m, self.disc, prefix, c["horizon"], c["beam_width"], c["n_expand"],
                                 c["cdf_act"], c["discount"], c["context"], self.use_cache, self.gen, self.amp)
            self.plans[rows] = plans
        j = self.t % self.plan_freq
        self.obs_tok = obs_tok
        self.act_tok = self.plans[:, j, m.obs_dim:m.obs_dim + m.act_dim]                # (n, act)
        return self.disc.reconstruct(self.act_tok, m.obs_dim).cpu().numpy()

    def observe(self, rewards, dones):
        m = self.model
        r = self.disc.discretize(torch.as_tensor(rewards, device=self.dev)[:, None], m.D - 2)
        v = self.disc.discretize(torch.zeros_like(r, dtype=torch.float32), m.D - 1)  # placeholder (masked)
        trans = torch.cat([self.obs_tok, self.act_tok, r, v], 1)                         # (n, D)
        self.context = torch.cat([self.context, trans[:, None]], 1)[:, -self.cfg["context"]:]
        self.active &= ~torch.as_tensor(dones, device=self.dev)
        self.t += 1


# ======================================================================================
# Training and evaluation
# ======================================================================================
def lr_lambda(args: Args):
    warm = max(1, int(args.warmup_frac * args.total_steps))
    end = max(warm + 1, int(args.decay_frac * args.total_steps))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / (end - warm))
        return max(0.1, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def build_model(args: Args, obs_dim: int, act_dim: int, device) -> GPT:
    D = obs_dim + act_dim + 2
    return GPT(obs_dim, act_dim, args.n_bins, args.seq_len * D - 1, args.n_layer, args.n_head,
               args.n_embd, args.dropout).to(device)


def run_eval(model, disc, args: Args, device, seed: int) -> dict:
    model.eval()
    cfg = plan_config(args)
    pol = TTPolicy(model, disc, cfg, args.kv_cache, args.plan_freq, seed, args.bf16)
    t = time.time()
    res = common.evaluate(pol, args.env, n_episodes=args.eval_episodes, seed=seed, progress=True,
                          max_steps=args.max_episode_steps)
    steps = int(res["lengths"].sum())
    model.train()
    return {"eval/return_mean": float(res["returns"].mean()), "eval/return_std": float(res["returns"].std()),
            "eval/normalized_score": float(np.mean(res["normalized"])),
            "eval/length_mean": float(res["lengths"].mean()),
            "eval/seconds_per_step": (time.time() - t) / max(1, int(res["lengths"].max())),  # all envs planned at once
            "eval/env_steps": steps}


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    device = common.get_device(args.cuda)
    if os.environ.get("SEQRL_THREADS"):
        torch.set_num_threads(int(os.environ["SEQRL_THREADS"]))
    common.set_seed(args.seed)
    obs_dim, act_dim = common.env_dims(args.env)
    plan_config(args)  # validate planning flags early

    if args.eval_only:
        if args.checkpoint is None:
            raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by tt.py)")
        ck = common.load_checkpoint(args.checkpoint, "cpu", required=("model", "thresholds", "args"))
        saved = Args(**ck["args"])
        if (ck["obs_dim"], ck["act_dim"]) != (obs_dim, act_dim):
            raise ValueError(f"checkpoint is for obs/act dims {ck['obs_dim']}/{ck['act_dim']} "
                             f"(env {saved.env}) but --env {args.env} has {obs_dim}/{act_dim}; pass --env {saved.env}")
        for k in ("n_bins", "seq_len", "n_layer", "n_head", "n_embd"):
            setattr(args, k, getattr(saved, k))
        model = build_model(args, obs_dim, act_dim, device)
        model.load_state_dict(ck["model"])
        disc = Discretizer(ck["thresholds"]).to(device)
        metrics = run_eval(model, disc, args, device, args.seed)
        logger = common.RunLogger(args, "tt", args.run_dir, tensorboard=args.tensorboard, track=args.track)
        logger.log(ck["step"], **metrics)
        logger.close()
        print(f"[tt] eval-only: return {metrics['eval/return_mean']:.1f}, "
              f"normalized {metrics['eval/normalized_score']:.1f}")
        return metrics

    # ---- data (Sec. 3.1) ----
    data = common.load_dataset(args.env, args.dataset, path=args.dataset_path)
    joined, lengths = build_transitions(data, args.discount, args.termination_penalty)   # (M, D)
    ck = common.load_checkpoint(args.resume, "cpu", required=("model", "optimizer", "rng")) if args.resume else None
    disc = Discretizer(ck["thresholds"] if ck else Discretizer.fit(joined, args.n_bins, args.discretizer).th)
    tokens = disc.discretize(torch.as_tensor(joined)).numpy()                            # (M, D)
    disc.to(device)
    sampler = WindowSampler(tokens, lengths, args.seq_len, args.n_bins, args.max_path_length, device, args.seed)

    # ---- model and optimizer (Sec. 3.2) ----
    model = build_model(args, obs_dim, act_dim, device)
    opt = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.learning_rate, betas=tuple(args.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    weights = model.token_weights(args.seq_len, args.action_weight, args.reward_weight, args.value_weight, device)
    step = 0
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = ck["step"]
        common.set_rng_state(ck["rng"])
        sampler.gen.set_state(ck["sampler_rng"])
    logger = common.RunLogger(args, "tt", args.run_dir, tensorboard=args.tensorboard, track=args.track)
    ckpt_path = logger.dir / "checkpoint.pt"

    def save():
        common.save_checkpoint(ckpt_path, dict(
            model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step,
            rng=common.rng_state(), sampler_rng=sampler.gen.get_state(), thresholds=disc.th.cpu(),
            obs_dim=obs_dim, act_dim=act_dim, args=asdict(args)))

    print(f"[tt] {args.env}/{args.dataset}: {len(sampler)} windows, D={model.D}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")
    metrics, last_eval = {}, float("nan")
    bar = tqdm(total=args.total_steps, initial=step, desc="tt", unit="step")
    t0, s0 = time.time(), step
    model.train()
    try:
        while step < args.total_steps:
            if args.time_budget_min and time.time() - t0 > 60 * args.time_budget_min:
                print(f"\n[tt] time budget of {args.time_budget_min} min reached at step {step}")
                break
            x, y, mask = sampler.sample(args.batch_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model.loss(x, y, mask, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == args.total_steps:
                sps = (step - s0) / (time.time() - t0)
                logger.log(step, **{"losses/loss": loss.item(), "charts/learning_rate": sched.get_last_lr()[0],
                                    "charts/SPS": sps})
                bar.set_postfix(loss=f"{loss.item():.3f}", score=f"{last_eval:.1f}")
            if args.save_every and step % args.save_every == 0:
                save()
            if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                metrics = run_eval(model, disc, args, device, args.seed)
                last_eval = metrics["eval/normalized_score"]
                logger.log(step, **metrics)
    except KeyboardInterrupt:
        save()
        print(f"\n[tt] interrupted: checkpoint saved to {ckpt_path} (continue with --resume {ckpt_path})")
        raise
    finally:
        bar.close()
    save()
    metrics = {"losses/loss": loss.item() if step > s0 else float("nan"), "step": step,
               "train_seconds": time.time() - t0}
    if args.eval_episodes > 0:
        metrics.update(run_eval(model, disc, args, device, args.seed))
        logger.log(step, **{k: v for k, v in metrics.items() if k.startswith("eval/")})
        print(f"[tt] step {step}: return {metrics['eval/return_mean']:.1f}, "
              f"D4RL-normalized {metrics['eval/normalized_score']:.1f}")
    metrics["checkpoint"] = str(ckpt_path)
    logger.close()
    return metrics


if __name__ == "__main__":
    main()
