"""Gato's tokenization and a small generalist trained on token streams of several environments.

Reed et al. 2022, "A Generalist Agent", arXiv 2205.06175: tokens (Sec. 2.1, App. B), local and
patch positions (App. C.3), masked next-token training with prompts (Sec. 2.1-2.3), the 80% expert
filter (Sec. 3.1), prompted control (Sec. 2.4), the random-to-expert score (Sec. 4.1). One model
learns hopper and halfcheetah; defaults are the 79M setting (App. C.1). Deviations and choices:
- GELU, not App. C.1's GEGLU (a gate as wide as the 3072 hidden units: 101.4M parameters; 82.5M).
- No image path in the model (App. C.2 ResNet block): images are tokenized (patches, intervals,
  App. C.3 positions) and tested, but the demo tasks have none.
- The separator gets a local position of its own (App. C.3 indexes observation tokens and gives
  all action tokens one). CPU settings: `--action-positions index` (separator n, actions n+1..),
  `--vocab action` (table rows [32000, 33026) only).
- Where the paper is silent: a training prompt fills half of a sequence's timesteps, exactly
  round(B / 4) sequences of a batch get one, tasks have equal weights, text takes any tokenizer.
- The evaluation prompt is the first floor(L / n_t) whole timesteps (<= L tokens) of a kept
  episode, not a cut timestep (Sec. 2.4: the first L tokens); the window slides by timesteps.
- Data: ARS expert datasets (make_datasets.py); the random score uses uniform actions.
Quick run (CPU): python gato_tokens.py --n-layer 2 --n-embd 128 --n-head 4 --dropout 0 \
    --seq-len 48 --batch-size 64 --lr 1e-3 --warmup-steps 300 --total-steps 18240 --vocab action \
    --action-positions index --eval-every 9120 --temperature 0 --no-cuda
"""
import math
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args:
    exp_name: str = "gato_tokens"
    """name of this experiment (part of the run folder name)"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation episodes"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "hopper+halfcheetah"
    """the tasks one model learns at once, joined by '+'"""
    dataset: str = "expert"
    """dataset of every task (common.load_dataset name); Gato learns from expert agents"""
    dataset_path: Optional[str] = None
    """one .npz / .hdf5 file per task of --env, in the same order, joined by ','"""
    filter_frac: float = 0.8
    """keep episodes with return >= this x the expert return (Sec. 3.1); 0 keeps all"""
    n_layer: int = 8
    """transformer blocks (Gato 79M: 8)"""
    n_embd: int = 768
    """layer width (Gato 79M: 768)"""
    n_head: int = 24
    """attention heads (Gato 79M: 24, key / value size 32)"""
    dropout: float = 0.1
    """dropout rate"""
    seq_len: int = 1024
    """tokens per training sequence and context length L at evaluation (Gato: 1024)"""
    batch_size: int = 512
    """sequences per batch (Gato: 512); under torchrun per process: the batch is this x processes"""
    lr: float = 1e-4
    """peak learning rate of AdamW (Gato: 1e-4)"""
    warmup_steps: int = 15_000
    """linear warm-up steps, then cosine decay to lr / 10 at --total-steps (Gato: 15k)"""
    total_steps: int = 1_000_000
    """training steps (Gato: 1M)"""
    vocab: str = "full"
    """'full': all 33026 ids (the paper); 'action': ids [32000, 33026), softmax over the bins"""
    action_positions: str = "shared"
    """local positions of separator / actions: 'shared' (App. C.3) or 'index' (CPU setting)"""
    temperature: float = 1.0
    """sampling temperature of action tokens at evaluation; 0 = greedy (argmax)"""
    eval_every: int = 10_000
    """evaluate every this many steps (and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes per task (run vectorized)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's own limit)"""
    bf16: bool = False
    """bfloat16 autocast (CPU and GPU)"""
    resume: Optional[str] = None
    """checkpoint to continue training from"""
    eval_only: bool = False
    """only evaluate --checkpoint on the tasks of --env"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""

# ---- Tokens (App. B, Sec. 2.1): text [0, 32000), discrete [0, 1024), continuous [32000, 33024)
TEXT_VOCAB, DISCRETE_VOCAB = 32_000, 1024   # text ids [0, 32000), discrete values [0, 1024)
MU, M = 100.0, 256.0           # mu-law constants (App. B)
N_BINS, CONT_OFFSET = 1024, 32_000  # uniform bins on [-1, 1], shifted to [32000, 33024)
SEPARATOR = CONT_OFFSET + N_BINS   # '|' between observation and action tokens: 33024
PAD, VOCAB_SIZE = SEPARATOR + 1, SEPARATOR + 2  # right padding, never a target: 33025; 33026 ids
PATCH, POS_BINS = 16, 128      # 16x16 image patches (Sec. 2.1), intervals in 128 (App. C.3)
IMAGE_PATCH = -1               # a patch's place in a timestep's ids (patches are embedded aside)
OBS_POSITIONS = 512            # local observation positions 0..511 (App. C.3: "like 512")
SEP_POS, ACT_POS = OBS_POSITIONS, OBS_POSITIONS + 1  # 'shared': the separator's, every action's

def mu_law(x):
    """F(x) = sgn(x) ln(|x| mu + 1) / ln(M mu + 1), mu = 100, M = 256 (App. B)."""
    return np.sign(x) * np.log1p(np.abs(x) * MU) / np.log1p(M * MU)

def inverse_mu_law(y):
    """x = sgn(y) ((M mu + 1)^|y| - 1) / mu, the inverse of F."""
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(M * MU)) / MU

def needs_mu_law(x) -> bool:
    """Sec. 2.1: values are mu-law encoded to [-1, 1] "if not already there"."""
    return not bool(np.all(np.abs(np.asarray(x)) <= 1.0))

def discretize(y) -> np.ndarray:
    """[-1, 1] -> 1024 uniform bins (y = 1 joins the last bin), shifted to [32000, 33024)."""
    k = np.floor((np.clip(y, -1.0, 1.0) + 1.0) * (N_BINS / 2))
    return np.minimum(k, N_BINS - 1).astype(np.int64) + CONT_OFFSET

def bin_centers(tokens) -> np.ndarray:
    """Tokens in [32000, 33024) -> the centres of their bins in [-1, 1]."""
    t = np.asarray(tokens)
    if t.size and (t.min() < CONT_OFFSET or t.max() >= CONT_OFFSET + N_BINS):
        raise ValueError(f"continuous tokens lie in [32000, 33024), got {t.min()}..{t.max()}")
    return (t - CONT_OFFSET + 0.5) * (2.0 / N_BINS) - 1.0

def tokenize_continuous(x, squash: Optional[bool] = None) -> np.ndarray:
    """Floats -> tokens, same shape: mu-law unless already in [-1, 1] (squash=None: decided on
    these values; a task fixes it per field), then discretize."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("continuous values contain NaN; clean the data")
    squash = needs_mu_law(x) if squash is None else squash
    return discretize(mu_law(x) if squash else x)

def detokenize_continuous(tokens, squash: bool) -> np.ndarray:
    """Tokens -> floats through the bin centre (and the inverse mu-law where it was applied)."""
    c = bin_centers(tokens)
    return inverse_mu_law(c) if squash else c

def tokenize_discrete(x) -> np.ndarray:
    """Integers in [0, 1024) are their own tokens (Sec. 2.1)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iub" or a.size and (a.min() < 0 or a.max() >= DISCRETE_VOCAB):
        raise ValueError(f"discrete values are integers in [0, {DISCRETE_VOCAB}), got {a.dtype} "
                         f"{a.min() if a.size else ''}..{a.max() if a.size else ''}")
    return a.astype(np.int64)

def tokenize_text(text: str, text_tokenizer: Optional[Callable]) -> np.ndarray:
    """Any tokenizer callable str -> ids in [0, 32000) (SentencePiece in the paper)."""
    if text_tokenizer is None:
        raise ValueError("a text observation needs text_tokenizer= (str -> ids in [0, 32000))")
    ids = np.asarray(list(text_tokenizer(text)), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= TEXT_VOCAB):
        raise ValueError(f"text ids lie in [0, 32000), the tokenizer gave {ids.min()}..{ids.max()}")
    return ids

def image_patches(img) -> np.ndarray:
    """(H, W, C) uint8 -> (H/16 * W/16, 16 * 16 * C) patches in raster order, each pixel scaled
    to [-1, 1] and divided by sqrt(16) = 4 (Sec. 2.1); a patch is (row, column, channel) flat."""
    h, w, c = np.shape(img)
    if h % PATCH or w % PATCH:
        raise ValueError(f"image {h}x{w} is not a multiple of the {PATCH}x{PATCH} patch; crop it")
    x = (np.asarray(img, np.float32) / 255.0 * 2.0 - 1.0) / math.sqrt(PATCH)
    x = x.reshape(h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // PATCH) * (w // PATCH), PATCH * PATCH * c)

def patch_intervals(h: int, w: int) -> np.ndarray:
    """(n_patches, 4) = row_from, row_to, col_from, col_to: each patch's pixel interval over the
    image size, quantized to 128 (App. C.3), raster order."""
    nh, nw = h // PATCH, w // PATCH
    r, c = np.divmod(np.arange(nh * nw), nw)
    q = lambda i, n: np.floor(i / n * POS_BINS).astype(np.int64)  # noqa: E731
    return np.stack([q(r, nh), q(r + 1, nh), q(c, nw), q(c + 1, nw)], 1)

def patch_positions(intervals, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Row / column indices (n, 2) of App. C.3: training (rng given) samples uniformly in
    [from, to); evaluation takes the mean of the interval, rounded half up."""
    lo, hi = intervals[:, [0, 2]], intervals[:, [1, 3]]
    return (np.floor((lo + hi) / 2 + 0.5) if rng is None else
            lo + np.floor(rng.random(lo.shape) * (hi - lo))).astype(np.int64)

# ---- Sequence layout (Sec. 2.1): [observation tokens (keys sorted), '|', action tokens], positions
def local_positions(n_obs: int, n_act: int, action_positions: str = "shared") -> np.ndarray:
    """Local position of every token of a timestep (Sec. 2.1, App. C.3): observations 0..n-1;
    'shared': the separator SEP_POS, every action ACT_POS; 'index': n, then n+1, n+2, ..."""
    index = action_positions == "index"
    if n_obs + index * (1 + n_act) > OBS_POSITIONS:
        raise ValueError(f"{n_obs} + 1 + {n_act} tokens overflow the {OBS_POSITIONS} positions")
    return np.arange(n_obs + 1 + n_act) if index else np.concatenate(
        [np.arange(n_obs), [SEP_POS], np.full(n_act, ACT_POS)])

def _leaves(obs, name="observation"):
    """Nested observations in lexicographic key order (Sec. 2.1) as (name, value)."""
    if isinstance(obs, dict):
        for k in sorted(obs):
            yield from _leaves(obs[k], f"{name}/{k}")
    else:
        yield name, obs

def _tokens(value, squash: Optional[bool], text_tokenizer):
    """One batched leaf -> (ids (N or 1, k), is_text, patches (N, k, 768 C) or None)."""
    if isinstance(value, str):
        return tokenize_text(value, text_tokenizer)[None], True, None
    a = np.asarray(value)
    if a.dtype == np.uint8 and a.ndim == 4:                      # (N, H, W, C) images
        p = np.stack([image_patches(i) for i in a])
        return np.full(p.shape[:2], IMAGE_PATCH), False, p
    if a.dtype.kind in "iub":
        return tokenize_discrete(a).reshape(len(a), -1), False, None
    return tokenize_continuous(a, squash).reshape(len(a), -1), False, None

def layout_timestep(observation, action=None, squash: Optional[dict] = None, text_tokenizer=None,
                    action_positions: str = "shared") -> dict:
    """N timesteps as [observation tokens, '|', action tokens] (Sec. 2.1). observation: (N, ...)
    floats (continuous) / ints (discrete) / uint8 (N, H, W, C) images, a str, or a nested dict of
    them; action: (N, ...) or None while it is generated (rows end at '|'); squash: leaf name
    ("observation", "observation/key", "action") -> mu-law or not (else decided on the values).
    -> tokens (N, n_t), local_pos (n_t,), loss_mask (n_t,) = 1 on text and action tokens (Eq. 2),
    patches: each image's (N, n, 768 C)."""
    squash = squash or {}
    obs = [_tokens(v, squash.get(k), text_tokenizer) for k, v in _leaves(observation)]
    act = [] if action is None else [_tokens(action, squash.get("action"), None)]
    parts = [t for t, _, _ in obs] + [np.array([[SEPARATOR]])] + [t for t, _, _ in act]
    mask = [np.full(t.shape[1], is_text) for t, is_text, _ in obs] + [[False]] + [
        np.ones(t.shape[1], bool) for t, _, _ in act]                    # text and action: 1
    n_obs, n_act = sum(t.shape[1] for t, _, _ in obs), sum(t.shape[1] for t, _, _ in act)
    n = max(p.shape[0] for p in parts)
    tokens = np.concatenate([np.broadcast_to(p, (n, p.shape[1])) for p in parts], 1)
    return dict(tokens=tokens.astype(np.int64), loss_mask=np.concatenate(mask).astype(np.int64),
                local_pos=local_positions(n_obs, n_act, action_positions)[: tokens.shape[1]],
                patches=[p for _, _, p in obs if p is not None])

# ---- Data: the expert filter (Sec. 3.1), tokenized tasks, prompted batches (Sec. 2.3) ------------
def expert_return(returns) -> float:
    """max_j mean(R_j .. R_{j+W-1}) in collection order, W = min(1000, 0.1 N) (Sec. 3.1)."""
    r = np.asarray(returns, dtype=np.float64)
    w = max(1, min(1000, int(0.1 * len(r))))
    c = np.concatenate([[0.0], np.cumsum(r)])
    return float(((c[w:] - c[:-w]) / w).max())

def keep_episodes(returns, expert: float, frac: float, env: str = "") -> np.ndarray:
    """Episodes with return >= frac x expert return (Sec. 3.1)."""
    if frac > 0 and expert <= 0:
        raise common.DatasetError(f"{env}: expert return {expert:.1f} <= 0: 'return >= {frac} x "
                                  f"expert' is no filter; use expert data or --filter-frac 0")
    return np.asarray(returns) >= frac * expert

class Task:
    """One environment's tokenized dataset: (N, n_t) ids per transition and the kept episodes."""
    def __init__(self, env: str, data: dict, args: Args):
        self.env, obs, act = env, data["observations"], data["actions"]
        eps = common.split_episodes(data)
        returns = np.array([e["rewards"].sum() for e in eps])
        self.expert_return = expert_return(returns)
        keep = keep_episodes(returns, self.expert_return, args.filter_frac, env)
        self.squash = {"observation": needs_mu_law(obs), "action": needs_mu_law(act)}  # per field
        lay = layout_timestep(obs, act, self.squash, action_positions=args.action_positions)
        self.tokens = lay["tokens"].astype(np.int32)                    # (N, n_t)
        self.local_pos, self.loss_mask = lay["local_pos"], lay["loss_mask"].astype(bool)
        self.n_obs, self.n_act, self.n_t = obs.shape[1], act.shape[1], self.tokens.shape[1]
        lengths = np.array([len(e["rewards"]) for e in eps])
        self.starts, self.lengths = (np.cumsum(lengths) - lengths)[keep], lengths[keep]
        print(f"[gato] {env}: kept {keep.sum()}/{len(eps)} episodes (expert return "
              f"{self.expert_return:.0f}), {self.n_t} tokens / timestep, mu-law {self.squash}")

PROMPT_PROB = 0.25      # Sec. 2.3: 25% of a batch's sequences get a prompt ...
PROMPT_END_PROB = 0.5   # ... half taken from an episode's end, half uniformly

def sample_batch(tasks: list[Task], args: Args, gen: torch.Generator, rank=0, world=1):
    """B sequences of L tokens (right-padded): the first round(B / 4) are [a prompt from a kept
    episode of the same task, an episode window], the rest an episode window (Sec. 2.3) -> tokens,
    local_pos (B, L), indices into the flat (B, L - 1) predictions whose next token (Eq. 2) has
    loss mask 1. torchrun: all ranks draw B x world rows, rank r builds [r B, r B + B): in step."""
    B, L = args.batch_size, args.seq_len
    tokens, pos, mask = np.full((B, L), PAD), np.zeros((B, L), np.int64), np.zeros((B, L), bool)
    u = torch.rand((B * world, 6), generator=gen, dtype=torch.float64).numpy()[rank * B:][:B]
    pick = lambda i, n: int(u[b, i] * n)  # noqa: E731  uniform integer in [0, n)
    for b in range(B):
        task = tasks[pick(0, len(tasks))]
        n_fit = L // task.n_t
        p = n_fit // 2 if rank * B + b < round(PROMPT_PROB * B * world) else 0  # prompt: half
        idx = []
        if p:
            e = pick(1, len(task.starts))
            k = min(p, task.lengths[e])
            free = task.lengths[e] - k
            off = free if u[b, 2] < PROMPT_END_PROB else pick(3, free + 1)
            idx.append(task.starts[e] + off + np.arange(k))
        e = pick(4, len(task.starts))
        k = min(n_fit - p, task.lengths[e])
        idx.append(task.starts[e] + pick(5, task.lengths[e] - k + 1) + np.arange(k))
        idx = np.concatenate(idx)
        n = len(idx) * task.n_t
        tokens[b, :n] = task.tokens[idx].reshape(-1)
        pos[b, :n] = np.tile(task.local_pos, len(idx))
        mask[b, :n] = np.tile(task.loss_mask, len(idx))
    return tokens, pos, np.flatnonzero(mask[:, 1:].reshape(-1))

# ---- Model (Sec. 2.2, App. C.1): shared token table, local positions, pre-norm causal blocks
class Block(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        """x (B, T, d); cache [k, v] or [None, None]: filled by a prefill, extended by one token."""
        B, T, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # 3 x (B, h, T, dh)
        if cache is not None and cache[0] is not None:                  # new tokens see the past
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        if cache is not None:
            cache[0], cache[1] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=k.shape[2] == T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))  # (B, T, d)
        return x + self.mlp(self.ln2(x))

