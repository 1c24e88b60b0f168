"""Gato's tokenization and a small generalist trained on token streams of several environments.

Paper: Reed et al. 2022, "A Generalist Agent" (Gato), arXiv 2205.06175, Sec. 2 and App. B-C.

What this file reproduces
- Tokenization exactly as Sec. 2.1 / App. B:
    text        any tokenizer callable -> ids in [0, 32000) (the paper uses SentencePiece, not a dependency)
    discrete    integers in [0, 1024)
    continuous  mu-law F(x) = sgn(x) ln(1 + mu|x|) / ln(1 + M mu), mu = 100, M = 256 (Eq. in App. B),
                clip to [-1, 1], 1024 uniform bins, shifted into [32000, 33024); decoded through the
                bin centre and the inverse mu-law
    images      16x16 patches in raster order, pixels scaled to [-1, 1] then divided by 4 (= sqrt of
                the patch size), patch row / column intervals quantized to 128 bins (App. C.2)
- Sequence layout (Sec. 2.1): a timestep is [observation tokens (nested keys in sorted order),
  separator '|', action tokens]; local position indices count tokens within a timestep (App. C.3);
  the loss mask is 1 only on action and text tokens (Sec. 2.2, Eq. 2).
- Training (Sec. 2.2-2.3): one causal transformer, one set of weights, masked cross-entropy over
  token streams of several tasks at once; 25% of the sequences of a batch get a demonstration of the
  same task prepended as a prompt, half taken from the episode end, half uniformly (Sec. 2.3);
  only episodes with at least 80% of the expert return are kept (Sec. 3, control datasets), the
  expert return being the maximum over windowed mean returns of the collected episodes.
- Deployment (Sec. 2.4, Fig. 3): a prompt demonstration, then each observation is tokenized and
  appended, action tokens are sampled one at a time, decoded and sent to the environment. Here the
  N evaluation environments of one task step in lockstep, each step is one batched prefill of the
  context into a key-value cache plus one cached forward per action token.

Named choices and deviations (with reasons)
- Scale: Gato's smallest model has 79M parameters, context 1024, batch 512, 1M steps (Sec. 2.3,
  Table on model sizes). Defaults here are that setting; the CPU demo below uses a tiny model and a
  short context (a hopper timestep is 15 tokens, a halfcheetah timestep 24).
- `--vocab action` keeps embedding / output rows only for ids [32000, 33026) (continuous bins,
  separator, pad) and takes the softmax over the 1024 bins: every token of the demo tasks lives
  there, token ids are unchanged, and the 33026-row tables (8.5M parameters, most of the AdamW
  time of a small model) shrink 32x. The default `full` is the paper's single table and softmax.
- Local positions index every token of a timestep (observations 0..n-1, separator n, actions
  n+1..); App. C.3 describes learned encodings for observation tokens; giving the separator and
  action tokens their own index is our choice and tells a small model which action dimension comes.
- Learned token embeddings for all integer tokens (one table, as Sec. 2.1 for text / discrete /
  continuous); image patches would be embedded by a ResNet block in Gato: `tokenize_image` is
  implemented and tested, but the demo tasks have no images, so the model has no image path.
- Prompt length (`--prompt-frac` of the context), the filter window (100 episodes), equal task
  sampling weights and the eval prompt (the last timesteps of one kept episode) are our choices;
  the paper does not fix them for this setting.
- Data: generated ARS "expert" datasets (see common.py), not Gato's data; the evaluation criterion
  is Gato's "at least 50% of expert" per task, expert = the dataset's mean episode return.

Quick run (CPU, 1 thread of a shared 2-core machine: 4560 steps in 9.5 minutes of training; reached
99% / 76% of the hopper / halfcheetah expert-dataset mean return, see README):
    python gato_tokens.py --n-layer 2 --n-embd 128 --n-head 4 --dropout 0.0 --seq-len 48 \
        --batch-size 64 --lr 1e-3 --warmup-steps 300 --total-steps 4560 --vocab action \
        --eval-every 2280 --eval-episodes 10 --temperature 0 --no-cuda
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import tqdm


@dataclass
class Args:
    exp_name: str = "gato_tokens"
    """name of this experiment (part of the run folder name)"""
    seed: int = 0
    """seed of python, numpy, torch and the batch sampler"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    envs: tuple[str, ...] = ("hopper", "halfcheetah")
    """the tasks trained at once by one model (Gym short names)"""
    dataset: str = "expert"
    """dataset of every task (common.load_dataset name); Gato trains on expert agents' episodes"""
    dataset_path: Optional[tuple[str, ...]] = None
    """one .npz / .hdf5 file per task of --envs, in the same order, instead of the cache"""
    filter_frac: float = 0.8
    """keep episodes whose return >= this fraction of the expert return (Sec. 3)"""
    filter_window: int = 100
    """episodes per window of the expert return (max over windowed mean returns); our choice"""
    n_layer: int = 8
    """transformer layers (Gato 79M: 8)"""
    n_embd: int = 768
    """embedding width (Gato 79M: 768)"""
    n_head: int = 24
    """attention heads (Gato 79M: 24)"""
    dropout: float = 0.1
    """dropout rate"""
    max_local_positions: int = 512
    """size of the local (within-timestep) position table"""
    seq_len: int = 1024
    """tokens per training sequence (Gato: 1024)"""
    batch_size: int = 512
    """sequences per batch (Gato: 512)"""
    lr: float = 1e-4
    """peak learning rate of AdamW (Gato: 1e-4)"""
    warmup_steps: int = 15_000
    """linear warm-up steps, then cosine decay to lr / 10 at --total-steps (Gato: 15k)"""
    weight_decay: float = 0.1
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient norm clip"""
    total_steps: int = 1_000_000
    """training steps (Gato: 1M)"""
    time_budget_min: Optional[float] = None
    """stop training after this many minutes of wall time (then evaluate and save)"""
    prompt_prob: float = 0.25
    """fraction of the sequences of a batch that get a prompt demonstration prepended (Sec. 2.3)"""
    prompt_end_prob: float = 0.5
    """fraction of prompts taken from an episode end; the rest start uniformly (Sec. 2.3)"""
    prompt_frac: float = 0.5
    """prompt length as a fraction of the timesteps that fit into --seq-len; our choice"""
    vocab: str = "full"
    """token tables: 'full' = all 33026 ids and a softmax over them (the paper); 'action' = only
    the continuous bins, separator and pad [32000, 33026), softmax over the 1024 bins (CPU setting)"""
    temperature: float = 1.0
    """sampling temperature of action tokens at evaluation; 0 = greedy (argmax)"""
    eval_prompt: bool = True
    """prompt evaluation episodes with a demonstration of the task (Sec. 2.4)"""
    eval_every: int = 10_000
    """evaluate every this many steps (and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes per task (run vectorized)"""
    max_episode_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's own limit)"""
    log_every: int = 100
    """log training losses every this many steps"""
    resume: Optional[str] = None
    """checkpoint to continue training from"""
    eval_only: bool = False
    """only evaluate --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    bf16: bool = False
    """bfloat16 autocast (CPU and GPU)"""
    run_dir: Optional[str] = None
    """run folder (default runs/{envs}__{exp_name}__{seed}__{time})"""


# ======================================================================================
# Tokenization (Sec. 2.1, App. B)
# ======================================================================================
TEXT_VOCAB = 32_000            # text ids [0, 32000) (SentencePiece in the paper)
DISCRETE_VOCAB = 1024          # discrete values [0, 1024)
N_BINS = 1024                  # continuous values: 1024 uniform bins ...
CONT_OFFSET = 32_000           # ... shifted into [32000, 33024)
SEPARATOR = CONT_OFFSET + N_BINS   # '|' between observation and action tokens (33024)
PAD = SEPARATOR + 1            # batch padding, never a target (33025)
VOCAB_SIZE = PAD + 1
IMAGE_PATCH = -1               # placeholder id of an image patch in a layout (patches embed separately)
PATCH = 16


def mu_law_encode(x, mu: float = 100.0, m: float = 256.0):
    """F(x) = sgn(x) ln(1 + mu|x|) / ln(1 + M mu)  (App. B); |x| = M maps to 1."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(m * mu)


def mu_law_decode(y, mu: float = 100.0, m: float = 256.0):
    """Inverse of mu_law_encode: x = sgn(y) ((1 + M mu)^|y| - 1) / mu."""
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(m * mu)) / mu


