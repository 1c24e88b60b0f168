"""Decision Transformer (Chen et al. 2021, arXiv 2106.01345) and Multi-Game Decision Transformer
(Lee et al. 2022, arXiv 2205.15241). DT: a causal GPT over (R_t, s_t, a_t) tokens trained offline
(Sec. 3), rolled out return-conditioned (Algorithm 1), with the official gym code's defaults
(kzl/decision-transformer). MGDT (--env minatar/<game>+..., atari/<Game>): one model on several
games, per step [patches of o_t, R_t, a_t, r_t] as discrete tokens (Sec. 3.1-3.2), expert action
inference (Sec. 3.4), fine-tuning (Sec. 4.5). Data-parallel under torchrun (README).

Named deviations (and why):
  * Right padding: a short window's pads follow its real steps, so causal attention needs no
    padding mask (official DT: left padding + mask); real steps' outputs are equal (tested).
  * DT: Gymnasium v5 MuJoCo and make_datasets.py's ARS data (D4RL's are not installable
    offline): scores are "D4RL-normalized". MGDT: MinAtar DQN data (Atari needs DQN-Replay files).
  * MGDT returns: 121 classes clip(int(R), -20, 100) + 20 (the official 120 leave R >= 100 out).
  * MGDT conditions on R_t at every step (Sec. 3; the released model masks all but the first).
  * MinAtar: 5x5 patches (2x2 grid), channels zero-padded to seaquest's 10 (one patch embedding
    for all games), values 0/1 taken as they are (Atari frames / 255 as the official code).
  * --expert-kappa 0: one draw from P(R_t) (kappa > 0: the official best of 128 at T = 0.75).
  * CPU dropout keeps where 16 random bits >= p 2^16: p rounds to k 2^-16 (0.1: 0.100006), for
    4x fewer draws of the serial CPU generator (bernoulli_ draws one per element).
  * MGDT return head's bias starts at the data's log class frequencies (unseen: log 1e-9): from
    PyTorch's init, CPU budgets leave unseen R enough mass that kappa 10 draws them (README).

    python dt.py --env hopper                    # DT paper config: 100k updates on hopper/medium
    python dt.py --env minatar/asterix+minatar/breakout+minatar/freeway+minatar/seaquest
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# Official gym code (experiment.py): targets per env (the first is the headline), `scale`,
# max_ep_len; AdamW weight decay; seq_trainer.py: the gradient-norm clip.
TARGET_RETURNS = {"hopper": (3600, 1800), "halfcheetah": (12000, 6000), "walker2d": (5000, 2500)}
REWARD_SCALE = 1000.0  # returns-to-go and rewards are divided by this, in training and rollouts
MAX_EP_LEN = 1000      # timestep-embedding size; later steps use the last row (official cutoff)
WEIGHT_DECAY, GRAD_CLIP, LOG_EVERY = 1e-4, 0.25, 100  # LOG_EVERY (ours): updates per loss log
# MGDT (Sec. 3.2, official colab): return classes, reward classes (0 none, 1 positive, 2 episode
# end (never produced), 3 negative), expert inference, action sampling; return-prior floor (ours).
RETURN_MIN, RETURN_MAX = -20, 100
N_RETURNS, N_REWARDS = RETURN_MAX - RETURN_MIN + 1, 4
RETURN_SAMPLES, RETURN_TEMPERATURE, ACTION_TOP_PERCENTILE, RETURN_PRIOR_FLOOR = 128, 0.75, 50, 1e-9
# family: frame H, W, channels, patch size, actions (one set for all games), pixel scale, step cap
GAME_SPEC = {"minatar": (10, 10, 10, 5, 6, 1.0, 2500),  # MinAtar's cap: make_datasets.py's
             "atari": (84, 84, 1, 14, 18, 255.0, 27_000)}  # Atari: 108k frames / frame skip 4
GAMES = tuple(f"{family}/" for family in GAME_SPEC)  # --env prefixes of MGDT's games

@dataclasses.dataclass
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
    """hopper, halfcheetah, walker2d, a Gymnasium id; MGDT: minatar/<game>, atari/<Game>, a+b"""
    dataset: Optional[str] = None
    """random, medium (default), medium-replay, expert, medium-expert, a Minari id; games: dqn"""
    dataset_path: Optional[str] = None
    """read the dataset from this .npz / D4RL .hdf5 file (games: a DQN-Replay folder) instead"""
    total_steps: int = 100_000
    """gradient updates (official: 10 iterations x 10k steps)"""
    batch_size: int = 64
    """windows per update (games: uniform over games); torchrun: per process (x processes in all)"""
    lr: float = 1e-4
    """AdamW learning rate (weight decay 1e-4)"""
    eval_every: int = 10_000
    """evaluate and checkpoint every this many updates; the last evaluation is the reported one"""
    eval_episodes: int = 100
    """evaluation episodes per target return (games: per game), run at once (vectorized)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's limit; MinAtar 2500 steps)"""
    bf16: bool = False
    """bfloat16 autocast for training and evaluation (fp32 is the paper's)"""
    resume: Optional[str] = None
    """continue this checkpoint's run (its model, data, optimiser settings) up to --total-steps"""
    eval_only: bool = False
    """only evaluate --checkpoint (the architecture comes from the checkpoint)"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only; without it: fine-tune its weights (Sec. 4.5)"""
    target_returns: Optional[tuple[float, ...]] = None
    """returns to condition on (DT default: the official ones, hopper 3600 1800); games: one per
    game (or one for all) replaces expert inference by return-conditioned DT"""
    context_len: Optional[int] = None
    """K, timesteps in the context (default: DT 20, MGDT 4 as the paper)"""
    embed_dim: int = 128
    """d, the transformer width"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 1
    """attention heads"""
    dropout: float = 0.1
    """dropout on embeddings (DT), attention weights and residual branches"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup, then constant"""
    decay_steps: int = 0
    """then a linear decay to 0 over the last this many updates (0: none, as DT; README's MGDT)"""
    expert_kappa: float = 10.0
    """MGDT expert inference: kappa in log P(R) + kappa (R - R_low) / (R_high - R_low) (Sec. 3.4)"""
    data_fraction: float = 1.0
    """games: train on this fraction of each game's episodes (a seeded random subset; Sec. 4.5)"""