class GatoModel(nn.Module):
    """Decoder-only transformer over Gato ids; output logits share the input table (App. C.1)."""
    def __init__(self, args: Args):
        super().__init__()
        d = args.n_embd
        if d % args.n_head:
            raise ValueError(f"--n-embd {d} must be divisible by --n-head {args.n_head}")
        self.id_lo = CONT_OFFSET if args.vocab == "action" else 0        # first id the table holds
        self.tok_emb = nn.Embedding(VOCAB_SIZE - self.id_lo, d)
        self.pos_emb = nn.Embedding(OBS_POSITIONS + 2, d)              # + separator, action rows
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(d, args.n_head, args.dropout)
                                    for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.out = (CONT_OFFSET, CONT_OFFSET + N_BINS) if args.vocab == "action" else (0, PAD)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, tokens, local_pos, caches=None):
        """tokens, local_pos (B, T) -> hidden (B, T, d); caches: one [k, v] per block or None."""
        x = self.drop(self.tok_emb(tokens - self.id_lo) + self.pos_emb(local_pos))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.ln_f(x)

    def logits(self, h, lo=None, hi=None):
        """h (..., d) -> logits over ids [lo, hi) (default: the training softmax), h @ E^T."""
        lo, hi = self.out if lo is None else (lo, hi)
        return h @ self.tok_emb.weight[lo - self.id_lo: hi - self.id_lo].T

    def loss(self, h, tokens, tgt, n_tgt=None):
        """Eq. 2: next-token CE of h = self(tokens, pos) at targets tgt, sum / n_tgt (or mean)."""
        y = tokens[:, 1:].reshape(-1)[tgt] - self.out[0]                # (n_targets,)
        h = h[:, :-1].reshape(-1, h.shape[-1])[tgt]                     # (n_targets, d)
        ce = F.cross_entropy(self.logits(h).float(), y, reduction="sum")
        return ce / (len(y) if n_tgt is None else n_tgt)