def tokenize_continuous(x) -> np.ndarray:
    """Floats (any shape, row-major) -> tokens in [32000, 33024): mu-law, clip to [-1, 1], 1024 bins."""
    y = np.clip(mu_law_encode(x), -1.0, 1.0)
    bins = np.minimum(np.floor((y + 1.0) * (N_BINS / 2)), N_BINS - 1).astype(np.int64)
    return bins + CONT_OFFSET


def detokenize_continuous(tokens) -> np.ndarray:
    """Tokens in [32000, 33024) -> floats through the bin centre and the inverse mu-law."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < CONT_OFFSET or tokens.max() >= CONT_OFFSET + N_BINS):
        raise ValueError(f"continuous tokens must lie in [{CONT_OFFSET}, {CONT_OFFSET + N_BINS}); got "
                         f"[{tokens.min()}, {tokens.max()}]: detokenize only the action / continuous part")
    centre = (tokens - CONT_OFFSET + 0.5) * (2.0 / N_BINS) - 1.0
    return mu_law_decode(centre)


def tokenize_discrete(x) -> np.ndarray:
    """Integers (any shape, row-major) in [0, 1024) -> the same integers as tokens."""
    a = np.asarray(x)
    if a.dtype.kind == "f":
        if not np.all(a == np.round(a)):
            raise ValueError("discrete values must be integers; use tokenize_continuous for floats")
        a = a.astype(np.int64)
    if a.dtype.kind not in "iub":
        raise ValueError(f"discrete values must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= DISCRETE_VOCAB):
        raise ValueError(f"discrete values must lie in [0, {DISCRETE_VOCAB}); got [{a.min()}, {a.max()}]")
    return a


def tokenize_text(text: str, text_tokenizer: Optional[Callable]) -> np.ndarray:
    """Any tokenizer callable str -> ids; ids must lie in [0, 32000) (SentencePiece in the paper)."""
    if text_tokenizer is None:
        raise ValueError("a text observation needs a text_tokenizer callable (str -> ids in [0, 32000))")
    ids = np.asarray(list(text_tokenizer(text)), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= TEXT_VOCAB):
        raise ValueError(f"text ids must lie in [0, {TEXT_VOCAB}); the tokenizer gave [{ids.min()}, {ids.max()}]")
    return ids


def tokenize_image(img, patch: int = PATCH, pos_bins: int = 128):
    """Image (H, W, C), uint8 in [0, 255] or float in [0, 1] -> (patches, positions) (App. C.2).

    patches:   (H/16 * W/16, 16 * 16 * C) float32 in raster order, pixels in [-1, 1] / 4
    positions: (n, 4) int64 = row_from, row_to, col_from, col_to: each patch's pixel interval
               normalized by the image size and quantized to `pos_bins` bins. Training samples a
               position uniformly in [from, to), evaluation uses the rounded mean (App. C.2).
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {img.shape}")
    h, w, c = img.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the {patch}x{patch} patch; resize or crop it")
    x = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    x = (x * 2.0 - 1.0) / math.sqrt(patch)                           # [-1, 1] / sqrt(16)
    nh, nw = h // patch, w // patch
    patches = x.reshape(nh, patch, nw, patch, c).transpose(0, 2, 1, 3, 4).reshape(nh * nw, -1)  # (n, 16*16*C)
    r, cc = np.divmod(np.arange(nh * nw), nw)                        # raster order
    q = lambda i, n: np.floor(i / n * pos_bins).astype(np.int64)     # normalized, quantized interval ends
    positions = np.stack([q(r, nh), q(r + 1, nh), q(cc, nw), q(cc + 1, nw)], 1)
    return patches, positions