# ---- data (DT Sec. 3 "Training"; official experiment.py get_batch)
class Episodes:
    """Episode bookkeeping of a flat dataset on the device, and its window sampler."""
    def __init__(self, lengths, device, probs=None):
        self.lengths = torch.as_tensor(lengths, device=device)                     # (episodes,)
        self.starts = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)[:-1]]), device=device)
        probs = lengths / lengths.sum() if probs is None else probs  # default (DT): by length
        self.probs = torch.as_tensor(probs, dtype=torch.float32, device=device)
    def sample(self, B: int, K: int, gen: torch.Generator, rank: int = 0, world: int = 1):
        """K-step windows from a uniform start in [0, len) of episodes drawn by `probs` -> `fields`
        at their rows (B, K, ...), zero past the episode's end (right padding), and the real steps'
        mask (B, K). torchrun: each rank draws one stream's B x world windows, keeps its B."""
        dev, n, mine = self.lengths.device, B * world, slice(rank * B, (rank + 1) * B)
        ep = torch.multinomial(self.probs, n, replacement=True, generator=gen)[mine]       # (B,)
        start = (torch.rand(n, device=dev, generator=gen)[mine] * self.lengths[ep]).long()
        offs = start[:, None] + torch.arange(K, device=dev)                                # (B, K)
        mask = offs < self.lengths[ep][:, None]                                            # (B, K)
        idx = torch.where(mask, self.starts[ep][:, None] + offs, 0)  # pads read row 0
        return (*(torch.where(mask.view(*mask.shape, *[1] * (x.ndim - 1)), x[idx], 0)
                  for x in self.fields), mask)

class TrajectoryData(Episodes):
    """All episodes flat on the device: z-scored states, returns-to-go (gamma 1) / REWARD_SCALE."""
    def __init__(self, data: dict, args: Args, device):
        episodes, obs = common.split_episodes(data), data["observations"]
        self.state_mean = torch.as_tensor(obs.mean(0), dtype=torch.float32)       # (obs_dim,)
        self.state_std = torch.as_tensor(obs.std(0) + 1e-6, dtype=torch.float32)  # (obs_dim,)
        lengths = np.array([len(ep["rewards"]) for ep in episodes])
        super().__init__(lengths, device)
        rtg = np.concatenate([common.returns_to_go(ep["rewards"]) for ep in episodes])
        steps = np.concatenate([np.arange(n) for n in lengths]).clip(max=MAX_EP_LEN - 1)
        def t(x, dtype=torch.float32):
            return torch.as_tensor(x, dtype=dtype, device=device)
        self.states = t((obs - self.state_mean.numpy()) / self.state_std.numpy())    # (N, obs_dim)
        self.actions = t(data["actions"])                                           # (N, act_dim)
        self.rtg, self.timesteps = t(rtg / REWARD_SCALE), t(steps, torch.long)      # (N,), (N,)
        self.fields = (self.states, self.actions, self.rtg, self.timesteps)  # sample() order
    def stats(self) -> dict:
        """What a policy needs besides the weights (saved in the checkpoint, no numpy)."""
        return dict(state_mean=self.state_mean, state_std=self.state_std,
                    obs_dim=self.states.shape[1], act_dim=self.actions.shape[1])

