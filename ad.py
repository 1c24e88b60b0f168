"""Algorithm Distillation (AD): in-context reinforcement learning on Dark Room.

Paper: Laskin et al. 2022, "In-context Reinforcement Learning with Algorithm Distillation",
arXiv 2210.14215. A source RL algorithm learns each training task from scratch; its learning
histories, ordered in time across episodes, are distilled into a causal transformer by
predicting actions (Sec. 4, Algorithm 1). At test time the transformer faces a held-out task
and keeps its context across episodes: it explores, finds the goal and exploits it without any
weight update (Sec. 5). The baseline ED ("expert distillation") is the same model trained on
the final, near-optimal episodes only; it does not improve in context.

What this file reproduces (python ad.py runs all of it):
  * Dark Room (9x9, 20 steps, reward 1 on every step on the goal), Dark Room Hard (17x17,
    reward once) and Dark Key-to-Door (50 steps, +1 key, +1 door), as Gymnasium envs and a
    numpy batch version that steps hundreds of tasks in lockstep (Sec. 5, Appendix).
  * learning histories of tabular Q-learning on 65 training goals (several seeds each),
    optionally subsampled every k-th episode (Sec. 4: "subsampled"), cached to disk;
  * AD and ED training (4 layers, 4 heads, d=64, dropout 0.1, attention dropout 0.5, batch
    128, cosine lr peak 3e-4, clip 1.0; the hyper-parameter table of the paper's appendix);
  * in-context evaluation on 16 held-out goals, vectorized over goals, with a key-value cache,
    and a table / plot of the mean return per episode for AD, ED, the source algorithm,
    a random policy and the optimal policy.

Deviations (named):
  * Source algorithm: tabular Q-learning (vectorized over all histories) instead of A3C, with
    each episode also replayed backwards at its end (episodic backward update) so a goal found
    once is exploited soon after. It learns on the true state (position plus the number of
    rewards collected, which the reward-once and key-to-door variants need to be Markov); the
    transformer sees only (x, y).
  * Tokens: one token per time step, the sum of embeddings of (s_t, a_{t-1}, r_{t-1}), instead
    of separate s / a / r tokens: the same information, a 3x shorter sequence (CPU budget).
  * Context: the window holds whole episodes (`context_episodes`, default 4 = 80 steps) and
    positions count from the window start, so position = episode-in-window * T + t. When a new
    episode starts on a full window, the oldest episode is dropped and the cache is rebuilt
    with one prefill (exact: the cached and uncached policies see the same window). In
    training, the first episode of a window is in the loss only at the start of a history
    (elsewhere the learner acted on a past the window does not show).
  * Source exploration schedule (ours; A3C has none): epsilon decays linearly from 1 to 0.05
    over the first 20% of the episodes (`--q-eps-decay 0.2`, picked after runs at 0.1, 0.15,
    0.2 and 0.25, all in README). AD imitates the schedule along with the learning, inferring
    from its own context how far along it is, so a slower decay slows AD's in-context curve
    (0.25: 11.7 at episode 40 after 6000 steps), while a faster one makes the source itself
    learn faster (0.1: AD 13.1 at episode 40, but the source reaches 75% of optimal at episode
    29, AD at 39).
  * Training length: the paper trains far longer; the CPU run below uses 8000 steps of batch
    64 at lr 1e-3 (flags), the defaults keep the paper's batch 128 and lr 3e-4.

Smoke run (about 1 minute on 1 CPU thread; too small to learn in context):
    python ad.py --total-steps 100 --source-episodes 60 --histories-per-task 2 --eval-episodes 10
CPU run (40 minutes on 1 thread of a 2-core machine, histories -> AD -> ED -> evaluation):
    python ad.py --total-steps 8000 --batch-size 64 --lr 1e-3 --ed-steps 300 --eval-every 0
Measured (16 held-out goals x 4 runs, sampled actions, mean return; optimal 16.6, random 0.33):
    episode           1      5     10     20     30     40     50
    AD             0.55   2.12   7.16  10.45  12.34  12.86  13.34
    ED             0.52   0.72   1.25   1.59   2.55   2.58   2.88
    Q-learning     0.19   0.56   1.02   2.20   6.05  10.22  13.89
AD reaches 50% of optimal (5-episode mean) at episode 15, the source at 38; 75% at 35 vs 48.
"""
from __future__ import annotations