# ---- Control (Sec. 2.4): prompt, then observation tokens and sampled action tokens, window L -----
class GatoPolicy:
    """Batched policy for common.evaluate; N episodes of one task step in lockstep."""
    def __init__(self, model: GatoModel, task: dict, args: Args, device="cpu",
                 generator: Optional[torch.Generator] = None, kv_cache: bool = True):
        self.model, self.task, self.args, self.kv_cache = model, task, args, kv_cache
        self.device = torch.device(device)
        self.gen = generator or torch.Generator(self.device).manual_seed(args.seed)
        self.n_t, self.n_act, self.window = task["n_t"], task["n_act"], args.seq_len // task["n_t"]
        self.step_pos = local_positions(task["n_obs"], self.n_act, args.action_positions)
        self.prompt = np.asarray(task["prompt"]).reshape(-1, self.n_t)   # (P, n_t) demo start
        self.squash = {"observation": task["squash_obs"], "action": task["squash_act"]}

    def reset(self, n: int):
        """Every episode's sequence starts with the prompt demonstration (Sec. 2.4)."""
        self.history = np.broadcast_to(self.prompt, (n, *self.prompt.shape)).copy()

    def context(self, obs):
        """The last floor(L / n_t) whole timesteps of [prompt, past timesteps, observation '|']:
        tokens (N, T) and local_pos (T,); the current timestep lacks its action tokens."""
        cur = layout_timestep(obs, None, self.squash, action_positions=self.args.action_positions)
        past = self.history[:, max(0, self.history.shape[1] - self.window + 1):]  # (N, < w, n_t)
        tokens = np.concatenate([past.reshape(len(obs), -1), cur["tokens"]], 1)
        return tokens, np.concatenate([np.tile(self.step_pos, past.shape[1]), cur["local_pos"]])

    @torch.no_grad()
    def __call__(self, obs):
        """obs (N, obs_dim) -> actions (N, act_dim), one action token at a time (Sec. 2.4)."""
        ctx, pos = self.context(np.asarray(obs, dtype=np.float32))
        n, act_pos = len(ctx), self.step_pos[-self.n_act:]
        tok = torch.as_tensor(ctx, device=self.device)
        pos = torch.as_tensor(pos, device=self.device).expand(n, -1)
        caches, acts = [[None, None] for _ in self.model.blocks], []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            h = self.model(tok, pos, caches)[:, -1]                     # (N, d) at '|'
            for j in range(self.n_act):
                logits = self.model.logits(h, CONT_OFFSET, CONT_OFFSET + N_BINS).float()
                t = self.args.temperature                                # 0: greedy
                a = CONT_OFFSET + (logits.argmax(-1) if t == 0 else torch.multinomial(
                    torch.softmax(logits / t, -1), 1, generator=self.gen)[:, 0])
                acts.append(a)
                if j + 1 == self.n_act:
                    break
                p = torch.full((n, 1), int(act_pos[j]), device=self.device)
                tok, pos = torch.cat([tok, a[:, None]], 1), torch.cat([pos, p], 1)
                # speed: the key-value cache runs only the new token (tested equal to the full pass)
                h = (self.model(a[:, None], p, caches) if self.kv_cache
                     else self.model(tok, pos))[:, -1]
        a_tok = torch.stack(acts, 1).cpu().numpy()                      # (N, n_act)
        step = np.concatenate([ctx[:, -(self.n_t - self.n_act):], a_tok], 1)[:, None]
        self.history = np.concatenate([self.history, step], 1)[:, -self.window:]
        return detokenize_continuous(a_tok, self.squash["action"]).astype(np.float32)