def encode_return(R: torch.Tensor) -> torch.Tensor:
    """MGDT Sec. 3.2 / official encode_return: clip(int(R), -20, 100) + 20 (int() truncates)."""
    return R.trunc().clamp(RETURN_MIN, RETURN_MAX).long() - RETURN_MIN

def encode_reward(r: torch.Tensor) -> torch.Tensor:
    """Official encode_reward: 0 for r == 0, 1 for r > 0, 3 for r < 0 (raw, unclipped r)."""
    return (r > 0).long() + 3 * (r < 0).long()

class GameData(Episodes):
    """Several games' episodes on the device: frames (N, H, W, C) uint8 (channels zero-padded to
    the family's), return-to-go classes (gamma 1, raw rewards), actions (indices in the family's
    one action set), reward classes. A window's game is drawn uniformly (the paper's DQN-Replay
    games hold equal data: uniform = proportional there), its episode in proportion to length."""
    def __init__(self, datasets: dict, args: Args, device):
        self.games, self.family = list(datasets), next(iter(datasets)).split("/")[0]
        H, W, C = GAME_SPEC[self.family][:3]
        episodes, probs, self.refs = [], [], []
        for game, data in datasets.items():
            obs = data["observations"]
            if obs.ndim != 4 or obs.shape[1:3] != (H, W) or obs.shape[3] > C:
                raise common.DatasetError(f"{game}: observations of shape {obs.shape}, expected "
                                          f"(N, {H}, {W}, <= {C}) for {self.family}")
            rows = {k: v for k, v in data.items() if np.ndim(v)}  # not the 0-d references
            rows["observations"] = np.pad(obs, ((0, 0), (0, 0), (0, 0), (0, C - obs.shape[3])))
            eps = common.split_episodes(rows)
            if args.data_fraction < 1:  # whole episodes at random, up to the fraction of rows
                order = np.random.default_rng(args.seed).permutation(len(eps))
                n = np.cumsum([len(eps[i]["rewards"]) for i in order])
                eps = [eps[i] for i in sorted(order[:np.searchsorted(n, args.data_fraction * n[-1])
                                                    + 1])]
            n = sum(len(ep["rewards"]) for ep in eps)
            episodes += eps
            probs += [len(ep["rewards"]) / n / len(datasets) for ep in eps]
            self.refs.append([float(data["ref_random"]), float(data["ref_expert"])])
        super().__init__(np.array([len(ep["rewards"]) for ep in episodes]), device, probs)
        def cat(key):
            return torch.as_tensor(np.concatenate([ep[key] for ep in episodes]), device=device)
        rtg = np.concatenate([common.returns_to_go(ep["rewards"]) for ep in episodes])
        self.obs, self.actions = cat("observations"), cat("actions").long()
        self.returns = encode_return(torch.as_tensor(rtg, device=device))
        self.rewards = encode_reward(cat("rewards"))
        self.fields = (self.obs, self.returns, self.actions, self.rewards)  # sample() order
    def stats(self) -> dict:
        return dict(family=self.family, games=self.games, refs=self.refs)

