"""Decision Transformer (arXiv 2106.01345) + Multi-Game DT return bins and expert inference (2205.15241).

Decision Transformer: Chen et al. 2021. Multi-Game Decision Transformers: Lee et al. 2022, whose
return bins and expert action inference are an option here (--return-bins N).

Reproduces the D4RL Gym experiments of DT (Sec. 5.2, Table 2) on Gymnasium v5 MuJoCo:
offline training on (R, s, a) sequences, then return-conditioned evaluation.

    python dt.py --env hopper                    # paper config: 100k updates on hopper/medium
    python dt.py --env hopper --return-bins 120  # Multi-Game DT mode (Sec. 3.3 / 3.4 of 2205.15241)

DT (Sec. 3): each timestep contributes three tokens, return-to-go R_t, state s_t, action a_t,
interleaved (R_1, s_1, a_1, R_2, ...) into 3K tokens; modality-specific linear embeddings plus a
learned timestep embedding shared by the three tokens of a step, LayerNorm, a causal GPT, and the
action read at the state token (Linear + tanh). MSE on actions. At test time R starts at the target
and R <- R - r after every step (Algorithm 1). Hyperparameters: the official gym code (Appendix A).

Multi-Game DT mode (--return-bins N): the return becomes a discrete token placed AFTER the state
(per step: s_t, R_t, a_t), so the output at s_t predicts P(R_t | s_t, history) and the output at
R_t predicts a_t (Sec. 3.3). Loss = cross-entropy on return bins + the action loss. At evaluation
R_t is sampled from log P(R_t | ...) + kappa * (R_t - R_low) / (R_high - R_low) (Sec. 3.4,
kappa = 10) at every step, so no target return is picked by hand. MGDT's actions are discrete
(cross-entropy); here they are continuous (MSE ~0.01 vs a return cross-entropy ~4), so the plain
sum lets the return loss dominate the clipped gradient: --return-loss-weight 0.01 scored 29.1 vs
18.0 for the default 1 on the hopper quick run at 3000 updates (README).

Named deviations (and why):
  * Right padding. Short windows (near an episode's end, or the first K-1 steps at evaluation)
    are padded AFTER the real steps. Under causal attention no real token can see a pad, so
    SDPA's is_causal path needs no mask matrix; padded steps are dropped from the loss with a
    mask built from the window lengths before padding. The official code pads on the left and
    passes an attention mask; the predictions for real steps are the same.
  * Return bins for continuous returns (MGDT mode). MGDT's Atari returns are integers in
    [-20, 100] (one bin per integer). Gym returns are continuous, so we use N uniform bins over
    [R_low, R_high] = [min, max] of the dataset's scaled returns-to-go:
    bin(R) = clamp(floor((R - R_low) / (R_high - R_low) * N), 0, N - 1) (R_high falls in the
    top bin, N - 1, not N), decoded to bin centres; the expert term uses the centre's normalized
    value (i + 0.5) / N. Returns outside the range clamp to the edge bins.
  * MGDT mode keeps DT's continuous action head (tanh + MSE; MGDT predicts discrete Atari
    actions with cross-entropy) and has no reward token (MGDT also predicts r_t in {-1, 0, 1});
    the loss is action MSE + return cross-entropy with equal weights.
  * Datasets are the Gymnasium v5 D4RL-style datasets of common.py (ARS, not SAC), so scores
    are "D4RL-normalized" (see common.py).

Quick run (CPU, 1 thread: 6.4 min wall on a shared 2-core machine, 2.6 min of CPU time; last
evaluation D4RL-normalized 32.6 over 10 episodes, above the hopper/medium dataset's own 31.0):
    python dt.py --env hopper --total-steps 1000 --warmup-steps 100 --lr 1e-3 --bf16 \
        --eval-every 500 --eval-episodes 10 --exp-name dt-quick
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
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

# Target returns of the official gym code (evaluated at each, in this order).
TARGET_RETURNS = {"hopper": (3600.0, 1800.0), "halfcheetah": (12000.0, 6000.0), "walker2d": (5000.0, 2500.0)}


@dataclass
class Args:
    exp_name: str = "dt"
    """name of the experiment (part of the run folder name)"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation episodes"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "hopper"
    """environment: hopper, halfcheetah, walker2d (Gymnasium v5)"""
    dataset: str = "medium"
    """D4RL-style dataset: random, medium, medium-replay, expert, medium-expert, or a Minari id"""
    dataset_path: Optional[str] = None
    """read the dataset from this .npz / D4RL .hdf5 file instead"""
    total_steps: int = 100_000
    """gradient updates (official: 10 iterations x 10k steps)"""
    eval_every: int = 10_000
    """evaluate (and checkpoint) every this many updates; the last evaluation is the reported one"""
    eval_episodes: int = 100
    """evaluation episodes per target return (run at once, vectorized)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's limit, 1000)"""
    target_returns: Optional[tuple[float, ...]] = None
    """target returns to condition on at evaluation (default: per env, e.g. hopper 3600 1800)"""
    context_len: int = 20
    """K, the number of timesteps in the context (3K tokens)"""
    embed_dim: int = 128
    """d, the transformer width"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 1
    """attention heads"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""
    max_ep_len: int = 1000
    """size of the timestep embedding (longer episodes are clamped to the last timestep)"""
    batch_size: int = 64
    """windows per update"""
    lr: float = 1e-4
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup, then constant"""
    grad_clip: float = 0.25
    """gradient-norm clip"""
    reward_scale: float = 0.001
    """returns-to-go and rewards are multiplied by this (1/1000)"""
    return_bins: int = 0
    """Multi-Game DT mode: number of return bins (0 = plain DT with a continuous return token)"""
    expert_kappa: float = 10.0
    """MGDT expert inference: kappa in log P(R) + kappa * (R - R_low) / (R_high - R_low) (Sec. 3.4)"""
    return_loss_weight: float = 1.0
    """MGDT: weight of the return cross-entropy in the loss (1 = the paper's plain sum)"""
    log_every: int = 100
    """log losses every this many updates"""
    bf16: bool = False
    """bfloat16 autocast for training and evaluation (fp32 is the paper's)"""
    compile: bool = False
    """torch.compile the model for training"""
    resume: Optional[str] = None
    """continue training from this checkpoint"""
    eval_only: bool = False
    """only evaluate --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    run_dir: Optional[str] = None
    """run folder (default runs/{env}__{exp_name}__{seed}__{time}; with --resume, the checkpoint's folder)"""


# Fields that fix the network's shape or the data it was trained on: a resumed or evaluated
# checkpoint must agree on them.
MODEL_FIELDS = ("context_len", "embed_dim", "n_layer", "n_head", "max_ep_len", "return_bins", "reward_scale")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
class ReturnBins:
    """MGDT return discretization for continuous returns (see the module docstring):
    N uniform bins over [lo, hi] (scaled returns-to-go); the top edge hi falls in bin N - 1."""

    def __init__(self, lo: float, hi: float, n: int):
        if not hi > lo:
            raise ValueError(f"return bins need R_high > R_low, got [{lo}, {hi}]: the dataset's "
                             f"returns-to-go are constant; use --return-bins 0")
        self.lo, self.hi, self.n = float(lo), float(hi), int(n)

    def encode(self, R: torch.Tensor) -> torch.Tensor:
        idx = torch.floor((R - self.lo) / (self.hi - self.lo) * self.n)
        return idx.clamp(0, self.n - 1).long()  # R == hi -> n, clamped into the top bin n - 1

    def centers(self, device=None) -> torch.Tensor:
        i = torch.arange(self.n, device=device, dtype=torch.float32)
        return self.lo + (i + 0.5) * (self.hi - self.lo) / self.n

    def normalized_centers(self, device=None) -> torch.Tensor:
        """(R - R_low) / (R_high - R_low) at each bin centre, the expert term of Sec. 3.4."""
        return (torch.arange(self.n, device=device, dtype=torch.float32) + 0.5) / self.n


class TrajectoryData:
    """All episodes flattened on the device, with per-episode starts and lengths.
    States z-scored with the dataset statistics (+1e-6); returns-to-go scaled by reward_scale."""

    def __init__(self, data: dict, args: Args, device, state_mean=None, state_std=None, return_range=None):
        episodes = common.split_episodes(data)
        obs = data["observations"]
        self.state_mean = obs.mean(0) if state_mean is None else np.asarray(state_mean)
        self.state_std = obs.std(0) + 1e-6 if state_std is None else np.asarray(state_std)
        lengths = np.array([len(ep["rewards"]) for ep in episodes])
        rtg = np.concatenate([common.returns_to_go(ep["rewards"]) for ep in episodes]) * args.reward_scale
        steps = np.concatenate([np.arange(n) for n in lengths]).clip(max=args.max_ep_len - 1)
        obs = np.concatenate([ep["observations"] for ep in episodes])
        t = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)
        self.states = t((obs - self.state_mean) / self.state_std)               # (N, obs_dim)
        self.actions = t(np.concatenate([ep["actions"] for ep in episodes]))    # (N, act_dim)
        self.rtg = t(rtg)                                                       # (N,)
        self.timesteps = t(steps, torch.long)                                   # (N,)
        self.lengths = t(lengths, torch.long)
        self.starts = t(np.concatenate([[0], np.cumsum(lengths)[:-1]]), torch.long)
        self.probs = t(lengths / lengths.sum())  # trajectories drawn in proportion to length
        self.bins = None
        if args.return_bins:
            lo, hi = return_range if return_range is not None else (float(rtg.min()), float(rtg.max()))
            self.bins = ReturnBins(lo, hi, args.return_bins)
            self.rtg_bins = self.bins.encode(self.rtg)                           # (N,) long
        self.obs_dim, self.act_dim = self.states.shape[1], self.actions.shape[1]
        self.n_episodes, self.n_transitions = len(lengths), int(lengths.sum())

    def sample(self, batch_size: int, K: int, gen: torch.Generator):
        """A batch of K-step windows, right-padded, with the padding mask built from the lengths
        BEFORE padding. Returns states (B,K,obs), actions (B,K,act), returns (B,K) float
        (or long bins), timesteps (B,K), mask (B,K) bool."""
        dev = self.states.device
        ep = torch.multinomial(self.probs, batch_size, replacement=True, generator=gen)
        length = self.lengths[ep]
        start = (torch.rand(batch_size, device=dev, generator=gen) * length).long()  # uniform in [0, len)
        offs = start[:, None] + torch.arange(K, device=dev)                          # (B, K)
        mask = offs < length[:, None]                                                # (B, K) real steps
        idx = torch.where(mask, self.starts[ep][:, None] + offs, 0)                  # pads read row 0 ...
        m = mask.unsqueeze(-1)
        states = torch.where(m, self.states[idx], 0.0)                              # ... then are zeroed
        actions = torch.where(m, self.actions[idx], 0.0)
        returns = torch.where(mask, (self.rtg_bins if self.bins else self.rtg)[idx], 0)
        timesteps = torch.where(mask, self.timesteps[idx], 0)
        return states, actions, returns, timesteps, mask


# --------------------------------------------------------------------------------------
# Model: a GPT (nanoGPT-style blocks on SDPA) over interleaved tokens
# --------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LayerNorm GPT-2 block: causal self-attention + MLP (4d, ReLU as the official gym config)."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, last_only: bool = False):
        """x (B, T, d) -> (B, T, d); with last_only (inference) only the final token's output
        (B, 1, d) is computed: it attends to every key, so no mask is needed."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        if last_only:
            q, x = q[:, -1:], x[:, -1:]
        h = lambda z: z.view(B, z.shape[1], self.n_head, d // self.n_head).transpose(1, 2)  # (B, h, T, d/h)
        y = F.scaled_dot_product_attention(h(q), h(k), h(v), is_causal=not last_only,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, q.shape[1], d)))  # (B, T, d)
        return x + self.mlp(self.ln2(x))


class DecisionTransformer(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        d, self.bins = args.embed_dim, args.return_bins
        self.embed_timestep = nn.Embedding(args.max_ep_len, d)      # Sec. 3: episodic timestep, per step
        self.embed_state = nn.Linear(obs_dim, d)
        self.embed_action = nn.Linear(act_dim, d)
        # DT: a linear embedding of the scalar return; MGDT: an embedding per return bin.
        self.embed_return = nn.Embedding(self.bins, d) if self.bins else nn.Linear(1, d)
        self.embed_ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(d, args.n_head, args.dropout) for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.predict_action = nn.Sequential(nn.Linear(d, act_dim), nn.Tanh())
        self.predict_return = nn.Linear(d, self.bins) if self.bins else None
        # DT orders a step (R, s, a) and reads a_t at s_t; MGDT orders it (s, R, a) (Sec. 3.3), reads
        # P(R_t | s_t, history) at s_t and a_t at R_t. Either way the action is read at token 1.
        self.order = ("s", "R", "a") if self.bins else ("R", "s", "a")
        for name, p in self.blocks.named_parameters():  # GPT-2 init inside the transformer
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * args.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, states, actions, returns, timesteps):
        """states (B,K,obs), actions (B,K,act), returns (B,K) float (DT) or long bins (MGDT),
        timesteps (B,K) -> action predictions (B,K,act), return logits (B,K,bins) or None."""
        x = self.blocks_out(states, actions, returns, timesteps).reshape(states.shape[0], states.shape[1], 3, -1)
        action = self.predict_action(x[:, :, 1])                                    # (B, K, act)
        return_logits = self.predict_return(x[:, :, 0]) if self.bins else None      # (B, K, bins)
        return action, return_logits

    @torch.no_grad()
    def predict_last(self, states, actions, returns, timesteps, token: int):
        """Inference: the output head at token `token` (0 or 1) of the final step only. The
        sequence is cut after that token and the last block computes one query, the same
        numbers as forward()[..., -1] (tested) for ~30% less compute at 3 layers.
        -> action (B, act) if the action is read there (token 1), else return logits (B, bins)."""
        x = self.blocks_out(states, actions, returns, timesteps, cut=3 * (states.shape[1] - 1) + token + 1)[:, 0]
        return self.predict_action(x) if token == 1 else self.predict_return(x)

    def blocks_out(self, states, actions, returns, timesteps, cut: Optional[int] = None):
        """Embed, interleave and run the blocks -> (B, 3K, d) after ln_f, or with `cut` only the
        output of token cut-1 of the first `cut` tokens, (B, 1, d)."""
        B, K = states.shape[:2]
        time_emb = self.embed_timestep(timesteps)                                   # (B, K, d)
        ret_emb = self.embed_return(returns if self.bins else returns.unsqueeze(-1))
        tokens = {"R": ret_emb + time_emb, "s": self.embed_state(states) + time_emb,
                  "a": self.embed_action(actions) + time_emb}
        x = torch.stack([tokens[k] for k in self.order], dim=2)                     # (B, K, 3, d)
        x = x.reshape(B, 3 * K, x.shape[-1])                                        # (B, 3K, d) interleaved
        x = self.drop(self.embed_ln(x if cut is None else x[:, :cut]))
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=cut is not None and i == len(self.blocks) - 1)
        return self.ln_f(x)


# --------------------------------------------------------------------------------------
# Policy for vectorized evaluation (common.evaluate)
# --------------------------------------------------------------------------------------
def sample_expert_return(logits, expert_bias, gen=None):
    """MGDT Sec. 3.4: sample a return bin from exp(log P(R | s, history) + kappa * (R - R_low) / (R_high - R_low)).
    logits (N, bins), expert_bias (bins,) = kappa * normalized bin centres -> bins (N,) long."""
    expert = torch.log_softmax(logits.float(), -1) + expert_bias
    return torch.multinomial(torch.softmax(expert, -1), 1, generator=gen)[:, 0]


class DTPolicy:
    """Batched DT policy over N episodes with preallocated (N, K, ...) context buffers on the
    device. Step t writes at position min(t, K-1); once the window is full the buffers shift left
    by one step (right padding, as in training: positions after the current step are never
    fed to the model). DT: R_0 = target, R_{t+1} = R_t - r_t * scale (Algorithm 1), done in
    observe(). MGDT: R_t is sampled at every step from the expert distribution (Sec. 3.4).
    Episodes that observe() reports done get no more forward passes (their action rows are 0
    and common.evaluate ignores them), so early falls do not cost compute."""

    def __init__(self, model: DecisionTransformer, args: Args, state_mean, state_std, device,
                 target: Optional[float] = None, bins: Optional[ReturnBins] = None, seed: int = 0):
        self.model, self.args, self.device, self.bins = model, args, device, bins
        self.mean = torch.as_tensor(state_mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(state_std, dtype=torch.float32, device=device)
        self.target = None if target is None else target * args.reward_scale
        self.gen = torch.Generator(device=device).manual_seed(seed)
        if bins is not None:
            self.expert_bias = args.expert_kappa * bins.normalized_centers(device)  # (bins,)

    def reset(self, n: int):
        K, dev = self.args.context_len, self.device
        self.states = torch.zeros(n, K, self.mean.numel(), device=dev)
        self.actions = torch.zeros(n, K, self.model.predict_action[0].out_features, device=dev)
        self.returns = torch.zeros(n, K, device=dev, dtype=torch.long if self.bins else torch.float32)
        self.timesteps = torch.zeros(n, K, device=dev, dtype=torch.long)
        self.next_return = torch.full((n,), self.target or 0.0, device=dev)
        self.live = np.ones(n, dtype=bool)  # on the host: dones arrive there from the env
        self.t = 0

    def _forward(self, rows, n: int, token: int):
        """The head output at token `token` of step n-1 (action at 1; MGDT return logits at 0)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            out = self.model.predict_last(self.states[rows, :n], self.actions[rows, :n], self.returns[rows, :n],
                                          self.timesteps[rows, :n], token)
        return out.float()

    @torch.no_grad()
    def __call__(self, obs):
        K = self.args.context_len
        if self.t >= K:  # window full: drop the oldest step (shift left, no reallocation)
            for buf in (self.states, self.actions, self.returns, self.timesteps):
                buf[:, :-1] = buf[:, 1:].clone()
        p = min(self.t, K - 1)
        self.states[:, p] = (torch.as_tensor(obs, device=self.device) - self.mean) / self.std
        self.actions[:, p] = 0.0  # a_t is not known yet; causality hides it from s_t (and R_t)
        self.timesteps[:, p] = min(self.t, self.args.max_ep_len - 1)
        rows = slice(None) if self.live.all() else torch.as_tensor(np.flatnonzero(self.live), device=self.device)
        if self.bins is None:
            self.returns[:, p] = self.next_return
            action = self._forward(rows, p + 1, token=1)
        else:  # MGDT: sample R_t ~ exp(log P(R_t | s_t, history) + kappa * normalized R_t) (Sec. 3.4)
            logits = self._forward(rows, p + 1, token=0)  # P(R_t | s_t, history): R_t's token is cut off
            self.returns[rows, p] = sample_expert_return(logits, self.expert_bias, self.gen)
            action = self._forward(rows, p + 1, token=1)  # then a_t given the sampled R_t
        self.actions[rows, p] = action
        return self.actions[:, p].clone()                                            # (N, act)

    def observe(self, rewards, dones):
        p = min(self.t, self.args.context_len - 1)
        if self.bins is None:  # return-to-go decrement by the scaled reward (Algorithm 1)
            r = torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
            self.next_return = self.returns[:, p] - r * self.args.reward_scale
        self.live &= ~np.asarray(dones, dtype=bool)
        self.t += 1


def evaluate(model, args: Args, state_mean, state_std, device, bins=None) -> dict:
    """Evaluate every target return (DT) or expert inference (MGDT), vectorized over episodes."""
    was_training = model.training
    model.eval()
    targets = [None] if bins is not None else list(args.target_returns)
    out = {}
    for target in targets:
        policy = DTPolicy(model, args, state_mean, state_std, device, target, bins, seed=args.seed)
        res = common.evaluate(policy, args.env, n_episodes=args.eval_episodes, seed=args.seed + 10_000,
                              max_steps=args.eval_max_steps)
        out["expert" if target is None else f"target{target:g}"] = dict(
            return_mean=float(res["returns"].mean()), return_std=float(res["returns"].std()),
            normalized_score=float(np.mean(res["normalized"])), length_mean=float(res["lengths"].mean()))
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def check_args(args: Args) -> Args:
    common.env_id(args.env)  # raises for an unknown env, listing the valid ones
    if args.target_returns is None:
        if args.env not in TARGET_RETURNS and not args.return_bins:
            raise ValueError(f"no default target returns for env {args.env!r}: pass --target-returns R1 R2 ...")
        args.target_returns = TARGET_RETURNS.get(args.env, ())
    args.target_returns = tuple(float(r) for r in args.target_returns)
    for name in ("total_steps", "eval_every", "eval_episodes", "context_len", "embed_dim", "n_layer",
                 "n_head", "batch_size", "max_ep_len", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0 or not 0 <= args.dropout < 1 or args.reward_scale <= 0:
        raise ValueError("need --warmup-steps >= 0, 0 <= --dropout < 1 and --reward-scale > 0")
    if args.embed_dim % args.n_head:
        raise ValueError(f"--embed-dim {args.embed_dim} must be divisible by --n-head {args.n_head}")
    if args.return_loss_weight < 0:
        raise ValueError(f"--return-loss-weight must be >= 0, got {args.return_loss_weight}")
    if args.return_bins == 1 or args.return_bins < 0:
        raise ValueError(f"--return-bins must be 0 (plain DT) or >= 2, got {args.return_bins}")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by dt.py)")
    return args


def load_dt_checkpoint(path, args: Args) -> dict:
    ckpt = common.load_checkpoint(path, required=("model", "args", "state_mean", "state_std", "obs_dim"))
    if ckpt.get("algo") != "dt":
        raise common.CheckpointError(f"checkpoint {path} was not written by dt.py (algo={ckpt.get('algo')!r})")
    saved = ckpt["args"]
    if saved["env"] != args.env:
        raise ValueError(f"checkpoint {path} was trained on env {saved['env']!r}; pass --env {saved['env']}")
    for f in MODEL_FIELDS:
        if saved[f] != getattr(args, f):
            raise ValueError(f"checkpoint {path} has {f}={saved[f]} but this run has {getattr(args, f)}; "
                             f"pass --{f.replace('_', '-')} {saved[f]}")
    return ckpt


def train_step(fwd, model, optimizer, scheduler, batch, args: Args) -> dict:
    """One update on a batch from TrajectoryData.sample; returns the losses as tensors (no host sync)."""
    states, actions, returns, timesteps, mask = batch
    with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        pred, logits = fwd(states, actions, returns, timesteps)
    m = mask.float()
    # Sec. 3: MSE on the predicted actions of the real (unpadded) steps.
    action_loss = (((pred.float() - actions) ** 2).mean(-1) * m).sum() / m.sum()
    out = dict(action_loss=action_loss, total_loss=action_loss)
    if logits is not None:  # MGDT Sec. 3.3: cross-entropy on the return bin, predicted at s_t
        ce = F.cross_entropy(logits.float().flatten(0, 1), returns.flatten(), reduction="none")
        out["return_loss"] = (ce * m.flatten()).sum() / m.sum()
        out["total_loss"] = action_loss + args.return_loss_weight * out["return_loss"]
    optimizer.zero_grad(set_to_none=True)
    out["total_loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # after backward, before the step
    optimizer.step()
    scheduler.step()
    return {k: v.detach() for k, v in out.items()}


def make_optimizer(model, args: Args):
    """AdamW on every parameter, linear warmup then constant (official gym code)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(args.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 1.0))
    return optimizer, scheduler


def main(argv=None) -> dict:
    args = check_args(common.parse_args(Args, argv))
    common.set_seed(args.seed)
    device = common.get_device(args.cuda)

    if args.eval_only:  # ------------------------------------------------- evaluate a checkpoint
        ckpt = load_dt_checkpoint(args.checkpoint, args)
        model = DecisionTransformer(ckpt["obs_dim"], ckpt["act_dim"], args).to(device)
        model.load_state_dict(ckpt["model"])
        bins = ReturnBins(*ckpt["return_range"], args.return_bins) if args.return_bins else None
        results = evaluate(model, args, ckpt["state_mean"], ckpt["state_std"], device, bins)
        first = next(iter(results.values()))
        print(f"[dt] eval-only {args.checkpoint} (step {ckpt['step']}): " +
              ", ".join(f"{k}: return {v['return_mean']:.1f}, D4RL-normalized {v['normalized_score']:.1f}"
                        for k, v in results.items()))
        return dict(step=ckpt["step"], return_mean=first["return_mean"],
                    normalized_score=first["normalized_score"], eval=results)

    ckpt = load_dt_checkpoint(args.resume, args) if args.resume else None
    data = common.load_dataset(args.env, args.dataset, path=args.dataset_path, seed=0)
    data = TrajectoryData(data, args, device, *(
        (ckpt["state_mean"], ckpt["state_std"], ckpt["return_range"]) if ckpt else ()))
    print(f"[dt] {args.env}/{args.dataset}: {data.n_episodes} episodes, {data.n_transitions} transitions; "
          f"device {device}" + (f"; return bins {args.return_bins} over [{data.bins.lo:.3f}, {data.bins.hi:.3f}]"
                                if data.bins else ""))
    model = DecisionTransformer(data.obs_dim, data.act_dim, args).to(device)
    optimizer, scheduler = make_optimizer(model, args)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # the batch sampler's RNG
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["data_rng"])
        common.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    run_dir = args.run_dir or (str(Path(args.resume).parent) if args.resume else None)
    logger = common.RunLogger(args, "dt", run_dir=run_dir, tensorboard=args.tensorboard, track=args.track)
    ckpt_path = logger.dir / "checkpoint.pt"
    fwd = torch.compile(model) if args.compile else model

    def save():
        common.save_checkpoint(ckpt_path, dict(
            algo="dt", model=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), step=step, rng=common.rng_state(), data_rng=gen.get_state(),
            state_mean=data.state_mean, state_std=data.state_std, obs_dim=data.obs_dim, act_dim=data.act_dim,
            return_range=(data.bins.lo, data.bins.hi) if data.bins else None, args=dataclasses.asdict(args)))

    def run_eval():
        results = evaluate(model, args, data.state_mean, data.state_std, device, data.bins)
        first = next(iter(results.values()))  # headline: the first target (or expert inference)
        metrics = {"eval/return_mean": first["return_mean"], "eval/normalized_score": first["normalized_score"]}
        for name, r in results.items():
            metrics[f"eval/{name}/return_mean"] = r["return_mean"]
            metrics[f"eval/{name}/normalized_score"] = r["normalized_score"]
        logger.log(step, **metrics)
        return dict(step=step, return_mean=first["return_mean"], normalized_score=first["normalized_score"],
                    eval=results)

    model.train()
    last, score, t0, t_step = None, float("nan"), time.time(), step
    bar = tqdm(total=args.total_steps, initial=step, desc="dt", unit="upd")
    try:
        while step < args.total_steps:
            batch = data.sample(args.batch_size, args.context_len, gen)
            losses = train_step(fwd, model, optimizer, scheduler, batch, args)
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == args.total_steps:
                sps = (step - t_step) / (time.time() - t0)
                t0, t_step = time.time(), step
                logs = {f"losses/{k}": v.item() for k, v in losses.items()}
                logs.update({"charts/learning_rate": scheduler.get_last_lr()[0], "charts/SPS": sps})
                logger.log(step, **logs)
                bar.set_postfix(loss=f"{logs['losses/total_loss']:.4f}", score=f"{score:.1f}")
            if step % args.eval_every == 0 or step == args.total_steps:
                last = run_eval()
                score = last["normalized_score"]
                bar.set_postfix(loss=f"{losses['total_loss'].item():.4f}", score=f"{score:.1f}")
                save()
                t0 = time.time()  # keep evaluation time out of the SPS
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"\n[dt] interrupted at step {step}: saved {ckpt_path}; continue with --resume {ckpt_path}")
        logger.close()
        raise SystemExit(130)
    bar.close()
    if last is None:  # resumed at or past total_steps: evaluate what we have
        last = run_eval()
        save()
    logger.close()
    print(f"[dt] step {step}: " + ", ".join(
        f"{k}: return {v['return_mean']:.1f}, D4RL-normalized {v['normalized_score']:.1f}"
        for k, v in last["eval"].items()) + f"; run folder {logger.dir}")
    last["run_dir"] = str(logger.dir)
    return last


if __name__ == "__main__":
    main()