def _leaves(obs, prefix=()):
    """Nested dicts flattened with keys in sorted (lexicographic) order (Sec. 2.1)."""
    if isinstance(obs, dict):
        for k in sorted(obs):
            yield from _leaves(obs[k], prefix + (k,))
    else:
        yield prefix, obs


def _tokenize_leaf(value, text_tokenizer):
    """-> (tokens, is_text, patches or None) for one observation / action leaf."""
    if isinstance(value, str):
        return tokenize_text(value, text_tokenizer), True, None
    a = np.asarray(value)
    if a.dtype == np.uint8 and a.ndim == 3:                         # an (H, W, C) image
        patches, _ = tokenize_image(a)
        return np.full(len(patches), IMAGE_PATCH, np.int64), False, patches
    if a.dtype.kind in "iub":
        return tokenize_discrete(a).reshape(-1), False, None
    return tokenize_continuous(a).reshape(-1), False, None


def layout_timestep(observation, action, text_tokenizer: Optional[Callable] = None) -> dict:
    """One timestep as [observation tokens, '|', action tokens] (Sec. 2.1).

    observation: an array, a string, or a nested dict of them (keys in sorted order); floats are
    continuous, integers discrete, str is text, uint8 (H, W, C) an image (IMAGE_PATCH placeholders,
    the patches returned aside). action: floats (continuous) or integers (discrete).
    Returns tokens, local_pos (index within the timestep, App. C.3), loss_mask (1 on action and
    text tokens, Eq. 2) and patches (list of (n, 768) arrays).
    """
    toks, mask, patches = [], [], []
    for _, leaf in _leaves(observation):
        t, is_text, p = _tokenize_leaf(leaf, text_tokenizer)
        toks.append(t)
        mask.append(np.full(len(t), int(is_text)))
        if p is not None:
            patches.append(p)
    toks.append(np.array([SEPARATOR]))
    mask.append(np.zeros(1, np.int64))
    a = np.asarray(action)
    act = tokenize_discrete(a).reshape(-1) if a.dtype.kind in "iub" else tokenize_continuous(a).reshape(-1)
    toks.append(act)
    mask.append(np.ones(len(act), np.int64))
    tokens = np.concatenate(toks).astype(np.int64)
    return dict(tokens=tokens, local_pos=np.arange(len(tokens)), loss_mask=np.concatenate(mask).astype(np.int64),
                patches=patches)