import math
import time
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
    """name of the experiment (used in the run directory name)"""
    seed: int = 0
    """seed of the task split, the source histories, training and evaluation"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """log to TensorBoard (needs tensorboard)"""
    env: str = "darkroom"
    """darkroom (9x9, 20 steps), darkroom-hard (17x17, reward once) or key-to-door (9x9, 50 steps)"""
    dataset: str = "q-learning"
    """source algorithm of the learning histories (tabular Q-learning is the one implemented)"""
    dataset_path: Optional[str] = None
    """a histories .npz written by this script (default: generated and cached in the data folder)"""
    n_train_tasks: int = 65
    """number of training tasks (goals) whose learning histories are distilled"""
    n_test_tasks: int = 16
    """number of held-out tasks for in-context evaluation"""
    histories_per_task: int = 8
    """independent source learning runs (seeds) per training task"""
    source_episodes: int = 240
    """episodes of each source learning run (before subsampling)"""
    subsample: int = 4
    """keep every k-th episode of each learning history (Sec. 4)"""
    q_lr: float = 0.5
    """Q-learning step size"""
    q_gamma: float = 0.9
    """Q-learning discount"""
    q_eps_end: float = 0.05
    """final epsilon of the epsilon-greedy source learner (linear decay from 1)"""
    q_eps_decay: float = 0.2
    """fraction of the source episodes over which epsilon decays (see the module docstring)"""
    q_replay: bool = True
    """replay each source episode backwards at its end (episodic backward update)"""
    context_episodes: int = 4
    """episodes in the transformer context (the paper: it must span several episodes)"""
    n_layers: int = 4
    """transformer layers"""
    n_heads: int = 4
    """attention heads"""
    d_model: int = 64
    """embedding size"""
    dropout: float = 0.1
    """residual / embedding dropout"""
    attn_dropout: float = 0.5
    """attention dropout"""
    total_steps: int = 2000
    """AD gradient steps"""
    ed_steps: Optional[int] = None
    """ED gradient steps (default: total_steps)"""
    expert_episodes: int = 8
    """ED trains on the last this-many (subsampled) episodes of every history"""
    batch_size: int = 128
    """sequences per batch"""
    lr: float = 3e-4
    """peak learning rate (cosine schedule)"""
    warmup_steps: int = 100
    """linear warm-up steps before the cosine decay"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient norm clip"""
    save_every: int = 500
    """write checkpoint.pt every N steps"""
    eval_every: int = 500
    """in-context evaluation of AD on the held-out tasks every N steps (0: only at the end)"""
    eval_episodes: int = 50
    """episodes rolled in context (without clearing it) per held-out task"""
    eval_repeats: int = 4
    """independent in-context runs per held-out task"""
    argmax: bool = False
    """greedy actions at evaluation (the paper samples; argmax plateaus lower)"""
    resume: Optional[str] = None
    """checkpoint to continue from"""
    eval_only: bool = False
    """only evaluate --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""
    bf16: bool = False
    """bfloat16 autocast for training and evaluation"""
    run_dir: Optional[str] = None
    """run directory (default runs/{env}__{exp_name}__{seed}__{time})"""


# ======================================================================================
# Environments: Dark Room, Dark Room Hard, Dark Key-to-Door (Sec. 5 and Appendix)
# ======================================================================================
ENV_CONFIG = {"darkroom": dict(size=9, max_steps=20), "darkroom-hard": dict(size=17, max_steps=20),
              "key-to-door": dict(size=9, max_steps=50)}
N_ACTIONS = 5
MOVES = np.array([[-1, 0], [1, 0], [0, 1], [0, -1], [0, 0]])  # left, right, up, down, no-op


class BatchDarkRoom:
    """N tasks of one variant stepped in lockstep with numpy. All episodes have the same
    fixed length (no early termination), so every task resets at the same step.
    tasks: (N, 2) goals, or (N, 4) key + door for key-to-door. obs: (N, 2) int (x, y)."""

    def __init__(self, variant: str, tasks, size: int | None = None, max_steps: int | None = None):
        if variant not in ENV_CONFIG:
            raise ValueError(f"unknown env {variant!r}: use one of {', '.join(ENV_CONFIG)}")
        self.variant, self.tasks = variant, np.asarray(tasks, dtype=np.int64).reshape(len(tasks), -1)
        self.size = size or ENV_CONFIG[variant]["size"]
        self.max_steps = max_steps or ENV_CONFIG[variant]["max_steps"]
        need = 4 if variant == "key-to-door" else 2
        if self.tasks.shape[1] != need or self.tasks.min() < 0 or self.tasks.max() >= self.size:
            raise ValueError(f"{variant}: tasks must be (N, {need}) cells inside the {self.size}x{self.size} grid")
        self.n = len(self.tasks)
        self.n_stages = {"darkroom": 1, "darkroom-hard": 2, "key-to-door": 3}[variant]
        self.reset()

    def reset(self) -> np.ndarray:
        self.pos = np.full((self.n, 2), self.size // 2)  # reset to the centre
        self.stage = np.zeros(self.n, dtype=np.int64)     # rewards collected (hard / key-to-door)
        self.t = 0
        return self.pos.copy()

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, bool]:
        self.pos = np.clip(self.pos + MOVES[np.asarray(actions)], 0, self.size - 1)
        on = lambda cells: (self.pos == cells).all(1)
        if self.variant == "darkroom":          # reward 1 on every step spent on the goal
            rew = on(self.tasks).astype(np.float32)
        elif self.variant == "darkroom-hard":   # reward 1 the first time only
            rew = (on(self.tasks) & (self.stage == 0)).astype(np.float32)
        else:                                   # +1 picking up the key, then +1 opening the door
            rew = ((on(self.tasks[:, :2]) & (self.stage == 0)) |
                   (on(self.tasks[:, 2:]) & (self.stage == 1))).astype(np.float32)
        if self.n_stages > 1:
            self.stage += rew.astype(np.int64)
        self.t += 1
        return self.pos.copy(), rew, self.t >= self.max_steps

    def state_index(self) -> np.ndarray:
        """Tabular state (stage, x, y) of the source learner (privileged: includes the stage)."""
        return (self.stage * self.size + self.pos[:, 0]) * self.size + self.pos[:, 1]

    def optimal_returns(self) -> np.ndarray:
        c = self.size // 2
        dist = lambda a, b: np.abs(a - b).sum(1)
        if self.variant == "darkroom":  # on the goal after d moves, then stay: T - d + 1 (d=0: T)
            d = dist(self.tasks, np.array([c, c]))
            return np.where(d == 0, self.max_steps, np.maximum(self.max_steps - d + 1, 0)).astype(float)
        if self.variant == "darkroom-hard":
            return (dist(self.tasks, np.array([c, c])) <= self.max_steps).astype(float)
        d = dist(self.tasks[:, :2], np.array([c, c]))
        d = np.maximum(d, 1) + dist(self.tasks[:, :2], self.tasks[:, 2:])
        return 1.0 * (np.maximum(dist(self.tasks[:, :2], np.array([c, c])), 1) <= self.max_steps) + (d <= self.max_steps)


class DarkRoom(gym.Env):
    """Dark Room: the agent sees only its (x, y); 5 actions (left, right, up, down, no-op);
    reset to the centre; reward 1 on every step on the goal; `max_steps` steps per episode."""
    metadata = {"render_modes": []}
    variant = "darkroom"

    def __init__(self, goal=(0, 0), size: int = 9, max_steps: int = 20):
        self.task = np.asarray(goal).reshape(1, -1)
        self.size, self.max_steps = size, max_steps
        self.observation_space = gym.spaces.Box(0, size - 1, (2,), dtype=np.int64)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self._env = BatchDarkRoom(self.variant, self.task, size, max_steps)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._env.reset()[0], {}

    def step(self, action):
        obs, rew, done = self._env.step(np.array([int(action)]))
        return obs[0], float(rew[0]), False, bool(done), {}


class DarkRoomHard(DarkRoom):
    """Dark Room Hard: 17x17, the goal rewards only the first time it is reached."""
    variant = "darkroom-hard"

    def __init__(self, goal=(0, 0), size: int = 17, max_steps: int = 20):
        super().__init__(goal, size, max_steps)


class DarkKeyToDoor(DarkRoom):
    """Dark Key-to-Door: +1 for reaching the key, then +1 for reaching the door; 50 steps."""
    variant = "key-to-door"

    def __init__(self, key=(0, 0), door=(1, 1), size: int = 9, max_steps: int = 50):
        super().__init__(tuple(key) + tuple(door), size, max_steps)


def all_tasks(variant: str, size: int) -> np.ndarray:
    cells = np.array([(x, y) for x in range(size) for y in range(size)])
    if variant != "key-to-door":
        return cells
    return np.array([(*k, *d) for k in cells for d in cells if tuple(k) != tuple(d)])


def task_split(args: Args) -> tuple[np.ndarray, np.ndarray]:
    """Random train / held-out split of all tasks (seeded)."""
    tasks = all_tasks(args.env, ENV_CONFIG[args.env]["size"])
    if args.n_train_tasks + args.n_test_tasks > len(tasks):
        raise ValueError(f"{args.env} has {len(tasks)} tasks: --n-train-tasks + --n-test-tasks "
                         f"({args.n_train_tasks} + {args.n_test_tasks}) must not exceed it")
    perm = np.random.default_rng(args.seed).permutation(len(tasks))
    return tasks[perm[:args.n_train_tasks]], tasks[perm[args.n_train_tasks:args.n_train_tasks + args.n_test_tasks]]


# ======================================================================================
# Source algorithm: tabular Q-learning, vectorized over every learning run
# ======================================================================================
def q_learning(env: BatchDarkRoom, n_episodes: int, rng: np.random.Generator, lr: float = 0.5,
               gamma: float = 0.9, eps_end: float = 0.05, eps_decay: float = 0.5, replay: bool = True,
               progress: bool = False) -> dict:
    """One independent epsilon-greedy Q-learner per task of `env`, each from scratch (Q = 0).
    With `replay`, each episode is also replayed backwards at its end (episodic backward update,
    Lee et al. 2019), so a reward found once propagates along the whole path.
    Returns the learning histories: observations (N, E, T, 2), actions (N, E, T), rewards (N, E, T)."""
    N, T = env.n, env.max_steps
    Q = np.zeros((N, env.n_stages * env.size ** 2, N_ACTIONS))
    obs_h = np.zeros((N, n_episodes, T, 2), np.int8)
    act_h = np.zeros((N, n_episodes, T), np.int8)
    rew_h = np.zeros((N, n_episodes, T), np.float32)
    idx = np.arange(N)
    for e in tqdm(range(n_episodes), desc="Q-learning histories", disable=not progress, leave=False):
        eps = max(eps_end, 1.0 - (1.0 - eps_end) * e / max(1.0, eps_decay * n_episodes))
        obs, s = env.reset(), env.state_index()
        S = np.zeros((N, T + 1), np.int64)  # tabular states of this episode, for the backward replay
        S[:, 0] = s
        for t in range(T):
            q = Q[idx, s]                                                     # (N, A)
            greedy = ((q == q.max(1, keepdims=True)) * rng.random(q.shape)).argmax(1)  # random tie-break
            a = np.where(rng.random(N) < eps, rng.integers(0, N_ACTIONS, N), greedy)
            obs_h[:, e, t], act_h[:, e, t] = obs, a
            obs, r, _ = env.step(a)
            s2 = env.state_index()
            # time-limit truncation is not termination: always bootstrap (Pardo et al. 2018)
            Q[idx, s, a] += lr * (r + gamma * Q[idx, s2].max(1) - Q[idx, s, a])
            rew_h[:, e, t], s = r, s2
            S[:, t + 1] = s2
        for t in range(T - 1, -1, -1) if replay else ():
            a, r = act_h[:, e, t].astype(np.int64), rew_h[:, e, t]
            Q[idx, S[:, t], a] += lr * (r + gamma * Q[idx, S[:, t + 1]].max(1) - Q[idx, S[:, t], a])
    return dict(observations=obs_h, actions=act_h, rewards=rew_h)


# ======================================================================================
# Data: learning histories (cached) and windows of whole episodes across them
# ======================================================================================
HISTORY_KEYS = ("observations", "actions", "rewards", "tasks")


def histories_file(args: Args) -> Path:
    return common.data_dir() / (
        f"ad-{args.env}-{args.dataset}-seed{args.seed}-tasks{args.n_train_tasks}-runs{args.histories_per_task}"
        f"-ep{args.source_episodes}-k{args.subsample}-lr{args.q_lr}-g{args.q_gamma}-eps{args.q_eps_end}-{args.q_eps_decay}{'-replay' * args.q_replay}.npz")


def validate_histories(h: dict, args: Args, source: str) -> dict:
    missing = [k for k in HISTORY_KEYS if k not in h]
    if missing:
        raise ValueError(f"{source}: missing {missing}; a histories file needs {list(HISTORY_KEYS)} "
                         f"(write one with `python ad.py`, it caches them in {common.data_dir()})")
    size, T = ENV_CONFIG[args.env]["size"], ENV_CONFIG[args.env]["max_steps"]
    obs, act, rew = h["observations"], h["actions"], h["rewards"]
    if obs.ndim != 4 or obs.shape[-1] != 2 or act.shape != obs.shape[:3] or rew.shape != obs.shape[:3]:
        raise ValueError(f"{source}: expected observations (H, E, T, 2), actions and rewards (H, E, T); "
                         f"got {obs.shape}, {act.shape}, {rew.shape}")
    if obs.shape[2] != T or obs.min() < 0 or obs.max() >= size:
        raise ValueError(f"{source}: episodes of {obs.shape[2]} steps in a grid up to {obs.max() + 1}, but "
                         f"--env {args.env} has {T} steps on a {size}x{size} grid; pass the matching --env")
    if obs.shape[1] < args.context_episodes:
        raise ValueError(f"{source}: {obs.shape[1]} episodes per history < --context-episodes {args.context_episodes}")
    if act.min() < 0 or act.max() >= N_ACTIONS:
        raise ValueError(f"{source}: actions must lie in [0, {N_ACTIONS})")
    return h


def load_histories(args: Args, train_tasks: np.ndarray) -> dict:
    """Learning histories of the source algorithm on every training task (Sec. 4, step 1):
    (H, E, T, ...) arrays, H = tasks x runs, E episodes after keeping every k-th one."""
    if args.dataset_path:
        with np.load(args.dataset_path) as f:
            return validate_histories({k: f[k] for k in f.files}, args, args.dataset_path)
    if args.dataset != "q-learning":
        raise ValueError(f"--dataset {args.dataset!r}: only 'q-learning' histories can be generated; "
                         f"pass other histories with --dataset-path")
    file = histories_file(args)
    if file.exists():
        with np.load(file) as f:
            return validate_histories({k: f[k] for k in f.files}, args, str(file))
    t0 = time.time()
    tasks = np.repeat(train_tasks, args.histories_per_task, 0)  # (H, 2|4)
    h = q_learning(BatchDarkRoom(args.env, tasks), args.source_episodes, np.random.default_rng(args.seed + 1),
                   args.q_lr, args.q_gamma, args.q_eps_end, args.q_eps_decay, args.q_replay, progress=True)
    h = {k: v[:, ::args.subsample].copy() for k, v in h.items()}  # every k-th episode (Sec. 4)
    h["tasks"] = tasks
    common.save_npz(file, h)
    ret = h["rewards"].sum(-1).mean(0)
    print(f"[ad] {len(tasks)} Q-learning histories of {args.source_episodes} episodes in {time.time() - t0:.0f} s "
          f"(kept {ret.size}); mean return first / last kept episode {ret[0]:.2f} / {ret[-1]:.2f} -> {file}")
    return h


class WindowSampler:
    """Random windows of `ctx` whole consecutive episodes of one learning history. Each step is
    one token (s_t, a_{t-1}, r_{t-1}); the previous action / reward cross episode boundaries
    (a history's very first step gets the 'none' action N_ACTIONS and reward 0)."""

    def __init__(self, h: dict, ctx: int, device, first_episode: int = 0):
        obs = torch.as_tensor(h["observations"], dtype=torch.long)
        H, E, T, _ = obs.shape
        self.T, self.ctx, self.device = T, ctx, device
        self.lo, self.hi = max(0, min(first_episode, E - ctx)), E - ctx  # window start episodes lo..hi
        act = torch.as_tensor(h["actions"], dtype=torch.long).reshape(H, E * T)
        rew = torch.as_tensor(h["rewards"], dtype=torch.float32).reshape(H, E * T)
        self.obs = obs.reshape(H, E * T, 2).to(device)                                         # (H, E*T, 2)
        self.act = act.to(device)                                                             # (H, E*T)
        self.prev_a = torch.cat([torch.full((H, 1), N_ACTIONS), act[:, :-1]], 1).to(device)  # (H, E*T)
        self.prev_r = torch.cat([torch.zeros(H, 1), rew[:, :-1]], 1).to(device)               # (H, E*T)

    def sample(self, batch_size: int, rng: np.random.Generator):
        h = rng.integers(0, len(self.obs), batch_size)
        e0 = rng.integers(self.lo, self.hi + 1, batch_size)
        idx = torch.as_tensor(e0[:, None] * self.T + np.arange(self.ctx * self.T), device=self.device)  # (B, L)
        hh = torch.as_tensor(h, device=self.device)[:, None]                                           # (B, 1)
        # loss mask: the first episode of a window has no context, so it is trained only where the
        # learner had none either (the start of its history); elsewhere its actions depend on a past
        # the model cannot see (e.g. a goal found in an episode before the window)
        mask = torch.as_tensor((e0[:, None] == 0) | (np.arange(self.ctx * self.T) >= self.T), device=self.device)
        return self.obs[hh, idx], self.prev_a[hh, idx], self.prev_r[hh, idx], self.act[hh, idx], mask


# ======================================================================================
# Model: causal transformer over the across-episode history (Sec. 4, Algorithm 1)
# ======================================================================================
class Block(nn.Module):
    """Pre-LN transformer block; SDPA attention with an optional key-value cache."""

    def __init__(self, d: int, n_heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, start: int = 0):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, dh)
        if cache is not None:  # cache: (2, B, h, S, dh); write this chunk, attend to everything so far
            if start > 0 and L > 1:
                raise ValueError("the cache takes a prefill from position 0 or one token at a time")
            cache[0, :, :, start:start + L], cache[1, :, :, start:start + L] = k, v
            k, v = cache[0, :, :, :start + L], cache[1, :, :, :start + L]                   # (B, h, start+L, dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)  # (B, h, L, dh)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class ADTransformer(nn.Module):
    """pi(a_t | history up to s_t): token_t = E_x(x_t) + E_y(y_t) + E_a(a_{t-1}) + W_r r_{t-1} + P(pos)."""

    def __init__(self, size: int, seq_len: int, d: int = 64, n_layers: int = 4, n_heads: int = 4,
                 dropout: float = 0.1, attn_dropout: float = 0.5):
        super().__init__()
        self.seq_len, self.n_layers, self.n_heads, self.d = seq_len, n_layers, n_heads, d
        self.x_emb, self.y_emb = nn.Embedding(size, d), nn.Embedding(size, d)
        self.a_emb = nn.Embedding(N_ACTIONS + 1, d)  # index N_ACTIONS: no previous action
        self.r_emb = nn.Linear(1, d)
        self.pos_emb = nn.Embedding(seq_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, n_heads, dropout, attn_dropout) for _ in range(n_layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, N_ACTIONS)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_cache(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(self.n_layers, 2, batch, self.n_heads, self.seq_len, self.d // self.n_heads, device=device)

    def forward(self, obs, prev_a, prev_r, cache=None, start: int = 0):
        """obs (B, L, 2) long, prev_a (B, L) long, prev_r (B, L) float -> action logits (B, L, A).
        With `cache`, the tokens sit at positions start..start+L-1 of the window."""
        L = obs.shape[1]
        if start + L > self.seq_len:
            raise ValueError(f"{start + L} tokens exceed the context of {self.seq_len}")
        pos = torch.arange(start, start + L, device=obs.device)
        h = (self.x_emb(obs[..., 0]) + self.y_emb(obs[..., 1]) + self.a_emb(prev_a)
             + self.r_emb(prev_r[..., None]) + self.pos_emb(pos))                   # (B, L, d)
        h = self.drop(h)
        for i, blk in enumerate(self.blocks):
            h = blk(h, None if cache is None else cache[i], start)
        return self.head(self.ln_f(h))                                              # (B, L, A)


# ======================================================================================
# In-context evaluation (Sec. 5): many episodes per task, the context is never cleared
# ======================================================================================
@torch.no_grad()
def in_context_returns(model: ADTransformer, variant: str, tasks, n_episodes: int, ctx: int, seed: int = 0,
                       argmax: bool = False, use_cache: bool = True, bf16: bool = False,
                       progress: bool = False, return_actions: bool = False):
    """Roll `model` on every task at once for `n_episodes` episodes; returns (N, n_episodes)
    (and the actions (N, n_episodes * T) with return_actions).
    The window holds the current episode plus up to ctx-1 previous ones. With the cache each
    step feeds one token; when an episode starts on a full window the oldest episode is dropped
    and the cache is rebuilt from the remaining ctx-1 episodes with one prefill, so the cached
    policy is exactly the uncached one (which recomputes the window at every step)."""
    device = next(model.parameters()).device
    env = BatchDarkRoom(variant, tasks)
    N, T = env.n, env.max_steps
    model.eval()
    obs_buf = torch.zeros(N, n_episodes * T, 2, dtype=torch.long, device=device)   # (N, total, 2)
    pa_buf = torch.full((N, n_episodes * T), N_ACTIONS, dtype=torch.long, device=device)
    pr_buf = torch.zeros(N, n_episodes * T, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    prev_a = torch.full((N,), N_ACTIONS, dtype=torch.long, device=device)
    prev_r = torch.zeros(N, device=device)
    cache = model.new_cache(N, device) if use_cache else None
    returns = np.zeros((N, n_episodes))
    first = 0
    for ep in tqdm(range(n_episodes), desc="in-context eval", disable=not progress, leave=False):
        obs = env.reset()
        new_first = max(0, ep - ctx + 1) * T          # window start, in steps of the whole run
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if use_cache and new_first != first and ep * T > new_first:  # slide: drop the oldest episode
                model(obs_buf[:, new_first:ep * T], pa_buf[:, new_first:ep * T], pr_buf[:, new_first:ep * T],
                      cache=cache, start=0)
            first = new_first
            for t in range(T):
                i = ep * T + t
                obs_buf[:, i] = torch.as_tensor(obs, device=device)
                pa_buf[:, i], pr_buf[:, i] = prev_a, prev_r
                if use_cache:
                    logits = model(obs_buf[:, i:i + 1], pa_buf[:, i:i + 1], pr_buf[:, i:i + 1], cache=cache,
                                   start=i - first)[:, -1]                           # (N, A)
                else:
                    logits = model(obs_buf[:, first:i + 1], pa_buf[:, first:i + 1], pr_buf[:, first:i + 1])[:, -1]
                probs = torch.softmax(logits.float(), -1)
                if argmax:
                    a = probs.argmax(-1)
                else:  # inverse-CDF sampling with one uniform per task (same draws cached / uncached)
                    u = torch.rand(N, 1, generator=gen, device=device)
                    a = (probs.cumsum(-1) < u).sum(-1).clamp(max=N_ACTIONS - 1)
                obs, r, _ = env.step(a.cpu().numpy())                     # the numpy env needs the actions
                prev_a, prev_r = a, torch.as_tensor(r, device=device)
                returns[:, ep] += r
    if return_actions:
        return returns, torch.cat([pa_buf[:, 1:], prev_a[:, None]], 1).cpu().numpy()
    return returns


def random_returns(variant: str, tasks, n_episodes: int, seed: int) -> np.ndarray:
    env, rng = BatchDarkRoom(variant, tasks), np.random.default_rng(seed)
    out = np.zeros((env.n, n_episodes))
    for ep in range(n_episodes):
        env.reset()
        for _ in range(env.max_steps):
            out[:, ep] += env.step(rng.integers(0, N_ACTIONS, env.n))[1]
    return out


def episodes_to_reach(curve: np.ndarray, threshold: float, smooth: int = 5) -> Optional[int]:
    """First episode (1-based) where the `smooth`-episode moving average reaches `threshold`."""
    if len(curve) < smooth:
        return None
    avg = np.convolve(curve, np.ones(smooth) / smooth, mode="valid")
    hit = np.flatnonzero(avg >= threshold)
    return int(hit[0] + smooth) if len(hit) else None


# ======================================================================================
# Training: next-action prediction over the learning histories (Algorithm 1)
# ======================================================================================
def make_model(args: Args, device) -> ADTransformer:
    T = ENV_CONFIG[args.env]["max_steps"]
    return ADTransformer(ENV_CONFIG[args.env]["size"], args.context_episodes * T, args.d_model, args.n_layers,
                         args.n_heads, args.dropout, args.attn_dropout).to(device)


def make_optim(model: nn.Module, args: Args, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    warm = max(1, min(args.warmup_steps, steps // 10))

    def lr_lambda(step):  # linear warm-up, then cosine decay to 0 (paper: cosine schedule, peak 3e-4)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def write_results(run_dir: Path, curves: dict, summary: str) -> None:
    """in_context.csv / in_context.md (mean return per episode index) and in_context.png."""
    names = list(curves)
    n = max(len(c) for c in curves.values())
    rows = [[str(e + 1)] + [f"{curves[k][e]:.2f}" if e < len(curves[k]) else "" for k in names] for e in range(n)]
    text = ",".join(["episode"] + names) + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
    (run_dir / "in_context.csv").write_text(text)
    md = ["| episode | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    (run_dir / "in_context.md").write_text(summary + "\n\n" + "\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[ad] matplotlib is not installed: no plot (pip install matplotlib); the table is in_context.csv")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in names:
        ax.plot(np.arange(1, len(curves[k]) + 1), curves[k], label=k, ls="--" if k in ("random", "optimal") else "-")
    ax.set_xlabel("episode (context kept across episodes)"), ax.set_ylabel("mean return, held-out tasks")
    ax.legend(), fig.tight_layout(), fig.savefig(run_dir / "in_context.png", dpi=120), plt.close(fig)


def evaluate_all(args: Args, models: dict, test_tasks, train_tasks, device, run_dir: Path) -> dict:
    """In-context curves of AD / ED on held-out tasks, and the source / random / optimal references."""
    streams = np.repeat(test_tasks, args.eval_repeats, 0)  # (N, 2|4): eval_repeats runs per held-out task
    curves, E = {}, args.eval_episodes
    for name, model in models.items():
        curves[name] = in_context_returns(model, args.env, streams, E, args.context_episodes, seed=args.seed,
                                          argmax=args.argmax, bf16=args.bf16, progress=True).mean(0)
    curves["AD (train tasks)"] = in_context_returns(
        models["AD"], args.env, np.repeat(train_tasks[:len(test_tasks)], args.eval_repeats, 0), E,
        args.context_episodes, seed=args.seed, argmax=args.argmax, bf16=args.bf16).mean(0)
    src = q_learning(BatchDarkRoom(args.env, streams), args.source_episodes, np.random.default_rng(args.seed + 2),
                     args.q_lr, args.q_gamma, args.q_eps_end, args.q_eps_decay, args.q_replay)["rewards"].sum(-1).mean(0)
    curves["source (Q-learning)"] = src[:E]
    curves["random"] = np.full(E, random_returns(args.env, streams, 20, args.seed).mean())
    optimal = BatchDarkRoom(args.env, test_tasks).optimal_returns().mean()
    curves["optimal"] = np.full(E, optimal)
    full = {"AD": curves["AD"], "ED": curves["ED"], "source": src}   # the source curve: all its episodes
    reach = {pct: {k: episodes_to_reach(c, pct / 100 * optimal) for k, c in full.items()} for pct in (50, 75)}
    parts = [f"{pct / 100 * optimal:.2f} ({pct}% of optimal): "
             + ", ".join(f"{k} {v if v else f'> {len(full[k])}'}" for k, v in r.items()) for pct, r in reach.items()]
    summary = (f"{args.env}: {len(test_tasks)} held-out tasks x {args.eval_repeats} runs, {E} episodes in context "
               f"({'argmax' if args.argmax else 'sampled'} actions). Episodes until the 5-episode mean return "
               "reaches " + "; ".join(parts))
    write_results(run_dir, curves, summary)
    print("[ad] " + summary)
    show = sorted({e for e in (1, 5, 10, 20, 30, 40, E) if e <= E})
    print("[ad] episode:   " + " ".join(f"{e:5d}" for e in show))
    for k, c in curves.items():
        print(f"[ad] {k[:10]:10s} " + " ".join(f"{c[e - 1]:5.2f}" for e in show))
    out = {f"{k}_curve": [float(x) for x in c] for k, c in curves.items()}
    out.update({f"{k}_episodes_to_{pct}pct": v for pct, r in reach.items() for k, v in r.items()})
    for k in models:
        out[f"{k}_first"] = float(curves[k][0])
        out[f"{k}_ep40"] = float(curves[k][min(40, E) - 1])
        out[f"{k}_last5"] = float(curves[k][-5:].mean())
    out.update(random=float(curves["random"][0]), optimal=float(optimal))
    return out


def train_phase(name: str, model, sampler, steps: int, args: Args, state: dict, ckpt, logger, eval_fn) -> None:
    """Train `model` to `steps` gradient steps, continuing from state[name] (a resumed checkpoint)."""
    ph = state[name]
    opt, sched = ph["opt"], ph["sched"]
    model.train()
    bar = tqdm(total=steps, initial=ph["step"], desc=f"train {name}", unit="step")
    last_eval, t0, s0 = float("nan"), time.time(), ph["step"]
    while ph["step"] < steps:
        obs, pa, pr, act, mask = sampler.sample(args.batch_size, state["batch_rng"])
        with torch.autocast(sampler.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(obs, pa, pr)                                                  # (B, L, A)
        nll = F.cross_entropy(logits.float().reshape(-1, N_ACTIONS), act.reshape(-1), reduction="none")
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()                              # -log pi(a_t | h_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        ph["step"] += 1
        step = ph["step"]
        bar.update(1)
        if step % 50 == 0 or step == steps:
            acc = ((logits.argmax(-1) == act) & mask).sum().item() / mask.sum().item()
            sps = (step - s0) / (time.time() - t0)
            logger.log(step, **{f"losses/{name}_loss": loss.item(), f"losses/{name}_accuracy": acc,
                                "charts/learning_rate": sched.get_last_lr()[0], "charts/SPS": sps})
            bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{last_eval:.2f}")
        if eval_fn is not None and args.eval_every > 0 and step % args.eval_every == 0 and step < steps:
            last_eval = eval_fn(model)
            logger.log(step, **{f"eval/{name}_return_mean": last_eval})
            bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{last_eval:.2f}")
            model.train()
        if args.save_every > 0 and step % args.save_every == 0:
            ckpt()
    bar.close()


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    if args.env not in ENV_CONFIG:
        raise ValueError(f"unknown --env {args.env!r}: use one of {', '.join(ENV_CONFIG)}")
    if args.context_episodes < 1 or args.subsample < 1:
        raise ValueError("--context-episodes and --subsample must be >= 1")
    if not (0 <= args.q_eps_end <= 1 and 0 < args.q_eps_decay <= 1 and 0 < args.q_lr <= 1 and 0 <= args.q_gamma < 1):
        raise ValueError("Q-learning needs 0 <= --q-eps-end <= 1, 0 < --q-eps-decay <= 1 (a fraction of the "
                         "episodes), 0 < --q-lr <= 1 and 0 <= --q-gamma < 1")
    loaded = None
    if args.eval_only:
        if not args.checkpoint:
            raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by ad.py)")
        loaded = common.load_checkpoint(args.checkpoint, required=("AD", "ED", "args"))
    elif args.resume:
        loaded = common.load_checkpoint(args.resume, required=("AD", "ED", "args", "rng", "batch_rng"))
    if loaded is not None:
        saved = loaded["args"]
        keys = ("env", "context_episodes", "d_model", "n_layers", "n_heads", "n_train_tasks", "n_test_tasks")
        for k in keys + (("seed",) if args.resume else ()):
            if saved[k] != getattr(args, k):
                raise ValueError(f"checkpoint was trained with --{k.replace('_', '-')} {saved[k]}, "
                                 f"this run has {getattr(args, k)}: pass the same value")
    common.set_seed(args.seed)
    device = common.get_device(args.cuda)
    run_dir = args.run_dir or (str(Path(args.resume).parent) if args.resume else None)
    logger = common.RunLogger(args, "ad", run_dir, tensorboard=args.tensorboard, track=args.track)
    train_tasks, test_tasks = task_split(args)
    if loaded is not None and "test_tasks" in loaded:  # the checkpoint's own split (--seed may differ)
        train_tasks, test_tasks = np.asarray(loaded["train_tasks"]), np.asarray(loaded["test_tasks"])
    models = {"AD": make_model(args, device), "ED": make_model(args, device)}
    if args.eval_only:
        for k in models:
            models[k].load_state_dict(loaded[k]["model"])
        out = evaluate_all(args, models, test_tasks, train_tasks, device, logger.dir)
        logger.log(0, **{"eval/return_mean": out["AD_last5"]})
        logger.close()
        return out

    hist = load_histories(args, train_tasks)
    ed_steps = args.total_steps if args.ed_steps is None else args.ed_steps
    E = hist["observations"].shape[1]
    samplers = {"AD": WindowSampler(hist, args.context_episodes, device),
                "ED": WindowSampler(hist, args.context_episodes, device, first_episode=E - args.expert_episodes)}
    steps = {"AD": args.total_steps, "ED": ed_steps}
    state = {"batch_rng": np.random.default_rng(args.seed + 3)}
    for k, m in models.items():
        opt, sched = make_optim(m, args, steps[k])
        state[k] = dict(opt=opt, sched=sched, step=0)
    if args.resume:
        for k, m in models.items():
            m.load_state_dict(loaded[k]["model"])
            state[k]["opt"].load_state_dict(loaded[k]["optimizer"])
            state[k]["sched"].load_state_dict(loaded[k]["scheduler"])
            state[k]["step"] = loaded[k]["step"]
        state["batch_rng"].bit_generator.state = loaded["batch_rng"]
        common.set_rng_state(loaded["rng"])
        print(f"[ad] resumed {args.resume}: AD step {state['AD']['step']}, ED step {state['ED']['step']}")
    ckpt_path = logger.dir / "checkpoint.pt"

    def ckpt():
        common.save_checkpoint(ckpt_path, {
            **{k: dict(model=m.state_dict(), optimizer=state[k]["opt"].state_dict(),
                       scheduler=state[k]["sched"].state_dict(), step=state[k]["step"]) for k, m in models.items()},
            "rng": common.rng_state(), "batch_rng": state["batch_rng"].bit_generator.state,
            "args": {k: getattr(args, k) for k in Args.__dataclass_fields__},
            "train_tasks": train_tasks, "test_tasks": test_tasks})

    quick_tasks = np.repeat(test_tasks, 2, 0)
    quick_eval = lambda m: float(in_context_returns(m, args.env, quick_tasks, min(args.eval_episodes, 30),
                                                    args.context_episodes, seed=args.seed, bf16=args.bf16)[:, -5:].mean())
    try:
        for k in ("AD", "ED"):  # Algorithm 1 on the whole histories (AD), on the final episodes only (ED)
            train_phase(k, models[k], samplers[k], steps[k], args, state, ckpt, logger,
                        quick_eval if k == "AD" else None)
    except KeyboardInterrupt:
        ckpt()
        print(f"[ad] interrupted: checkpoint saved to {ckpt_path}; continue with --resume {ckpt_path}")
        logger.close()
        return {"interrupted": True, "checkpoint": str(ckpt_path)}
    ckpt()
    out = evaluate_all(args, models, test_tasks, train_tasks, device, logger.dir)
    logger.log(steps["AD"], **{"eval/return_mean": out["AD_last5"], "eval/AD_ep40": out["AD_ep40"],
                               "eval/ED_ep40": out["ED_ep40"]})
    logger.close()
    out["checkpoint"], out["run_dir"] = str(ckpt_path), str(logger.dir)
    return out


if __name__ == "__main__":
    main()