def load_policy(path, device="cpu", env: Optional[str] = None, temperature=None, seed: int = 0):
    """A trained checkpoint -> GatoPolicy acting in `env` (any task the model learned)."""
    ckpt = common.load_checkpoint(path, "gato_tokens")
    args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    args = replace(args, seed=seed, temperature=args.temperature if temperature is None
                   else temperature)
    env = next(iter(ckpt["meta"])) if env is None and len(ckpt["meta"]) == 1 else env
    if env not in ckpt["meta"]:
        raise ValueError(f"{path} learned {'+'.join(ckpt['meta'])}: pass env= one of them")
    model = GatoModel(args)
    model.load_state_dict(ckpt["model"])
    return GatoPolicy(model.to(device).eval(), ckpt["meta"][env], args, device)

# ---- Evaluation: Sec. 4.1 score, 0% = a random policy, 100% = the task's expert return -----------
def gato_score(returns, random_return: float, expert_return: float) -> np.ndarray:
    """100 (R - random) / (expert - random) (Sec. 4.1)."""
    return 100.0 * (np.asarray(returns) - random_return) / (expert_return - random_return)

def random_return(env: str, args: Args) -> float:
    """Mean return of uniform random actions over the evaluation episodes."""
    space, rng = common.make_env(env).action_space, np.random.default_rng(args.seed)
    act = lambda obs: rng.uniform(space.low, space.high, (len(obs), *space.shape))  # noqa: E731
    return float(common.evaluate(act, env, args.eval_episodes, args.seed, args.eval_max_steps,
                                 False)["returns"].mean())