# ======================================================================================
# Data: tokenized episodes, the 80%-of-expert filter, prompt-conditioned batches
# ======================================================================================
def expert_return(returns, window: int) -> float:
    """Max over windowed mean returns of the episodes in collection order (data filtering, Sec. 3)."""
    r = np.asarray(returns, dtype=np.float64)
    w = max(1, min(window, len(r)))
    c = np.concatenate([[0.0], np.cumsum(r)])
    return float(((c[w:] - c[:-w]) / w).max())


class Task:
    """One environment's token stream: (N, n_t) tokens per transition, kept episodes, a demo prompt."""

    def __init__(self, env: str, data: dict, args: Args):
        self.env = env
        eps = common.split_episodes(data)
        rets = np.array([e["rewards"].sum() for e in eps])
        self.dataset_return = float(rets.mean())
        self.expert_return = expert_return(rets, args.filter_window)
        keep = rets >= args.filter_frac * self.expert_return if args.filter_frac > 0 else np.ones(len(rets), bool)
        self.n_obs, self.n_act = data["observations"].shape[1], data["actions"].shape[1]
        self.n_t = self.n_obs + 1 + self.n_act                       # tokens per timestep
        # (N, n_obs + 1 + n_act): the layout_timestep of every transition, vectorized
        self.tokens = np.concatenate([tokenize_continuous(data["observations"]),
                                      np.full((len(data["rewards"]), 1), SEPARATOR),
                                      tokenize_continuous(data["actions"])], 1).astype(np.int32)
        lengths = np.array([len(e["rewards"]) for e in eps])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.starts, self.lengths = starts[keep], lengths[keep]
        self.kept_return = float(rets[keep].mean())
        self.n_episodes, self.n_kept = len(eps), int(keep.sum())
        self.step_mask = np.r_[np.zeros(self.n_obs + 1), np.ones(self.n_act)].astype(bool)

    def summary(self) -> str:
        return (f"{self.env}: {self.n_kept}/{self.n_episodes} episodes kept (return >= filter x expert return "
                f"{self.expert_return:.0f}), dataset mean return {self.dataset_return:.0f}, kept mean {self.kept_return:.0f}, "
                f"{self.n_t} tokens / timestep")


