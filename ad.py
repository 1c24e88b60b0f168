"""Algorithm Distillation (AD): Laskin et al. 2022, arXiv 2210.14215, on Dark Room.

A source RL algorithm learns each training task from scratch; its learning histories (one
sequence across episodes each) train a causal transformer to predict actions (Sec. 4, Algorithm 1).
On held-out tasks it keeps its context across episodes and improves without weight updates (Sec. 5,
Fig. 4); ED, the same model trained on the histories' last episodes, does not. Envs (Sec. 5): Dark
Room (9x9, 5 actions, 20 steps from the centre, reward on every step at the goal), Dark Room Hard
(17x17, reward once), Dark Key-to-Door (9x9, 50 steps, +1 key, +1 door). Defaults, the appendix
table: 4 layers, 4 heads, d 64, FF 2048, post-norm, dropout 0.1, attention dropout 0.5, batch 128,
Adam (no weight decay), lr 3e-4 warmed from 2e-6, cosine, clip 1.
Deviations (named):
- source: tabular Q-learning (all histories at once, backward episode replay, epsilon 1 -> 0.05
  over the first 20% of episodes) instead of A3C, for a CPU budget; it also sees the stage.
- one token (s_t, a_{t-1}, r_{t-1}) per step instead of three: the same history, 3x shorter.
- the window holds whole episodes (4 = 80 steps); its first episode is in the loss only at the
  start of a history (elsewhere the learner acted on a past the window does not show).
- "sequence masking p 0.3" of the table is not implemented: the paper does not define it.
- not in the table, ours: warm-up over 5% of the updates, 8000 updates, one AD and one ED update
  per step (equal budgets); Key-to-Door episodes last 50 steps even after the door, key != door.
CPU run, 41 min on 2 cores (README): python ad.py --no-post-norm --ff-dim 256 --batch-size 64 \
    --lr 1e-3 --total-steps 5000 --attn-dropout 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import common


@dataclass
class Args:
    exp_name: str = "ad"
    """name of the experiment (in the run folder's name)"""
    seed: int = 0
    """seed of the task split, the source histories, training and evaluation"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "darkroom"
    """darkroom (9x9, 20 steps), darkroom-hard (17x17, reward once), key-to-door (9x9, 50 steps)"""
    dataset_path: Optional[str] = None
    """a histories .npz (keys observations, actions, rewards, tasks); default: Q-learning, cached"""
    split: tuple[int, ...] = (65, 16)
    """numbers of training and held-out tasks, drawn at random from all tasks (seeded)"""
    histories_per_task: int = 8
    """independent source learning runs (seeds) per training task"""
    source_episodes: int = 240
    """episodes of each source learning run, before subsampling"""
    subsample: int = 4
    """keep every k-th episode of each learning history (Sec. 4)"""
    q_eps_decay: float = 0.2
    """fraction of the source episodes over which its epsilon decays from 1 to 0.05"""
    context_episodes: int = 4
    """whole episodes in the transformer's window (Sec. 4: it must span several)"""
    n_layers: int = 4
    """transformer layers"""
    n_heads: int = 4
    """attention heads"""
    d_model: int = 64
    """embedding size"""
    ff_dim: int = 2048
    """feed-forward width (the table: 2048)"""
    dropout: float = 0.1
    """embedding and residual dropout"""
    attn_dropout: float = 0.5
    """attention dropout (0.5 sends SDPA to its slower path on a CPU: README)"""
    post_norm: bool = True
    """post-norm blocks as the table; --no-post-norm: pre-norm, faster to learn on a CPU budget"""
    total_steps: int = 8000
    """training steps; each makes one AD update and one ED update"""
    batch_size: int = 128
    """windows per batch"""
    lr: float = 3e-4
    """peak learning rate (warm-up from 2e-6, then cosine decay to 2e-6)"""
    eval_every: int = 1000
    """quick in-context evaluation of AD every N steps (0: only the final evaluation)"""
    eval_episodes: int = 50
    """episodes rolled in context, without clearing it, per held-out task (Fig. 4)"""
    resume: Optional[str] = None
    """checkpoint.pt to continue from"""
    eval_only: bool = False
    """only evaluate --checkpoint (AD and ED)"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""


N_ACTIONS = 5
MOVES = np.array([[-1, 0], [1, 0], [0, 1], [0, -1], [0, 0]])  # left, right, up, down, no-op
ENV_CONFIG = {"darkroom": dict(size=9, max_steps=20), "darkroom-hard": dict(size=17, max_steps=20),
              "key-to-door": dict(size=9, max_steps=50)}
Q_LR, Q_GAMMA, Q_EPS_END = 0.5, 0.9, 0.05   # the source's tabular Q-learning (ours)
EVAL_REPEATS, ED_EPISODES = 4, 8            # runs per held-out task; ED: the last 8 kept
LR_MIN, WARMUP = 2e-6, 0.05                 # lr warmed from 2e-6 over the first 5% of updates
GRAD_CLIP = 1.0

# ===== Environments (Sec. 5): N tasks of one variant stepped in lockstep with numpy =====
class BatchDarkRoom:
    """tasks (N, 2) goals, or (N, 4) key + door for key-to-door; obs (N, 2) int (x, y). Every
    episode starts at the centre and lasts max_steps steps (no early end), so all reset together."""
    def __init__(self, variant: str, tasks):
        if variant not in ENV_CONFIG:
            raise ValueError(f"unknown env {variant!r}: use one of {', '.join(ENV_CONFIG)}")
        self.variant, self.tasks = variant, np.array(tasks, dtype=np.int64).reshape(len(tasks), -1)
        self.size, self.max_steps = ENV_CONFIG[variant]["size"], ENV_CONFIG[variant]["max_steps"]
        need = 4 if variant == "key-to-door" else 2
        if self.tasks.shape[1] != need or self.tasks.min() < 0 or self.tasks.max() >= self.size:
            raise ValueError(f"{variant}: tasks must be (N, {need}) cells of a grid of {self.size}")
        self.n, self.n_stages = len(self.tasks), {"darkroom": 1, "darkroom-hard": 2}.get(variant, 3)
        self.reset()

    def reset(self) -> np.ndarray:
        self.pos = np.full((self.n, 2), self.size // 2)  # start at the centre
        self.stage = np.zeros(self.n, dtype=np.int64)     # rewards collected (hard, key-to-door)
        self.t = 0
        return self.pos.copy()

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, bool]:
        self.pos = np.clip(self.pos + MOVES[np.asarray(actions)], 0, self.size - 1)
        at_goal = (self.pos == self.tasks[:, :2]).all(1)
        if self.variant == "darkroom":         # reward 1 on every step spent on the goal
            rew = at_goal
        elif self.variant == "darkroom-hard":  # reward 1 the first time only
            rew = at_goal & (self.stage == 0)
        else:                                  # +1 at the key, then +1 at the door, once each
            rew = (at_goal & (self.stage == 0)) | ((self.pos == self.tasks[:, 2:]).all(1)
                                                   & (self.stage == 1))
        self.stage += rew if self.n_stages > 1 else 0
        self.t += 1
        return self.pos.copy(), rew.astype(np.float32), self.t >= self.max_steps

    def state_index(self) -> np.ndarray:
        """The source learner's tabular state (stage, x, y): privileged, it includes the stage."""
        return (self.stage * self.size + self.pos[:, 0]) * self.size + self.pos[:, 1]

    def optimal_returns(self) -> np.ndarray:
        """On the goal after d moves, then stay (d = 0: the no-op); key, then door."""
        T, dist = self.max_steps, lambda a, b: np.abs(a - b).sum(-1)
        d = np.maximum(dist(self.tasks[:, :2], self.size // 2), 1)
        if self.variant == "darkroom":
            return np.maximum(T - d + 1, 0).astype(float)
        if self.variant == "darkroom-hard":
            return (d <= T).astype(float)
        return (d <= T) + (d + dist(self.tasks[:, :2], self.tasks[:, 2:]) <= T).astype(float)

class DarkRoom(gym.Env):
    """One task as a Gymnasium env: obs (x, y) int64, 5 actions, truncated after max_steps."""
    def __init__(self, task=(0, 0), variant: str = "darkroom"):
        self._env = BatchDarkRoom(variant, np.asarray(task)[None])
        self.observation_space = gym.spaces.Box(0, self._env.size - 1, (2,), dtype=np.int64)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)

    def reset(self, *, seed=None, options=None):
        return self._env.reset()[0], {}  # deterministic: the seed changes nothing

    def step(self, action):
        obs, rew, done = self._env.step(np.array([int(action)]))
        return obs[0], float(rew[0]), False, bool(done), {}

def all_tasks(variant: str) -> np.ndarray:
    """Every goal cell; key-to-door: every (key, door) pair with key != door."""
    size = ENV_CONFIG[variant]["size"]
    cells = [(x, y) for x in range(size) for y in range(size)]
    return np.array([(*k, *d) for k in cells for d in cells if k != d]
                    if variant == "key-to-door" else cells)

def task_split(args: Args) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of all tasks into disjoint training and held-out sets."""
    tasks, (n_train, n_test) = all_tasks(args.env), args.split
    if n_train + n_test > len(tasks):
        raise ValueError(f"{args.env} has {len(tasks)} tasks: --split {n_train} {n_test} asks more")
    perm = np.random.default_rng(args.seed).permutation(len(tasks))
    return tasks[perm[:n_train]], tasks[perm[n_train:n_train + n_test]]

# ===== Source algorithm (Sec. 4, step 1): tabular Q-learning, vectorized over every run =====
def epsilon(episode: int, n_episodes: int, decay: float) -> float:
    """Linear from 1 to Q_EPS_END over the first `decay` fraction of the episodes (ours)."""
    return max(Q_EPS_END, 1.0 - (1.0 - Q_EPS_END) * episode / max(1.0, decay * n_episodes))

def q_learning(env: BatchDarkRoom, n_episodes: int, rng: np.random.Generator, decay: float = 0.2,
               progress: bool = False) -> dict:
    """One epsilon-greedy Q-learner per task of `env`, from scratch (Q = 0). Each episode is also
    replayed backwards at its end (episodic backward update, Lee et al. 2019). Returns learning
    histories: observations (N, E, T, 2), actions (N, E, T), rewards (N, E, T)."""
    N, T, idx = env.n, env.max_steps, np.arange(env.n)
    Q = np.zeros((N, env.n_stages * env.size ** 2, N_ACTIONS))
    h = dict(observations=np.zeros((N, n_episodes, T, 2), np.int8),
             actions=np.zeros((N, n_episodes, T), np.int8),
             rewards=np.zeros((N, n_episodes, T), np.float32))
    for e in tqdm(range(n_episodes), desc="Q-learning", disable=not progress, leave=False):
        eps, obs = epsilon(e, n_episodes, decay), env.reset()
        S = np.zeros((N, T + 1), np.int64)  # tabular states of the episode, for the replay
        S[:, 0] = env.state_index()
        for t in range(T):
            q = Q[idx, S[:, t]]                                              # (N, A)
            greedy = ((q == q.max(1, keepdims=True)) * rng.random(q.shape)).argmax(1)  # tie-break
            a = np.where(rng.random(N) < eps, rng.integers(0, N_ACTIONS, N), greedy)
            h["observations"][:, e, t], h["actions"][:, e, t] = obs, a
            obs, h["rewards"][:, e, t], _ = env.step(a)
            S[:, t + 1] = env.state_index()
            q_update(Q, S[:, t], a, h["rewards"][:, e, t], S[:, t + 1])
        for t in range(T - 1, -1, -1):  # the backward replay of the whole episode
            q_update(Q, S[:, t], h["actions"][:, e, t], h["rewards"][:, e, t], S[:, t + 1])
    return h

def q_update(Q, s, a, r, s2) -> None:
    """Q(s, a) += lr (r + gamma max Q(s') - Q(s, a)), in place for every learner. A time limit is
    not a termination: always bootstrap (Pardo et al. 2018)."""
    i = np.arange(len(Q))
    Q[i, s, a] += Q_LR * (r + Q_GAMMA * Q[i, s2].max(1) - Q[i, s, a])

# ===== Data: learning histories (cached, validated) and windows of whole episodes =====
class HistoryError(ValueError):
    """Learning histories that cannot be distilled as they are."""
def histories_file(args: Args) -> Path:
    tag = (f"split{args.split[0]}_{args.split[1]}-runs{args.histories_per_task}"
           f"-ep{args.source_episodes}-k{args.subsample}-decay{args.q_eps_decay}")
    return common.data_dir() / f"ad-{args.env}-qlearning-seed{args.seed}-{tag}.npz"

def validate_histories(h: dict, args: Args, test_tasks, source: str) -> dict:
    """Named errors for histories that would distill something else; returns int/float arrays."""
    keys = ("observations", "actions", "rewards", "tasks")
    if missing := [k for k in keys if k not in h]:
        raise HistoryError(f"{source}: missing {missing}; a histories file holds observations "
                           "(H, E, T, 2), actions and rewards (H, E, T) and tasks (H, 2|4)")
    obs, act, rew, tasks = (np.asarray(h[k]) for k in keys)
    if obs.ndim != 4 or obs.shape[-1] != 2 or not act.shape == rew.shape == obs.shape[:3]:
        raise HistoryError(f"{source}: expected observations (H, E, T, 2), actions and rewards "
                           f"(H, E, T); got {obs.shape}, {act.shape}, {rew.shape}")
    if not np.isfinite(rew).all():
        raise HistoryError(f"{source}: rewards hold NaN or inf; drop or repair those histories")
    if not np.issubdtype(obs.dtype, np.integer) and not (np.isfinite(obs) & (obs % 1 == 0)).all():
        raise HistoryError(f"{source}: {obs.dtype} observations with non-integer values would be "
                           "truncated; Dark Room observations are integer cells (x, y)")
    if act.min() < 0 or act.max() >= N_ACTIONS or len(tasks) != len(obs):
        raise HistoryError(f"{source}: actions must lie in 0..{N_ACTIONS - 1}; one task a history")
    if obs.shape[1] < args.context_episodes:
        raise HistoryError(f"{source}: {obs.shape[1]} episodes per history < "
                           f"--context-episodes {args.context_episodes}")
    held = {tuple(t) for t in np.asarray(test_tasks).tolist()} & {tuple(t) for t in tasks.tolist()}
    if held:
        raise HistoryError(f"{source}: histories on held-out tasks {sorted(held)[:4]}: the split "
                           "leaks; use the same --seed and --split as the file, or drop them")
    H, E, T = act.shape  # replay every episode in --env: histories of another env do not match
    if T != ENV_CONFIG[args.env]["max_steps"] or tasks.shape[1] != (4 if "key" in args.env else 2):
        raise HistoryError(f"{source}: episodes of {T} steps, tasks of {tasks.shape[1]} numbers: "
                           f"not --env {args.env}; pass the env the histories come from")
    env, flat = BatchDarkRoom(args.env, np.repeat(tasks, E, 0)), act.reshape(H * E, T)
    s0, steps = env.reset(), [env.step(a) for a in flat.T.astype(np.int64)]  # (s_t+1, r_t, done)
    replay_obs = np.stack([s0] + [s for s, _, _ in steps[:-1]], 1)             # (H*E, T, 2)
    replay_rew = np.stack([r for _, r, _ in steps], 1)                         # (H*E, T)
    if (replay_obs != obs.reshape(H * E, T, 2)).any() or (replay_rew != rew.reshape(-1, T)).any():
        raise HistoryError(f"{source}: observations or rewards do not follow --env {args.env}'s "
                           "dynamics and reward rule: histories of another env? pass its --env")
    return dict(observations=obs.astype(np.int64), actions=act.astype(np.int64),
                rewards=rew.astype(np.float32), tasks=tasks)

def load_histories(args: Args, train_tasks, test_tasks) -> dict:
    """The source's learning histories on every training task (Sec. 4): H = tasks x runs
    histories of E kept episodes (every k-th), from --dataset-path or the cache, else made."""
    path = Path(args.dataset_path or histories_file(args))
    if args.dataset_path or path.exists():
        with np.load(path) as f:
            return validate_histories({k: f[k] for k in f.files}, args, test_tasks, str(path))
    tasks = np.repeat(train_tasks, args.histories_per_task, 0)  # (H, 2|4)
    h = q_learning(BatchDarkRoom(args.env, tasks), args.source_episodes,
                   np.random.default_rng(args.seed + 1), args.q_eps_decay, progress=True)
    h = {k: v[:, ::args.subsample].copy() for k, v in h.items()}  # every k-th episode (Sec. 4)
    h["tasks"] = tasks
    common.save_npz(path, h)
    print(f"[ad] {len(tasks)} Q-learning histories, mean return of the last kept episode "
          f"{h['rewards'][:, -1].sum(-1).mean():.2f} -> {path}")
    return validate_histories(h, args, test_tasks, str(path))

class WindowSampler:
    """Random windows of `ctx` whole consecutive episodes of one history (of its `last` episodes
    only, when given). Each history is one flat sequence (Sec. 4): token t is (s_t, a_{t-1},
    r_{t-1}), so an episode's first token carries the last action and reward of the episode
    before it; only a history's very first token gets the 'none' action N_ACTIONS and reward 0."""
    def __init__(self, h: dict, ctx: int, device, last: Optional[int] = None):
        H, E, T = np.shape(h["actions"])
        self.T, self.ctx, self.device = T, ctx, device
        self.lo, self.hi = max(0, min(E - (last or E), E - ctx)), E - ctx  # window starts lo..hi
        self.act = act = torch.as_tensor(h["actions"], dtype=torch.long).reshape(H, E * T)
        rew = torch.as_tensor(h["rewards"], dtype=torch.float32).reshape(H, E * T)
        self.obs = torch.as_tensor(h["observations"], dtype=torch.long).reshape(H, E * T, 2)
        self.prev_a = torch.cat([torch.full((H, 1), N_ACTIONS), act[:, :-1]], 1)  # (H, E*T)
        self.prev_r = torch.cat([torch.zeros(H, 1), rew[:, :-1]], 1)              # (H, E*T)

    def sample(self, batch_size: int, gen: torch.Generator):
        """-> obs (B, L, 2), prev_a (B, L), prev_r (B, L), actions (B, L), loss mask (B, L)."""
        h = torch.randint(0, len(self.obs), (batch_size, 1), generator=gen)       # (B, 1)
        e0 = torch.randint(self.lo, self.hi + 1, (batch_size, 1), generator=gen)  # (B, 1)
        steps = torch.arange(self.ctx * self.T)                                   # (L,)
        idx = e0 * self.T + steps                                                 # (B, L)
        # the window's first episode is in the loss only at a history's start, where the learner
        # had no past either; elsewhere it acted on episodes the window does not show
        mask = (e0 == 0) | (steps >= self.T)                                      # (B, L)
        return tuple(x.to(self.device) for x in (self.obs[h, idx], self.prev_a[h, idx],
                                                 self.prev_r[h, idx], self.act[h, idx], mask))

# ===== Model: causal transformer over the across-episode history (Sec. 4, appendix table) =====
class Block(nn.Module):
    """Post-norm (the table): x = LN(x + attn(x)), x = LN(x + FF(x)); or pre-norm:
    x + attn(LN(x)), x + FF(LN(x)). SDPA attention with an optional key-value cache."""
    def __init__(self, d, n_heads, ff_dim, dropout, attn_dropout, post_norm=True):
        super().__init__()
        self.n_heads, self.attn_dropout, self.post_norm = n_heads, attn_dropout, post_norm
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ff_dim), nn.GELU(), nn.Linear(ff_dim, d))
        self.ln1, self.ln2, self.drop = nn.LayerNorm(d), nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, x, cache=None, start: int = 0):
        B, L, d = x.shape
        qkv = self.qkv(x if self.post_norm else self.ln1(x)).view(B, L, 3, self.n_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # 3 x (B, h, L, dh)
        if cache is not None:  # (2, B, h, S, dh): a prefill at 0, or one token at a time
            cache[0, :, :, start:start + L], cache[1, :, :, start:start + L] = k, v
            k, v = cache[0, :, :, :start + L], cache[1, :, :, :start + L]  # (B, h, start+L, dh)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, dropout_p=p)  # (B, h, L, dh)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, L, d)))
        x = self.ln1(x) if self.post_norm else x
        y = self.drop(self.ff(x if self.post_norm else self.ln2(x)))
        return self.ln2(x + y) if self.post_norm else x + y

class ADTransformer(nn.Module):
    """pi(a_t | history to s_t). token_t = E_x(x_t) + E_y(y_t) + E_a(a_{t-1}) + W_r r_{t-1} + P(t),
    t counted from the window's start (always an episode start)."""
    def __init__(self, size: int, seq_len: int, d: int = 64, n_layers: int = 4, n_heads: int = 4,
                 ff_dim: int = 2048, dropout: float = 0.1, attn_dropout: float = 0.5,
                 post_norm: bool = True):
        super().__init__()
        self.seq_len, self.n_layers, self.n_heads, self.d = seq_len, n_layers, n_heads, d
        self.x_emb, self.y_emb = nn.Embedding(size, d), nn.Embedding(size, d)
        self.a_emb = nn.Embedding(N_ACTIONS + 1, d)  # index N_ACTIONS: no previous action
        self.r_emb, self.pos_emb = nn.Linear(1, d), nn.Embedding(seq_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, n_heads, ff_dim, dropout, attn_dropout, post_norm)
                                    for _ in range(n_layers))
        self.ln_f = nn.Identity() if post_norm else nn.LayerNorm(d)  # pre-norm: a final LN
        self.head = nn.Linear(d, N_ACTIONS)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def new_cache(self, batch: int, device) -> torch.Tensor:
        dh = self.d // self.n_heads
        return torch.zeros(self.n_layers, 2, batch, self.n_heads, self.seq_len, dh, device=device)

    def forward(self, obs, prev_a, prev_r, cache=None, start: int = 0):
        """obs (B, L, 2) long, prev_a (B, L) long, prev_r (B, L) float -> logits (B, L, A).
        With `cache`, the tokens sit at positions start..start+L-1 of the window."""
        pos = torch.arange(start, start + obs.shape[1], device=obs.device)
        h = self.drop(self.x_emb(obs[..., 0]) + self.y_emb(obs[..., 1]) + self.a_emb(prev_a)
                      + self.r_emb(prev_r[..., None]) + self.pos_emb(pos))  # (B, L, d)
        for i, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache[i], start)
        return self.head(self.ln_f(h))                                         # (B, L, A)