def evaluate(policies: dict, args: Args) -> dict:
    """{env: policy} -> eval/{env}/... metrics; eval/normalized_score: mean Sec. 4.1 score."""
    out = {}
    for env, pol in policies.items():
        r = common.evaluate(pol, env, args.eval_episodes, args.seed, args.eval_max_steps)
        score = gato_score(r["returns"], pol.task["random_return"], pol.task["expert_return"])
        out.update({f"eval/{env}/return_mean": float(r["returns"].mean()),
                    f"eval/{env}/gato_score": float(score.mean()),
                    f"eval/{env}/d4rl_score": float(r["normalized"].mean())})
    out["eval/normalized_score"] = float(np.mean([out[f"eval/{e}/gato_score"] for e in policies]))
    return out

# ---- Training ------------------------------------------------------------------------------------
def load_tasks(args: Args) -> list[Task]:
    envs = args.env.split("+")
    paths = args.dataset_path.split(",") if args.dataset_path else [None] * len(envs)
    if len(paths) != len(envs):
        raise ValueError(f"--dataset-path takes {len(envs)} files, one per task, joined by ','")
    tasks = [Task(env, common.load_dataset(env, args.dataset, path=p), args)
             for env, p in zip(envs, paths)]
    if short := [t.env for t in tasks if t.n_t > args.seq_len]:
        raise ValueError(f"--seq-len {args.seq_len} is shorter than one {short} timestep")
    return tasks