def prompt_len(n_fit: int, args) -> int:
    """Prompt timesteps of a sequence of n_fit timesteps (at least one episode timestep stays)."""
    return 0 if n_fit < 2 else min(n_fit - 1, max(1, int(n_fit * args.prompt_frac)))


def sample_batch(tasks: list[Task], args: Args, rng: np.random.Generator):
    """B sequences of seq_len tokens (right-padded); the first round(prompt_prob * B) get a prompt.

    Returns numpy tokens (B, T), local_pos (B, T) and target indices into the flattened (B, T-1)
    predictions whose target token has loss mask 1 (Eq. 2), built here so the device never syncs.
    """
    B, T = args.batch_size, args.seq_len
    tokens = np.full((B, T), PAD, np.int64)
    pos = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), bool)
    n_prompted = int(round(args.prompt_prob * B))
    for b in range(B):
        task = tasks[rng.integers(len(tasks))]                       # equal task weights (our choice)
        n_fit = T // task.n_t
        parts = []
        p = prompt_len(n_fit, args) if b < n_prompted else 0
        if p:                                                        # Sec. 2.3 prompt: a kept episode of the same task
            e = rng.integers(len(task.starts))
            s, L = task.starts[e], task.lengths[e]
            k = min(p, L)
            off = L - k if rng.random() < args.prompt_end_prob else rng.integers(L - k + 1)
            parts.append(s + off + np.arange(k))
        e = rng.integers(len(task.starts))
        s, L = task.starts[e], task.lengths[e]
        k = min(n_fit - p, L)
        parts.append(s + rng.integers(L - k + 1) + np.arange(k))
        idx = np.concatenate(parts)
        seq = task.tokens[idx].reshape(-1)                           # (k_total * n_t,)
        n = len(seq)
        tokens[b, :n] = seq
        pos[b, :n] = np.tile(np.arange(task.n_t), len(idx))
        mask[b, :n] = np.tile(task.step_mask, len(idx))
    tgt = np.flatnonzero(mask[:, 1:].reshape(-1))                    # predictions at t whose target t+1 is masked in
    return tokens, pos, tgt


# ======================================================================================
# Model: token + local position embeddings, causal transformer (SDPA), KV cache
# ======================================================================================
class Block(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, dh)
        causal = True
        if cache is not None:
            if cache[0] is not None:                                 # decode: one new token attends to all
                if T != 1:
                    raise ValueError("cached decoding appends one token at a time after the prefill")
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (B, h, T_past + 1, dh)
                causal = False
            cache[0], cache[1] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))  # (B, T, d)
        return x + self.mlp(self.ln2(x))