# ---- model (DT Sec. 3 "Architecture": GPT-2 blocks of the official vendored trajectory_gpt2.py)
def dropout(x, p: float, training: bool):
    """F.dropout; on CPU (speed): keep x where 16 random bits, a quarter of one 64-bit draw, are
    >= p 2^16 (a deviation, above), then scale by 1 / (1 - p)."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= round(p * 2**16) - 2**15
    return x * keep.to(x.dtype).mul_(1 / (1 - p))

class Block(nn.Module):
    """Pre-LN GPT-2 block: causal (or `mask`) attention + 4d MLP (ReLU: official DT, MGDT: GELU)."""
    def __init__(self, args: Args, act: Optional[nn.Module] = None):
        super().__init__()
        d, self.n_head, self.p = args.embed_dim, args.n_head, args.dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), act or nn.ReLU(), nn.Linear(4 * d, d))
    def forward(self, x, rows=slice(None), mask=None):
        """x (B, T, d) -> (B, T', d) at `rows`, the T' tokens whose outputs are needed (only they
        are queries; keys, values: all T); mask (T, T): True = may attend (default: causal)."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, x = q[:, rows], x[:, rows]
        q, k, v = (z.view(B, z.shape[1], self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        if mask is None:  # causal
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask, p = mask[rows], self.p if self.training else 0.0
        if p and x.device.type == "cpu":  # written out, for dt.dropout's cheaper CPU masks
            att = (q @ k.transpose(2, 3) / q.shape[-1] ** 0.5).masked_fill(~mask, -torch.inf)
            y = dropout(att.softmax(-1), p, True) @ v                  # (B, heads, T', d / heads)
        else:  # the same, fused (tested equal)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, q.shape[2], d)                   # (B, T', d)
        x = x + dropout(self.proj(y), self.p, self.training)  # residual dropout: attention, MLP
        return x + dropout(self.mlp(self.ln2(x)), self.p, self.training)

class DecisionTransformer(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        d = args.embed_dim
        self.embed_timestep = nn.Embedding(MAX_EP_LEN, d)  # one per step, added to its 3 tokens
        self.embed_state, self.embed_action = nn.Linear(obs_dim, d), nn.Linear(act_dim, d)
        self.embed_return, self.embed_ln, self.p = nn.Linear(1, d), nn.LayerNorm(d), args.dropout
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.predict_action = nn.Sequential(nn.Linear(d, act_dim), nn.Tanh())
        for m in (m for m in self.blocks.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)  # vendored GPT-2 init: each Linear N(0, 0.02),
            nn.init.zeros_(m.bias)  # bias 0 (embeddings and heads outside it: PyTorch defaults)
    def tokens(self, states, actions, returns, timesteps):
        """R_t, s_t, a_t per step, each + its timestep embedding; LayerNorm, dropout: (B, 3K, d)"""
        x = torch.stack((self.embed_return(returns.unsqueeze(-1)), self.embed_state(states),
                         self.embed_action(actions)), dim=2)                       # (B, K, 3, d)
        x = x + self.embed_timestep(timesteps).unsqueeze(2)  # + each step's timestep embedding
        return dropout(self.embed_ln(x.flatten(1, 2)), self.p, self.training)        # (B, 3K, d)
    def forward(self, states, actions, returns, timesteps, rows=slice(1, None, 3)):
        """states (B,K,obs), actions (B,K,act), returns, timesteps (B,K) -> a_t at s_t (B,K,act).
        Exact speed-ups (tested): a_K's token is left out (nothing reads it), and the last block
        computes the `rows` the head reads alone (default: every s_t)."""
        x = self.tokens(states, actions, returns, timesteps)[:, :-1]                # (B, 3K-1, d)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.predict_action(self.ln_f(self.blocks[-1](x, rows)))             # (B, K, act)
    @torch.no_grad()
    def predict_last(self, states, actions, returns, timesteps):
        """-> forward()[:, -1], (B, act): the last block computes the last s_t's row alone."""
        return self(states, actions, returns, timesteps, rows=slice(-1, None))[:, 0]

def game_mask(K: int, P: int) -> torch.Tensor:
    """(L, L) bool, L = K (P + 3): causal + a frame's P patches see each other (official colab)."""
    i = torch.arange(K * (P + 3))
    patch = i % (P + 3) < P
    same_frame = (i[:, None] // (P + 3) == i[None] // (P + 3)) & patch[:, None] & patch[None]
    return (i[:, None] >= i[None]) | same_frame

class MultiGameDT(nn.Module):
    """MGDT (Sec. 3.1; official colab): per step [P patch tokens of o_t, R_t, a_t, r_t]; patches
    by a strided conv (non-overlapping) + a learned per-patch position encoding, every token + a
    learned position embedding over the window; heads (the next token): R_t at o_t's last
    patch, a_t at R_t, r_t at a_t. PyTorch's default init, N(0, 0.02) position encodings."""
    def __init__(self, family: str, args: Args):
        super().__init__()
        H, W, C, p, n_actions, self.scale, _ = GAME_SPEC[family]
        d, self.P = args.embed_dim, (H // p) * (W // p)
        self.patch = nn.Conv2d(C, d, p, stride=p)
        self.patch_pos = nn.Parameter(0.02 * torch.randn(self.P, d))
        self.pos = nn.Parameter(0.02 * torch.randn(args.context_len * (self.P + 3), d))
        self.embed_return, self.embed_action, self.embed_reward = (
            nn.Embedding(n, d) for n in (N_RETURNS, n_actions, N_REWARDS))
        self.blocks = nn.ModuleList(Block(args, nn.GELU("tanh")) for _ in range(args.n_layer))
        self.ln_f, self.predict_action = nn.LayerNorm(d), nn.Linear(d, n_actions)
        self.predict_return, self.predict_reward = nn.Linear(d, N_RETURNS), nn.Linear(d, N_REWARDS)
        self.register_buffer("mask", game_mask(args.context_len, self.P), persistent=False)
    def tokens(self, obs, returns, actions, rewards):
        """obs (B, K, H, W, C) uint8; returns, actions, rewards (B, K) -> (B, K (P + 3), d)"""
        B, K = actions.shape
        x = obs.flatten(0, 1).permute(0, 3, 1, 2).float() / self.scale          # (BK, C, H, W)
        patches = self.patch(x).flatten(2).transpose(1, 2) + self.patch_pos     # (BK, P, d)
        Rar = torch.stack((self.embed_return(returns), self.embed_action(actions),
                           self.embed_reward(rewards)), dim=2)                   # (B, K, 3, d)
        x = torch.cat((patches.unflatten(0, (B, K)), Rar), dim=2).flatten(1, 2)
        return x + self.pos[:x.shape[1]]
    def forward(self, obs, returns, actions, rewards):
        """-> logits of R_t (B, K, 121), a_t (B, K, actions), r_t (B, K, 4)."""
        x = self.tokens(obs, returns, actions, rewards)
        L, P = x.shape[1], self.P
        for block in self.blocks:
            x = block(x, mask=self.mask[:L, :L])
        x = self.ln_f(x).unflatten(1, (-1, P + 3))                               # (B, K, P+3, d)
        return (self.predict_return(x[:, :, P - 1]), self.predict_action(x[:, :, P]),
                self.predict_reward(x[:, :, P + 1]))

def loss_fn(pred, actions, mask, n=None) -> dict:
    """DT Sec. 3 / seq_trainer.py: MSE of real steps' actions, summed / n (default: their count)."""
    n = mask.sum() if n is None else n                                    # mask (B, K) bool
    action_loss = (((pred.float() - actions) ** 2).mean(-1) * mask).sum() / n
    return dict(action_loss=action_loss, total_loss=action_loss)

def game_loss(logits, batch, n=None) -> dict:
    """Official sequence_loss: the mean of the R_t, a_t and r_t cross-entropies over the real
    steps (summed / n, default their number); patch tokens get no loss (nothing predicts o_t)."""
    *_, returns, actions, rewards, mask = batch
    m = mask.float()
    out = {f"{k}_loss": (F.cross_entropy(z.float().transpose(1, 2), y, reduction="none")
                         * m).sum() / (m.sum() if n is None else n)
           for k, z, y in zip(("return", "action", "reward"), logits, (returns, actions, rewards))}
    out["total_loss"] = sum(out.values()) / 3
    return out

def make_optimizer(model, args: Args):
    """AdamW (fused); lr * min((s + 1) / warmup, 1, (total - s) / decay): DT's warmup, our decay."""
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=WEIGHT_DECAY, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / max(args.warmup_steps, 1), 1,
        (args.total_steps - s) / args.decay_steps if args.decay_steps else 1))  # 0: no decay

# ---- policy (DT Algorithm 1; MGDT Sec. 3.4), batched over episodes (and games)
def shift_window(buffers, t: int) -> int:
    """-> step t's slot in window buffers (N, K, ...): min(t, K - 1), a full window shifted left."""
    if t >= (K := buffers[0].shape[1]):  # window full: drop the oldest step
        for buf in buffers:
            buf[:, :-1] = buf[:, 1:].clone()
    return min(t, K - 1)

class DTPolicy:
    """N episodes at once, their last K steps in device buffers, right-padded as in training.
    Episodes that observe() reports done get no more forward passes (their actions are 0)."""
    def __init__(self, model: DecisionTransformer, args: Args, state_mean, state_std, target=None):
        self.model, self.args, self.target = model, args, target
        self.device = next(model.parameters()).device
        self.mean = torch.as_tensor(state_mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(state_std, dtype=torch.float32, device=self.device)
    def reset(self, n: int):
        K, dev, act_dim = self.args.context_len, self.device, self.model.embed_action.in_features
        self.states = torch.zeros(n, K, self.mean.numel(), device=dev)
        self.actions = torch.zeros(n, K, act_dim, device=dev)
        self.returns = torch.zeros(n, K, device=dev)
        self.timesteps = torch.zeros(n, K, device=dev, dtype=torch.long)
        self.next_return = torch.full((n,), (self.target or 0.0) / REWARD_SCALE, device=dev)
        self.live, self.t = np.ones(n, dtype=bool), 0  # on the host: the env's dones arrive there
    @torch.no_grad()
    def __call__(self, obs):
        """obs (N, obs_dim) -> actions (N, act_dim), numpy."""
        buffers = (self.states, self.actions, self.returns, self.timesteps)
        p = shift_window(buffers, self.t)
        self.states[:, p] = (torch.as_tensor(obs, device=self.device) - self.mean) / self.std
        self.actions[:, p] = 0.0  # a_t is not known yet; causality hides it from s_t and R_t
        self.timesteps[:, p] = min(self.t, MAX_EP_LEN - 1)
        self.returns[:, p] = self.next_return                     # Alg. 1: condition on R_t
        live = torch.as_tensor(np.flatnonzero(self.live), device=self.device)
        rows = slice(None) if self.live.all() else live  # finished episodes: no forward pass
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            act = self.model.predict_last(*(b[rows, :p + 1] for b in buffers))
        self.actions[rows, p] = act.float()                       # Alg. 1: a_t = DT(R, s, a, t)
        return self.actions[:, p].cpu().numpy().copy()                             # (N, act)
    def observe(self, rewards, dones):
        p = min(self.t, self.args.context_len - 1)
        r = torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
        self.next_return = self.returns[:, p] - r / REWARD_SCALE  # Alg. 1: R_{t+1} = R_t - r_t
        self.live &= ~np.asarray(dones, dtype=bool)
        self.t += 1

def sample_expert_return(logits, kappa: float, gen=None):
    """MGDT Sec. 3.4 / official optimal_action: logits + kappa linspace(0, 1, N) (= log P(R) +
    kappa (R - R_low) / (R_high - R_low) + const), 128 draws at temperature 0.75, the largest
    kept. kappa 0: one draw from P(R). logits (n, N) -> classes (n,)."""
    if kappa == 0:
        return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)[:, 0]
    tilt = kappa * torch.linspace(0, 1, logits.shape[-1], device=logits.device)
    probs = torch.softmax((logits.float() + tilt) / RETURN_TEMPERATURE, -1)
    return torch.multinomial(probs, RETURN_SAMPLES, replacement=True, generator=gen).amax(-1)

def sample_action(logits, gen=None):
    """Official: T = 1 over the logits above their 50th percentile (and the max): (n, A) -> (n,)."""
    logits = logits.float()
    cut = torch.quantile(logits, ACTION_TOP_PERCENTILE / 100, dim=-1, keepdim=True)
    keep = (logits > cut) | (logits == logits.amax(-1, keepdim=True))
    probs = torch.softmax(logits.masked_fill(~keep, -torch.inf), -1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]

class GamePolicy:
    """MGDT in N episodes at once, windows as DTPolicy's: per step R_t from the return head (expert
    inference, kappa) or a target minus the rewards so far (`targets` (N,)), then a_t."""
    def __init__(self, model: MultiGameDT, args: Args, stats: dict):
        self.model, self.args, self.stats = model, args, stats
        self.device = next(model.parameters()).device
        self.gen = torch.Generator(device=self.device)
        self.kappa, self.targets = args.expert_kappa, None  # evaluate() sets both
    def reset(self, n: int):
        K, (H, W, C) = self.args.context_len, GAME_SPEC[self.stats["family"]][:3]
        self.obs = torch.zeros(n, K, H, W, C, dtype=torch.uint8, device=self.device)
        self.tok = torch.zeros(n, K, 3, dtype=torch.long, device=self.device)  # R, a, r classes
        self.left = None if self.targets is None else torch.as_tensor(
            self.targets, dtype=torch.float64, device=self.device)   # (n,) return still to get
        self.live, self.t = np.ones(n, dtype=bool), 0
        self.gen.manual_seed(self.args.seed)
    def _logits(self, rows, p: int, head: int):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            window = (self.obs[rows, :p + 1], *self.tok[rows, :p + 1].unbind(-1))
            return self.model(*window)[head][:, p].float()
    @torch.no_grad()
    def __call__(self, obs):
        """obs (N, H, W, C) uint8 -> actions (N,) int64 numpy (finished episodes': ignored)."""
        p = shift_window((self.obs, self.tok), self.t)
        self.obs[:, p] = torch.as_tensor(obs, device=self.device)
        rows = torch.as_tensor(np.flatnonzero(self.live), device=self.device)
        # R_t: Sec. 3.4's draw from P(R_t | o_t, history) tilted to high returns, or the target's
        self.tok[rows, p, 0] = (sample_expert_return(self._logits(rows, p, 0), self.kappa, self.gen)
                                if self.left is None else encode_return(self.left[rows]))
        self.tok[rows, p, 1] = sample_action(self._logits(rows, p, 1), self.gen)
        return self.tok[:, p, 1].cpu().numpy()
    def observe(self, rewards, dones):
        p, r = min(self.t, self.args.context_len - 1), torch.as_tensor(rewards, device=self.device)
        self.tok[:, p, 2] = encode_reward(r)
        if self.left is not None:
            self.left -= r
        self.live &= ~np.asarray(dones, dtype=bool)
        self.t += 1

def evaluate(policy, args: Args) -> dict:
    """DT: each target return of policy.args (default: its env's) on args.eval_episodes episodes at
    once; games: every game at once, expert inference or --target-returns. -> each entry's mean
    return and normalized score, and the headline (DT: the first target's; games: the mean)."""
    n, seed, res = args.eval_episodes, args.seed + 10_000, {}
    if games := isinstance(policy, GamePolicy):
        s, policy.kappa = policy.stats, args.expert_kappa
        targets = args.target_returns and np.broadcast_to(args.target_returns, len(s["games"]))
        policy.targets = None if targets is None else np.repeat(targets, n)
        r = common.evaluate(policy, "+".join(s["games"]), n, seed,
                            args.eval_max_steps or GAME_SPEC[s["family"]][-1])  # game k: k n..
        for game, (lo, hi), R in zip(s["games"], s["refs"], r["returns"].reshape(-1, n)):
            res[game.split("/")[1]] = dict(returns=R, normalized=(R - lo) / (hi - lo))
    else:
        for target in policy.args.target_returns or TARGET_RETURNS[policy.args.env]:
            policy.target = target
            res[f"target{target:g}"] = common.evaluate(policy, policy.args.env, n, seed,
                                                       args.eval_max_steps, dataset=args.dataset)
    out = {f"eval/{name}/{key}": float(r[field].mean()) for name, r in res.items()
           for key, field in (("return_mean", "returns"), ("normalized_score", "normalized"))}
    for key in ("return_mean", "normalized_score"):
        values = [v for k, v in out.items() if k.endswith("/" + key)]
        out[f"eval/{key}"] = float(np.mean(values) if games else values[0])
    print("[dt]", ", ".join(f"{k[5:]} {v:.2f}" for k, v in out.items() if k.count("/") == 2))
    return out

# ---- run
def check_args(args: Args) -> Args:
    """Clear errors for settings that cannot run; DT / MGDT defaults for dataset and K."""
    if not (games := args.env.startswith(GAMES)):
        common.env_id(args.env)  # an unknown env: a named error
        if not (args.target_returns or args.env in TARGET_RETURNS or args.eval_only or args.resume):
            raise ValueError(f"no default target returns for {args.env!r}: pass --target-returns R")
    elif len({g.split("/")[0] for g in args.env.split("+")}) > 1:
        raise ValueError(f"one action space: games of one family only, got {args.env!r}")
    args.dataset = args.dataset or ("dqn" if games else "medium")
    args.context_len = args.context_len or (4 if games else 20)
    for name in ("total_steps", "batch_size", "eval_every", "eval_episodes", "context_len",
                 "embed_dim", "n_layer", "n_head"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.embed_dim % args.n_head:
        raise ValueError(f"--embed-dim {args.embed_dim} is not divisible by --n-head {args.n_head}")
    if min(args.warmup_steps, args.decay_steps) < 0:
        raise ValueError("need --warmup-steps >= 0 and --decay-steps >= 0 (0: none)")
    if not 0 <= args.dropout < 1 or not 0 < args.data_fraction <= 1:
        raise ValueError("need 0 <= --dropout < 1 and 0 < --data-fraction <= 1")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by dt.py)")
    return args

def load_checkpoint(path) -> tuple[Args, dict]:
    ckpt = common.load_checkpoint(path, "dt")
    return Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__}), ckpt

def load_data(args: Args, device):
    """-> TrajectoryData (args.env becomes the dataset's env) or GameData of the games."""
    if not args.env.startswith(GAMES):
        dataset = common.load_dataset(args.env, args.dataset, path=args.dataset_path)
        args.env = dataset.env
        return TrajectoryData(dataset, args, device)
    return GameData({g: common.load_dataset(g, args.dataset, path=args.dataset_path)
                     for g in args.env.split("+")}, args, device)

def make_model(args: Args, stats: dict) -> nn.Module:
    """A fresh model for data.stats() (or a checkpoint, which holds them)."""
    return (MultiGameDT(stats["family"], args) if "games" in stats
            else DecisionTransformer(stats["obs_dim"], stats["act_dim"], args))

def run_args(args: Args):
    """-> the run's args and the weights it starts from (None: fresh). --resume: the checkpoint's
    args but this command's run length and evaluation; --checkpoint: fine-tuning (Sec. 4.5)."""
    if not (path := args.resume or args.checkpoint):
        return args, None
    saved, ckpt = load_checkpoint(path)
    if args.resume:
        keep = ("resume", "total_steps", "eval_every", "eval_episodes", "eval_max_steps", "cuda")
        return dataclasses.replace(saved, **{k: getattr(args, k) for k in keep}), None
    arch = ("embed_dim", "n_layer", "n_head", "context_len")  # the checkpoint's, and its weights
    return dataclasses.replace(args, **{k: getattr(saved, k) for k in arch}), ckpt["model"]

def make_policy(model, stats: dict, args: Args):
    if "games" in stats:
        return GamePolicy(model, args, stats)
    targets = args.target_returns or TARGET_RETURNS.get(args.env, (None,))
    return DTPolicy(model, args, stats["state_mean"], stats["state_std"], targets[0])

def main(argv=None) -> dict:
    args = check_args(common.parse_args(Args, argv))
    device = common.get_device(args.cuda)
    if args.eval_only:  # everything but the evaluation settings comes from the checkpoint
        policy = load_policy(args.checkpoint, device)
        policy.args.target_returns = args.target_returns or policy.args.target_returns
        return evaluate(policy, args)
    args, weights = run_args(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    if world > 1:  # a GPU per local rank; NCCL (gloo on CPU); a stuck collective raises after 1 h
        if device.type == "cuda":
            torch.cuda.set_device(device := torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        dist.init_process_group(timeout=timedelta(hours=1))
    common.set_seed(args.seed + rank)  # dropout differs by rank; DDP copies rank 0's weights
    data = load_data(args, device)
    model = make_model(args, data.stats()).to(device)
    weights is None or model.load_state_dict(weights)  # fine-tuning (Sec. 4.5)
    if weights is None and isinstance(data, GameData):  # deviation: return head bias = log prior
        freq = torch.bincount(data.returns, minlength=N_RETURNS) / len(data.returns)  # (121,)
        model.predict_return.bias.data.copy_(freq.clamp(min=RETURN_PRIOR_FLOOR).log())
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer, scheduler = make_optimizer(model, args)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # the batch sampler's stream
    run = common.Run(args, "dt", extra=data.stats(), model=model, optimizer=optimizer,
                     scheduler=scheduler, sampler=gen)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # --resume to a longer
        group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)  # run: the new rate
    print(f"[dt] {args.env}: {len(data.lengths)} episodes, {data.lengths.sum():d} steps, {device}")
    out = {}
    for step in run.loop(args.total_steps):
        *inputs, mask = batch = data.sample(args.batch_size, args.context_len, gen, rank, world)
        n = mask.sum().float()  # real steps; torchrun: the whole batch's / world, so that the
        if world > 1:           # mean of the ranks' gradients (DDP) is the whole batch's
            dist.all_reduce(n := n / world)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = ddp(*inputs)
        losses = (game_loss(outputs, batch, n) if isinstance(data, GameData)
                  else loss_fn(outputs, inputs[1], mask, n))
        optimizer.zero_grad(set_to_none=True)
        losses["total_loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # after backward, before step
        optimizer.step()
        scheduler.step()
        if run.every(LOG_EVERY):
            logged = torch.stack([v.detach().float() for v in losses.values()])
            if world > 1:  # the whole batch's losses: the mean over ranks
                dist.all_reduce(logged := logged / world)
            run.log(**{f"losses/{k}": v for k, v in zip(losses, logged)},
                    **{"charts/learning_rate": scheduler.get_last_lr()[0]})
        if run.every(args.eval_every):  # rank 0 alone evaluates; the others wait at the next step
            out = {} if rank else evaluate(make_policy(model.eval(), data.stats(), args), args)
            model.train()
            run.log(**out)
            run.save()
    out["run_dir"] = str(run.finish())
    world > 1 and (dist.barrier(), dist.destroy_process_group())  # no rank leaves mid-write
    return out

def load_policy(path, device="cpu"):
    """The batched policy of a dt.py checkpoint: policy.reset(n); act = policy(obs (n, obs_dim)
    or frames (n, H, W, C)); policy.observe(rewards, dones). DT conditions on the checkpoint's
    first target return; MGDT uses expert inference (policy.kappa, policy.targets)."""
    args, ckpt = load_checkpoint(path)
    (model := make_model(args, ckpt)).load_state_dict(ckpt["model"])
    return make_policy(model.to(device).eval(), ckpt, args)

if __name__ == "__main__":
    main()