def task_meta(task: Task, args: Args) -> dict:
    """What a policy needs (saved in the checkpoint): sizes, mu-law flags, the evaluation prompt
    (the first floor(L / n_t) timesteps of a kept episode, Sec. 2.4) and the Sec. 4.1 returns."""
    e = np.random.default_rng(args.seed).integers(len(task.starts))
    demo = task.tokens[task.starts[e]: task.starts[e] + task.lengths[e]][: args.seq_len // task.n_t]
    return dict(n_obs=task.n_obs, n_act=task.n_act, n_t=task.n_t, prompt=torch.tensor(demo).long(),
                squash_obs=task.squash["observation"], squash_act=task.squash["action"],
                expert_return=task.expert_return, random_return=random_return(task.env, args))

def make_optimizer(model: GatoModel, args: Args):
    """AdamW (0.9, 0.95), decay 0.1 on matrices; linear warm-up, cosine to lr / 10 (Gato's)."""
    groups = [dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=0.1),
              dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def schedule(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        frac = min(1.0, (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)

def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    assert args.vocab in ("full", "action"), f"--vocab is full or action, not {args.vocab}"
    assert args.action_positions in ("shared", "index"), "--action-positions: shared or index"
    assert args.checkpoint or not args.eval_only, "--eval-only needs --checkpoint PATH"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    common.set_seed(args.seed + rank)                                    # dropout differs by rank
    device = common.get_device(args.cuda)
    if args.eval_only:
        metrics = evaluate({env: load_policy(args.checkpoint, device, env, args.temperature,
                                             args.seed) for env in args.env.split("+")}, args)
        print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics
    if world > 1:  # a GPU per process; gloo for CPU tensors, NCCL for CUDA; stuck 1 h: raises
        if device.type == "cuda":
            torch.cuda.set_device(device := torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        dist.init_process_group(timeout=timedelta(hours=1))
    tasks = load_tasks(args)
    meta = {t.env: task_meta(t, args) for t in tasks}
    model = GatoModel(args).to(device)                  # DDP copies rank 0's weights to the others
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt, sched = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)                       # the batch sampler
    run = common.Run(args, "gato_tokens", extra=lambda: dict(meta=meta), model=model,
                     optimizer=opt, scheduler=sched, sampler=gen)
    print(f"[gato] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    metrics = {}
    for step in run.loop(args.total_steps):
        batch = sample_batch(tasks, args, gen, rank, world)
        tok, pos, tgt = (torch.as_tensor(a).to(device) for a in batch)
        n_tgt = torch.tensor(float(len(tgt)), device=device)  # / their mean over ranks: the
        if world > 1:  # DDP gradient mean is then Eq. 2 on the whole batch
            dist.all_reduce(n_tgt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model.loss(ddp(tok, pos), tok, tgt, n_tgt / world)  # masked CE (Eq. 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if run.every(100):
            if world > 1:                                               # the whole batch's loss
                dist.all_reduce(loss := loss.detach() / world)
            run.log(**{"losses/loss": loss.item(), "charts/learning_rate": sched.get_last_lr()[0]})
        if run.every(args.eval_every):
            gen_eval = torch.Generator(device).manual_seed(args.seed)
            policies = {e: GatoPolicy(model.eval(), meta[e], args, device, gen_eval) for e in meta}
            metrics = {} if rank else evaluate(policies, args)  # rank 0 alone evaluates
            model.train()
            run.log(**metrics)
            run.save()
    run_dir = run.finish()
    if world > 1:
        dist.destroy_process_group()
    return dict(metrics, run_dir=str(run_dir), checkpoint=str(run_dir / "checkpoint.pt"))

if __name__ == "__main__":
    main()