class GatoModel(nn.Module):
    """Decoder-only transformer over Gato tokens (Sec. 2.2): embeddings + local positions (App. C.3)."""

    def __init__(self, args: Args):
        super().__init__()
        d = args.n_embd
        if d % args.n_head:
            raise ValueError(f"--n-embd {d} must be divisible by --n-head {args.n_head}")
        self.id_lo = CONT_OFFSET if args.vocab == "action" else 0  # first token id the tables hold
        self.tok_emb = nn.Embedding(VOCAB_SIZE - self.id_lo, d)
        self.pos_emb = nn.Embedding(args.max_local_positions, d)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList([Block(d, args.n_head, args.dropout) for _ in range(args.n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB_SIZE - self.id_lo)
        self.out_lo, self.out_hi = (CONT_OFFSET, CONT_OFFSET + N_BINS) if args.vocab == "action" else (0, VOCAB_SIZE)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens, local_pos, caches=None):
        """tokens, local_pos: (B, T) -> hidden (B, T, d). caches: list of [k, v] per layer or None."""
        x = self.drop(self.tok_emb(tokens - self.id_lo) + self.pos_emb(local_pos))  # (B, T, d)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.ln_f(x)

    def logits(self, h, lo=None, hi=None):
        """Logits over the token range [lo, hi) (default: the training softmax range)."""
        lo = self.out_lo if lo is None else lo
        hi = self.out_hi if hi is None else hi
        lo, hi = lo - self.id_lo, hi - self.id_lo
        return F.linear(h, self.head.weight[lo:hi], self.head.bias[lo:hi])

    def loss(self, tokens, local_pos, tgt):
        """Masked next-token cross-entropy, Eq. 2: only action (and text) targets count."""
        h = self(tokens, local_pos)[:, :-1].reshape(-1, self.tok_emb.embedding_dim)  # (B*(T-1), d)
        y = tokens[:, 1:].reshape(-1)[tgt] - self.out_lo
        return F.cross_entropy(self.logits(h[tgt]).float(), y)


# ======================================================================================
# Policy: prompt + recent timesteps, autoregressive action tokens with a KV cache (Sec. 2.4)
# ======================================================================================
class GatoPolicy:
    """Batched policy for common.evaluate: N envs of one task in lockstep share one context length."""

    def __init__(self, model: GatoModel, task: dict, args: Args, device, generator: torch.Generator,
                 kv_cache: bool = True):
        self.model, self.args, self.device, self.gen, self.kv_cache = model, args, device, generator, kv_cache
        self.n_obs, self.n_act, self.n_t = task["n_obs"], task["n_act"], task["n_t"]
        n_fit = args.seq_len // self.n_t
        p = prompt_len(n_fit, args) if args.eval_prompt else 0
        self.prompt = np.asarray(task["prompt"])[-p * self.n_t:] if p else np.zeros(0, np.int64)  # demo tail
        self.window = n_fit - p                                      # recent timesteps kept, incl. the current one
        self.pos_step = np.arange(self.n_t)

    def reset(self, n: int):
        self.history = np.zeros((n, 0, self.n_t), np.int64)          # (N, t, n_t) past timesteps

    @torch.no_grad()
    def __call__(self, obs):
        n = obs.shape[0]
        past = self.history[:, -(self.window - 1):] if self.window > 1 else self.history[:, :0]
        cur = np.concatenate([tokenize_continuous(obs), np.full((n, 1), SEPARATOR)], 1)  # (N, n_obs + 1)
        ctx = np.concatenate([np.broadcast_to(self.prompt, (n, len(self.prompt))),
                              past.reshape(n, -1), cur], 1)          # (N, L)
        pos = np.concatenate([np.tile(self.pos_step, len(self.prompt) // self.n_t + past.shape[1]),
                              self.pos_step[: self.n_obs + 1]])
        tok = torch.as_tensor(ctx, device=self.device)
        pos_t = torch.as_tensor(np.broadcast_to(pos, ctx.shape).copy(), device=self.device)
        caches = [[None, None] for _ in self.model.blocks]
        acts = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            h = self.model(tok, pos_t, caches)[:, -1]                # (N, d) after the separator
            for j in range(self.n_act):
                logits = self.model.logits(h, CONT_OFFSET, CONT_OFFSET + N_BINS).float()  # action spec: continuous
                if self.args.temperature > 0:
                    probs = torch.softmax(logits / self.args.temperature, -1)
                    a = torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
                else:
                    a = logits.argmax(-1)
                a = a + CONT_OFFSET                                  # (N,)
                acts.append(a)
                if j + 1 < self.n_act:                               # feed the sampled token back
                    p = torch.full((n, 1), self.n_obs + 1 + j, device=self.device)
                    if self.kv_cache:                                # one new token against the cache
                        h = self.model(a[:, None], p, caches)[:, -1]
                    else:                                            # (benchmark baseline) recompute all
                        tok, pos_t = torch.cat([tok, a[:, None]], 1), torch.cat([pos_t, p], 1)
                        h = self.model(tok, pos_t)[:, -1]
        a_tok = torch.stack(acts, 1).cpu().numpy()                   # (N, n_act), one copy per env step
        self.history = np.concatenate([self.history, np.concatenate([cur, a_tok], 1)[:, None]], 1)[:, -self.window:]
        return np.clip(detokenize_continuous(a_tok), -1.0, 1.0).astype(np.float32)


def evaluate(model, meta: dict, args: Args, device, step: int) -> dict:
    """Every task, vectorized over --eval-episodes envs; returns flat metrics."""
    model.eval()
    out = {}
    gen = torch.Generator(device=device).manual_seed(args.seed + 10_000 + step)
    for env, task in meta.items():
        pol = GatoPolicy(model, task, args, device, gen)
        r = common.evaluate(pol, env, n_episodes=args.eval_episodes, seed=args.seed + 1000,
                            max_steps=args.max_episode_steps)
        ret = float(r["returns"].mean())
        out[f"eval/{env}/return_mean"] = ret
        out[f"eval/{env}/return_std"] = float(r["returns"].std())
        out[f"eval/{env}/normalized_score"] = float(r["normalized"].mean())
        out[f"eval/{env}/expert_fraction"] = ret / task["dataset_return"]
    out["eval/normalized_score"] = float(np.mean([out[f"eval/{e}/normalized_score"] for e in meta]))
    out["eval/min_expert_fraction"] = float(min(out[f"eval/{e}/expert_fraction"] for e in meta))
    model.train()
    return out


# ======================================================================================
# Training
# ======================================================================================
def load_tasks(args: Args) -> list[Task]:
    if args.dataset_path is not None and len(args.dataset_path) != len(args.envs):
        raise ValueError(f"--dataset-path needs one file per task of --envs ({len(args.envs)}), "
                         f"got {len(args.dataset_path)}")
    tasks = []
    for i, env in enumerate(args.envs):
        path = None if args.dataset_path is None else args.dataset_path[i]
        data = common.load_dataset(env, args.dataset, path=path)
        task = Task(env, data, args)
        if task.n_t > args.seq_len:
            raise ValueError(f"--seq-len {args.seq_len} is shorter than one {env} timestep ({task.n_t} tokens)")
        if task.n_t > args.max_local_positions:
            raise ValueError(f"{env} timesteps have {task.n_t} tokens > --max-local-positions {args.max_local_positions}")
        tasks.append(task)
    return tasks


def task_meta(tasks: list[Task], rng: np.random.Generator) -> dict:
    """What evaluation needs per task (saved in checkpoints): sizes, returns, a demo prompt."""
    meta = {}
    for t in tasks:
        e = rng.integers(len(t.starts))                              # one kept (successful) episode
        demo = t.tokens[t.starts[e]: t.starts[e] + t.lengths[e]].reshape(-1)
        meta[t.env] = dict(n_obs=t.n_obs, n_act=t.n_act, n_t=t.n_t, dataset_return=t.dataset_return,
                           expert_return=t.expert_return, prompt=demo[-64 * t.n_t:].astype(np.int64))
    return meta


def make_optimizer(model, args: Args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=args.lr, betas=(0.9, 0.95))

    def schedule(step):  # linear warm-up, cosine decay to lr / 10 (Sec. 2.3 / App. C.1)
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        frac = min(1.0, (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    if args.vocab not in ("full", "action"):
        raise ValueError(f"--vocab must be 'full' or 'action', got {args.vocab!r}")
    common.set_seed(args.seed)
    device = common.get_device(args.cuda)

    if args.eval_only:
        if args.checkpoint is None:
            raise ValueError("--eval-only needs --checkpoint PATH")
        ck = common.load_checkpoint(args.checkpoint, required=("model", "args", "meta"))
        train_args = Args(**ck["args"])
        missing = [e for e in args.envs if e not in ck["meta"]]
        if missing:
            raise ValueError(f"checkpoint {args.checkpoint} was trained on {list(ck['meta'])}, not on {missing}; "
                             f"pass --envs among those")
        model = GatoModel(train_args).to(device)
        model.load_state_dict(ck["model"])
        ev_args = dataclasses.replace(train_args, eval_episodes=args.eval_episodes, temperature=args.temperature,
                                      eval_prompt=args.eval_prompt, max_episode_steps=args.max_episode_steps,
                                      seed=args.seed, bf16=args.bf16)
        metrics = evaluate(model, {e: ck["meta"][e] for e in args.envs}, ev_args, device, ck["step"])
        print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics

    ck = None
    if args.resume:
        ck = common.load_checkpoint(args.resume, required=("model", "optimizer", "scheduler", "step", "rng", "meta"))
        if tuple(ck["args"]["envs"]) != tuple(args.envs):
            raise ValueError(f"checkpoint {args.resume} trained {ck['args']['envs']}, not --envs {list(args.envs)}")
    tasks = load_tasks(args)
    for t in tasks:
        print("[gato]", t.summary(), flush=True)
    data_rng = np.random.default_rng(args.seed)
    meta = task_meta(tasks, data_rng)
    model = GatoModel(args).to(device)
    opt, sched = make_optimizer(model, args)
    step = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = ck["step"]
        common.set_rng_state(ck["rng"])
        data_rng.bit_generator.state = ck["data_rng"]
        meta = ck["meta"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[gato] {n_params / 1e6:.2f}M parameters on {device}", flush=True)

    run_dir = args.run_dir or f"runs/{'+'.join(args.envs)}__{args.exp_name}__{args.seed}__{int(time.time())}"
    logger = common.RunLogger(args, "gato_tokens", run_dir=run_dir, tensorboard=args.tensorboard, track=args.track)
    ck_path = Path(logger.dir) / "checkpoint.pt"

    def save():
        common.save_checkpoint(ck_path, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                             scheduler=sched.state_dict(), step=step, rng=common.rng_state(),
                                             data_rng=data_rng.bit_generator.state, meta=meta,
                                             args=dataclasses.asdict(args)))

    metrics, last_eval = {}, float("nan")
    t0, t_last, s_last = time.time(), time.time(), step
    bar = tqdm(total=args.total_steps, initial=step, desc="gato", unit="step")
    model.train()
    try:
        while step < args.total_steps:
            tok, pos, tgt = sample_batch(tasks, args, data_rng)
            tok, pos, tgt = (torch.as_tensor(a).to(device, non_blocking=True) for a in (tok, pos, tgt))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model.loss(tok, pos, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            out_of_time = args.time_budget_min is not None and time.time() - t0 > 60 * args.time_budget_min
            if step % args.log_every == 0 or step == args.total_steps:
                sps = (step - s_last) / (time.time() - t_last)
                t_last, s_last = time.time(), step
                logger.log(step, **{"losses/action_loss": loss.item(), "charts/learning_rate": sched.get_last_lr()[0],
                                    "charts/SPS": sps})
                bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{last_eval:.2f}")
            if step % args.eval_every == 0 or step == args.total_steps or out_of_time:
                metrics = evaluate(model, meta, args, device, step)
                last_eval = metrics["eval/min_expert_fraction"]
                logger.log(step, **metrics, **{"charts/train_minutes": (time.time() - t0) / 60})
                bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{last_eval:.2f}")
                tqdm.write(f"[gato] step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
                save()
            if out_of_time:
                tqdm.write(f"[gato] time budget of {args.time_budget_min} min reached at step {step}")
                break
    except KeyboardInterrupt:
        save()
        print(f"\n[gato] interrupted at step {step}; checkpoint saved to {ck_path}", flush=True)
    finally:
        bar.close()
        logger.close()
    metrics = dict(metrics, step=step, checkpoint=str(ck_path), run_dir=str(logger.dir))
    return metrics


if __name__ == "__main__":
    main()