def make_model(args: Args) -> ADTransformer:
    cfg = ENV_CONFIG[args.env]
    return ADTransformer(cfg["size"], args.context_episodes * cfg["max_steps"], args.d_model,
                         args.n_layers, args.n_heads, args.ff_dim, args.dropout, args.attn_dropout,
                         args.post_norm)

def ad_loss(model: ADTransformer, batch) -> torch.Tensor:
    """Algorithm 1: -log pi(a_t | h_t), averaged over the positions of the loss mask."""
    obs, prev_a, prev_r, act, mask = batch
    logits = model(obs, prev_a, prev_r)                                          # (B, L, A)
    nll = F.cross_entropy(logits.reshape(-1, N_ACTIONS), act.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum()

# ===== Acting in context (Sec. 5): the context is kept across episodes =====
class InContextPolicy:
    """AD / ED on n tasks in lockstep: __call__(obs (n, 2)) -> actions (n,); observe(rewards,
    dones) after each step; reset(n) clears the context. The window holds the current episode and
    up to ctx-1 before it: on a full window a new episode drops the oldest one. Actions are sampled
    by inverse CDF, one uniform per task and step (the same draws with and without the cache)."""
    def __init__(self, model: ADTransformer, ctx: int, use_cache=True, argmax=False, seed=0):
        self.model, self.ctx, self.use_cache, self.argmax = model, ctx, use_cache, argmax
        self.seed, self.device = seed, next(model.parameters()).device

    def reset(self, n: int) -> None:
        dev = self.device  # the window: obs (n, L, 2), prev_a (n, L), prev_r (n, L)
        self.model.eval()
        self.win = [torch.zeros(n, 0, 2, dtype=torch.long, device=dev),
                    torch.zeros(n, 0, dtype=torch.long, device=dev), torch.zeros(n, 0, device=dev)]
        self.prev_a = torch.full((n,), N_ACTIONS, device=dev)  # a history's start: no action
        self.prev_r = torch.zeros(n, device=dev)
        self.starts, self.new_episode = [0], False  # where each episode of the window starts
        self.gen, self.cache, self.cached = torch.Generator(dev).manual_seed(self.seed), None, 0

    @torch.no_grad()
    def __call__(self, obs) -> np.ndarray:
        if self.new_episode:  # a_{t-1}, r_{t-1} carry over, as in the flat training sequence
            self.starts, self.new_episode = self.starts + [self.win[0].shape[1]], False
            if len(self.starts) > self.ctx:  # full window: drop its oldest episode
                cut = self.starts[1]
                self.win = [w[:, cut:] for w in self.win]
                self.starts, self.cached = [s - cut for s in self.starts[1:]], 0
        obs = torch.as_tensor(np.asarray(obs), device=self.device).long().reshape(-1, 2)
        self.win = [torch.cat([w, x[:, None]], 1) for w, x in
                    zip(self.win, (obs, self.prev_a, self.prev_r))]
        if not self.use_cache:  # the plain version: the whole window at every step
            logits = self.model(*self.win)[:, -1]                                   # (n, A)
        else:  # key-value cache: one token per step, one prefill of the window after a slide
            if self.cache is None:
                self.cache = self.model.new_cache(len(obs), self.device)
            c = self.cached
            logits = self.model(*(w[:, c:] for w in self.win), cache=self.cache, start=c)[:, -1]
            self.cached = self.win[0].shape[1]
        probs = torch.softmax(logits.float(), -1)
        if self.argmax:
            a = probs.argmax(-1)
        else:
            u = torch.rand(len(probs), 1, generator=self.gen, device=self.device)
            a = (probs.cumsum(-1) < u).sum(-1).clamp(max=N_ACTIONS - 1)
        self.prev_a = a
        return a.cpu().numpy()

    def observe(self, rewards, dones) -> None:
        self.prev_r = torch.as_tensor(np.asarray(rewards), dtype=torch.float32, device=self.device)
        dones = np.asarray(dones, dtype=bool)
        if dones.any() != dones.all():
            raise ValueError("InContextPolicy steps its tasks in lockstep: episodes must end "
                             "together (Dark Room episodes all last max_steps steps)")
        self.new_episode = bool(dones.all())

def in_context_returns(policy: InContextPolicy, variant: str, tasks, n_episodes: int,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 4 protocol for one policy: reset its context once, then `n_episodes` episodes in a
    row on every task without clearing it. -> returns (N, episodes), actions (N, episodes, T)."""
    env = BatchDarkRoom(variant, tasks)
    policy.reset(env.n)
    returns = np.zeros((env.n, n_episodes))
    actions = np.zeros((env.n, n_episodes, env.max_steps), dtype=np.int64)
    with tqdm(total=env.n * n_episodes * env.max_steps, desc="in-context eval", unit="step",
              disable=not progress, leave=False) as bar:
        for ep in range(n_episodes):
            obs = env.reset()
            for t in range(env.max_steps):
                actions[:, ep, t] = policy(obs)
                obs, rew, done = env.step(actions[:, ep, t])
                policy.observe(rew, np.full(env.n, done))
                returns[:, ep] += rew
                bar.update(env.n)
    return returns, actions

def evaluate(args: Args, models: dict, train_tasks, test_tasks, progress=True) -> dict:
    """Fig. 4: every held-out task x EVAL_REPEATS runs, eval_episodes episodes in context; the mean
    return per episode. The source learns the same tasks from scratch and is compared on the
    history AD imitates (its kept episode i = episode k*(i-1)+1, k = --subsample) and, for
    reference, on all its episodes (raw)."""
    tasks, n = np.repeat(test_tasks, EVAL_REPEATS, 0), len(test_tasks)
    probe, curves = np.repeat(train_tasks[:n], EVAL_REPEATS, 0), {}  # learns on train tasks only?
    for name, on in [(k, tasks) for k in models] + [("AD (train tasks)", probe)]:
        policy = InContextPolicy(models[name[:2]], args.context_episodes, seed=args.seed)
        curves[name] = in_context_returns(policy, args.env, on, args.eval_episodes, progress)[0]
    src = q_learning(BatchDarkRoom(args.env, tasks), args.source_episodes,
                     np.random.default_rng(args.seed + 2), args.q_eps_decay)["rewards"].sum(-1)
    curves["source (kept episodes)"], curves["source (raw)"] = src[:, ::args.subsample], src
    env, rng = BatchDarkRoom(args.env, tasks), np.random.default_rng(args.seed)
    rand = sum(env.step(rng.integers(0, N_ACTIONS, env.n))[1] for _ in range(env.max_steps))
    curves["random"] = np.repeat(rand[:, None], args.eval_episodes, 1)  # uniform actions
    curves["optimal"] = np.repeat(env.optimal_returns()[:, None], args.eval_episodes, 1)
    return {k: c.mean(0) for k, c in curves.items()}      # (episodes,) each

def report(folder: Path, curves: dict, args: Args) -> str:
    """in_context.csv, in_context.md (summary + table), in_context.png; returns the summary."""
    opt, E, names = curves["optimal"][0], len(curves["AD"]), list(curves)[:-2]
    avg = {k: np.convolve(curves[k], np.ones(5) / 5, mode="valid") for k in names}  # 5-episode mean
    reach = {k: [next((i + 5 for i, v in enumerate(a) if v >= p * opt), f"> {len(a) + 4}")
                 for p in (0.5, 0.75)] for k, a in avg.items()}
    summary = (f"{args.env}, {args.split[1]} held-out tasks x {EVAL_REPEATS} runs, sampled "
               "actions. Episodes to 50% / 75% of optimal (5-episode mean): "
               + "; ".join(f"{k} {a} / {b}" for k, (a, b) in reach.items()))
    rows = [[str(e + 1)] + [f"{c[e]:.2f}" if e < len(c) else "" for c in curves.values()]
            for e in range(E)]
    (folder / "in_context.csv").write_text("\n".join(map(",".join, [["episode", *curves], *rows])))
    table = [["episode", *curves], ["---"] * (len(curves) + 1), *rows]
    (folder / "in_context.md").write_text(summary + "\n\n" + "\n".join(
        "| " + " | ".join(r) + " |" for r in table) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return summary + " (no plot: pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, c in curves.items():
        ax.plot(np.arange(1, len(c[:E]) + 1), c[:E], label=k)
    ax.set(xlabel="episode (context kept)", ylabel="mean return, held-out tasks")
    ax.legend(fontsize=7)
    fig.savefig(folder / "in_context.png", dpi=120)
    plt.close(fig)
    return summary

def check_args(args: Args) -> None:
    if args.env not in ENV_CONFIG:
        raise ValueError(f"unknown --env {args.env!r}: use one of {', '.join(ENV_CONFIG)}")
    sizes = args.split + (args.context_episodes, args.subsample)
    if len(args.split) != 2 or min(sizes) < 1 or not 0 < args.q_eps_decay <= 1:
        raise ValueError("--split takes two numbers >= 1; --context-episodes, --subsample >= 1; "
                         "--q-eps-decay is a fraction of the source episodes, in (0, 1]")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt of ad.py)")

def make_optimizer(model: nn.Module, args: Args):
    """Adam, no weight decay; lr 2e-6 -> --lr over the first 5% of updates, cosine to 2e-6."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warm, lo, total = max(1, int(WARMUP * args.total_steps)), LR_MIN / args.lr, args.total_steps

    def scale(i):  # lr / --lr after i updates
        up = min(1.0, i / warm) if i < warm else 0.5 + 0.5 * math.cos(math.pi * min(1.0, (
            i - warm) / max(1, total - warm)))
        return lo + (1 - lo) * up
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, scale)

def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    check_args(args)
    common.set_seed(args.seed)
    device = common.get_device(args.cuda)
    if args.eval_only:
        path = args.checkpoint  # everything as trained, but --eval-episodes
        args, ckpt = checkpoint_args(path, eval_episodes=args.eval_episodes)
        models = {k: load_policy(path, device, k).model for k in ("AD", "ED")}
        train_tasks, test_tasks = np.array(ckpt["train_tasks"]), np.array(ckpt["test_tasks"])
        curves = evaluate(args, models, train_tasks, test_tasks)
        print("[ad] " + report(Path(path).parent, curves, args))
        return curves
    if args.resume:  # continue the run exactly: all its flags come from the checkpoint
        args = checkpoint_args(args.resume, resume=args.resume)[0]
    train_tasks, test_tasks = task_split(args)
    hist = load_histories(args, train_tasks, test_tasks)
    data = {"AD": WindowSampler(hist, args.context_episodes, device),  # the whole histories
            "ED": WindowSampler(hist, args.context_episodes, device, last=ED_EPISODES)}
    models = {k: make_model(args).to(device) for k in data}
    optim = {k: make_optimizer(m, args) for k, m in models.items()}
    gen = torch.Generator().manual_seed(args.seed)
    run = common.Run(args, "ad", extra=dict(train_tasks=train_tasks.tolist(),
                                            test_tasks=test_tasks.tolist()), sampler=gen,
                     **{f"{k}_{n}": o for k in models for n, o in
                        zip(("model", "optimizer", "scheduler"), (models[k], *optim[k]))})
    for step in run.loop(args.total_steps):
        losses = {}
        for k, model in models.items():  # Algorithm 1, one update each: equal budgets
            model.train()
            opt, sched = optim[k]
            loss = ad_loss(model, data[k].sample(args.batch_size, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            sched.step()
            losses[f"losses/{k}_loss"] = loss.item()
        if run.every(50):
            run.log(**losses, **{"charts/learning_rate": optim["AD"][1].get_last_lr()[0]})
        if run.every(args.eval_every):
            policy = InContextPolicy(models["AD"], args.context_episodes, seed=args.seed)
            ret = in_context_returns(policy, args.env, test_tasks, min(args.eval_episodes, 20))[0]
            run.log(**{"eval/return_mean": ret[:, -5:].mean()})
            run.save()
    folder = run.finish()
    curves = evaluate(args, models, train_tasks, test_tasks)
    print("[ad] " + report(folder, curves, args))
    return dict(curves, run_dir=str(folder))

def checkpoint_args(path, **override) -> tuple[Args, dict]:
    """A checkpoint of ad.py (weights_only) and the Args it was trained with, `override` applied."""
    ckpt = common.load_checkpoint(path, "ad")
    saved = {k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__}
    return Args(**{**saved, **override}), ckpt

def load_policy(path, device="cpu", which: str = "AD", seed: int = 0) -> InContextPolicy:
    """A batched in-context policy (AD or ED) from a checkpoint of ad.py; it keeps its context
    across episodes: reset(n), then act = policy(obs (n, 2)) and policy.observe(rewards, dones)."""
    args, ckpt = checkpoint_args(path)
    model = make_model(args).to(device)
    model.load_state_dict(ckpt[f"{which}_model"])
    return InContextPolicy(model.eval(), args.context_episodes, seed=seed)


if __name__ == "__main__":
    main()
