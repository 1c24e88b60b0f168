"""Decision Transformer (Chen et al. 2021, arXiv 2106.01345) + Multi-Game DT returns (Lee et al.
2022, arXiv 2205.15241): a causal GPT over interleaved (R_t, s_t, a_t) tokens, trained offline on
D4RL-style data (DT Sec. 3), rolled out return-conditioned (DT Algorithm 1) on DT Sec. 4.2's tasks.
Defaults are the official gym code's (kzl/decision-transformer: experiment.py, seq_trainer.py).
`--return-bins N` is MGDT's return model: per step (s_t, R_t, a_t) (Sec. 3.1), returns as N
discrete tokens (Sec. 3.2), R_t sampled at every step by expert action inference (Sec. 3.4).

Named deviations (and why):
  * Right padding: a short window's pads follow its real steps, so SDPA's is_causal needs no mask
    (official: left padding + attention mask); real steps' predictions are equal (tested).
  * Gymnasium v5 MuJoCo and the ARS datasets of make_datasets.py (D4RL's SAC data is not
    installable offline): scores are "D4RL-normalized".
  * MGDT bins for continuous returns: N uniform bins over the dataset's [min, max] scaled
    return-to-go, the top edge in bin N - 1 (MGDT: Atari integers -20..100, bin size 1, Sec. 3.2);
    the expert term of Sec. 3.4 is taken at each bin's centre.
  * MGDT here keeps DT's continuous actions (tanh + MSE, not MGDT's discrete cross-entropy) and
    has no reward token: MSE ~0.01 next to a return cross-entropy ~4, so --return-loss-weight
    (default 1, the paper's plain sum) can rebalance them.
  * MGDT draws one R_t from the Sec. 3.4 distribution (the released colab keeps the best of 128
    draws at temperature 0.75).

    python dt.py --env hopper                    # paper config: 100k updates on hopper/medium
    python dt.py --env hopper --return-bins 120  # Multi-Game DT return head + expert inference
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Official gym code (experiment.py): targets per env (the first is the headline), `scale`,
# max_ep_len; AdamW weight decay; seq_trainer.py: the gradient-norm clip.
TARGET_RETURNS = {"hopper": (3600.0, 1800.0), "halfcheetah": (12000.0, 6000.0),
                  "walker2d": (5000.0, 2500.0)}
REWARD_SCALE = 1000.0  # returns-to-go and rewards are divided by this, in training and rollouts
MAX_EP_LEN = 1000      # timestep-embedding size; later steps use the last row (official cutoff)
WEIGHT_DECAY = 1e-4
GRAD_CLIP = 0.25
LOG_EVERY = 100        # updates between loss logs


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
    """environment: hopper, halfcheetah, walker2d (Gymnasium v5) or a Gymnasium id"""
    dataset: str = "medium"
    """random, medium, medium-replay, expert, medium-expert, or a Minari id"""
    dataset_path: Optional[str] = None
    """read the dataset from this .npz / D4RL .hdf5 file instead"""
    total_steps: int = 100_000
    """gradient updates (official: 10 iterations x 10k steps)"""
    batch_size: int = 64
    """windows per update"""
    lr: float = 1e-4
    """AdamW learning rate (weight decay 1e-4)"""
    eval_every: int = 10_000
    """evaluate and checkpoint every this many updates; the last evaluation is the reported one"""
    eval_episodes: int = 100
    """evaluation episodes per target return, run at once (vectorized)"""
    eval_max_steps: Optional[int] = None
    """cap on evaluation episode length (default: the env's limit, 1000)"""
    bf16: bool = False
    """bfloat16 autocast for training and evaluation (fp32 is the paper's)"""
    resume: Optional[str] = None
    """continue this checkpoint's run (its model, data, optimiser settings) up to --total-steps"""
    eval_only: bool = False
    """only evaluate --checkpoint (the architecture comes from the checkpoint)"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    target_returns: Optional[tuple[float, ...]] = None
    """returns to condition on at evaluation (default: the official ones, hopper 3600 1800)"""
    context_len: int = 20
    """K, timesteps in the context (3K tokens)"""
    embed_dim: int = 128
    """d, the transformer width"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 1
    """attention heads"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup, then constant"""
    return_bins: int = 0
    """Multi-Game DT: number of return bins (0 = DT's continuous return token)"""
    expert_kappa: float = 10.0
    """MGDT expert inference: kappa in log P(R) + kappa (R - R_low) / (R_high - R_low) (Sec. 3.4)"""
    return_loss_weight: float = 1.0
    """MGDT: weight of the return cross-entropy next to the action MSE (1 = the plain sum)"""


# ---- data (DT Sec. 3 "Training"; official experiment.py get_batch)
class ReturnBins:
    """MGDT return tokens (Sec. 3.2) for continuous returns: N uniform bins over [lo, hi] of the
    scaled returns-to-go; R == hi falls in bin N - 1, values outside clamp to the edge bins."""

    def __init__(self, lo: float, hi: float, n: int):
        if not hi > lo:
            raise ValueError(f"return bins need R_high > R_low, got [{lo}, {hi}]: the dataset's "
                             f"returns-to-go are constant; use --return-bins 0")
        self.lo, self.hi, self.n = float(lo), float(hi), int(n)

    def encode(self, R: torch.Tensor) -> torch.Tensor:
        idx = torch.floor((R - self.lo) / (self.hi - self.lo) * self.n)
        return idx.clamp(0, self.n - 1).long()


class TrajectoryData:
    """Every episode flattened on the device. States z-scored with the dataset's mean and std
    (+1e-6), returns-to-go (gamma 1) divided by REWARD_SCALE, timesteps cut at MAX_EP_LEN - 1."""

    def __init__(self, data: dict, args: Args, device):
        episodes = common.split_episodes(data)
        obs = data["observations"]
        self.state_mean = torch.as_tensor(obs.mean(0), dtype=torch.float32)       # (obs_dim,)
        self.state_std = torch.as_tensor(obs.std(0) + 1e-6, dtype=torch.float32)  # (obs_dim,)
        lengths = np.array([len(ep["rewards"]) for ep in episodes])
        rtg = np.concatenate([common.returns_to_go(ep["rewards"]) for ep in episodes])
        rtg = rtg / REWARD_SCALE
        steps = np.concatenate([np.arange(n) for n in lengths]).clip(max=MAX_EP_LEN - 1)

        def t(x, dtype=torch.float32):
            return torch.as_tensor(x, dtype=dtype, device=device)
        obs = np.concatenate([ep["observations"] for ep in episodes])
        self.states = t((obs - self.state_mean.numpy()) / self.state_std.numpy())    # (N, obs_dim)
        self.actions = t(np.concatenate([ep["actions"] for ep in episodes]))        # (N, act_dim)
        self.rtg, self.timesteps = t(rtg), t(steps, torch.long)                     # (N,), (N,)
        self.lengths = t(lengths, torch.long)                                       # (episodes,)
        self.starts = t(np.concatenate([[0], np.cumsum(lengths)[:-1]]), torch.long)
        self.probs = t(lengths / lengths.sum())  # an episode is drawn in proportion to its length
        self.bins = ReturnBins(rtg.min(), rtg.max(), args.return_bins) if args.return_bins else None
        self.returns = self.bins.encode(self.rtg) if self.bins else self.rtg        # (N,)
        self.obs_dim, self.act_dim = self.states.shape[1], self.actions.shape[1]

    def stats(self) -> dict:
        """What a policy needs besides the weights (saved in the checkpoint, no numpy)."""
        rng = [self.bins.lo, self.bins.hi] if self.bins else []
        return dict(state_mean=self.state_mean, state_std=self.state_std, obs_dim=self.obs_dim,
                    act_dim=self.act_dim, return_range=rng)

    def sample(self, batch_size: int, K: int, gen: torch.Generator):
        """K-step windows starting uniformly in [0, len) of length-weighted episodes, right-padded
        with zeros; mask (B, K) marks the real steps (from the lengths, before padding).
        -> states (B,K,obs), actions (B,K,act), returns (B,K), timesteps (B,K), mask (B,K)."""
        dev = self.states.device
        ep = torch.multinomial(self.probs, batch_size, replacement=True, generator=gen)  # (B,)
        length = self.lengths[ep]
        start = (torch.rand(batch_size, device=dev, generator=gen) * length).long()  # [0, len)
        offs = start[:, None] + torch.arange(K, device=dev)                            # (B, K)
        mask = offs < length[:, None]                                                  # (B, K)
        idx = torch.where(mask, self.starts[ep][:, None] + offs, 0)  # pads read row 0, zeroed:
        m = mask.unsqueeze(-1)
        return (torch.where(m, self.states[idx], 0.0), torch.where(m, self.actions[idx], 0.0),
                torch.where(mask, self.returns[idx], 0), torch.where(mask, self.timesteps[idx], 0),
                mask)


# ---- model (DT Sec. 3 "Architecture": GPT-2 blocks of the official vendored trajectory_gpt2.py)
class Block(nn.Module):
    """Pre-LayerNorm GPT-2 block: causal self-attention + MLP (4d, ReLU as the official config)."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, last_only: bool = False):
        """x (B, T, d) -> (B, T, d); last_only (predict_last): the final query alone, (B, 1, d)."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        if last_only:  # the last token attends to every key: no mask needed
            q, x = q[:, -1:], x[:, -1:]
        q, k, v = (z.view(B, z.shape[1], self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not last_only,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, q.shape[2], d)))
        return x + self.mlp(self.ln2(x))


class DecisionTransformer(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        d, self.bins = args.embed_dim, args.return_bins
        self.embed_timestep = nn.Embedding(MAX_EP_LEN, d)  # one per step, added to its 3 tokens
        self.embed_state, self.embed_action = nn.Linear(obs_dim, d), nn.Linear(act_dim, d)
        self.embed_return = nn.Embedding(self.bins, d) if self.bins else nn.Linear(1, d)
        self.embed_ln, self.drop = nn.LayerNorm(d), nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(d, args.n_head, args.dropout)
                                    for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.predict_action = nn.Sequential(nn.Linear(d, act_dim), nn.Tanh())
        self.predict_return = nn.Linear(d, self.bins) if self.bins else None
        for m in self.blocks.modules():  # vendored GPT-2 init: every Linear N(0, 0.02), bias 0
            if isinstance(m, nn.Linear):  # (embeddings and heads outside it: PyTorch defaults)
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, states, actions, returns, timesteps):
        """Per step (R_t, s_t, a_t) (DT) or (s_t, R_t, a_t) (MGDT Sec. 3.1), each a modality's
        embedding + the step's timestep embedding -> LayerNorm, dropout: (B, 3K, d)."""
        time = self.embed_timestep(timesteps)                                       # (B, K, d)
        R = self.embed_return(returns if self.bins else returns.unsqueeze(-1)) + time
        s = self.embed_state(states) + time
        a = self.embed_action(actions) + time
        x = torch.stack((s, R, a) if self.bins else (R, s, a), dim=2)              # (B, K, 3, d)
        return self.drop(self.embed_ln(x.flatten(1, 2)))                            # (B, 3K, d)

    def forward(self, states, actions, returns, timesteps):
        """states (B,K,obs), actions (B,K,act), returns (B,K) float (DT) or long bins (MGDT),
        timesteps (B,K) -> actions (B,K,act), return logits (B,K,bins) or None."""
        x = self.tokens(states, actions, returns, timesteps)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x).unflatten(1, (states.shape[1], 3))                         # (B, K, 3, d)
        action = self.predict_action(x[:, :, 1])  # a_t at token 1: s_t (DT), R_t (MGDT)
        logits = self.predict_return(x[:, :, 0]) if self.bins else None  # MGDT: P(R_t | s_t, ..)
        return action, logits

    # -- speed trick: at evaluation only one output of the last step is read, so the sequence is
    # cut after that token and the last block computes that query alone (tested == forward).
    @torch.no_grad()
    def predict_last(self, states, actions, returns, timesteps, token: int):
        """-> forward()'s action (token 1, (B, act)) or return logits (token 0) at the last step."""
        x = self.tokens(states, actions, returns, timesteps)[:, :3 * states.shape[1] - 2 + token]
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        x = self.ln_f(x)[:, 0]
        return self.predict_action(x) if token == 1 else self.predict_return(x)


def loss_fn(pred, logits, actions, returns, mask, args: Args) -> dict:
    """DT Sec. 3: MSE on the actions of real steps (padding masked out; official seq_trainer.py);
    MGDT (Sec. 3.1): + the return-bin cross-entropy of those steps, times --return-loss-weight."""
    m = mask.float()                                                                # (B, K)
    action_loss = (((pred.float() - actions) ** 2).mean(-1) * m).sum() / m.sum()
    out = dict(action_loss=action_loss, total_loss=action_loss)
    if logits is not None:
        ce = F.cross_entropy(logits.float().transpose(1, 2), returns, reduction="none")  # (B, K)
        out["return_loss"] = (ce * m).sum() / m.sum()
        out["total_loss"] = action_loss + args.return_loss_weight * out["return_loss"]
    return out


def make_optimizer(model, args: Args):
    """AdamW on every parameter; lr * min((step + 1) / warmup, 1): linear warmup, then constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    warmup = max(args.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0))
    return optimizer, scheduler


# ---- policy (DT Algorithm 1; MGDT Sec. 3.4), batched over episodes for common.evaluate
def sample_expert_return(logits, kappa: float, gen=None):
    """MGDT Sec. 3.4: R ~ exp(log P(R | ...) + kappa (R - R_low) / (R_high - R_low)), the bin
    centres at (i + 0.5) / N of the range. logits (N, bins) -> bins (N,) long."""
    n = logits.shape[-1]
    expert = kappa * (torch.arange(n, device=logits.device) + 0.5) / n                # (bins,)
    probs = torch.softmax(torch.log_softmax(logits.float(), -1) + expert, -1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


class DTPolicy:
    """N episodes at once, their last K steps in preallocated (N, K, ...) device buffers: step t
    writes at min(t, K - 1), and a full window shifts left (right padding, as in training).
    Episodes that observe() reports done get no more forward passes (their actions are 0)."""

    def __init__(self, model: DecisionTransformer, args: Args, state_mean, state_std,
                 bins: Optional[ReturnBins] = None, target: Optional[float] = None, seed=0):
        self.model, self.args, self.bins, self.target, self.seed = model, args, bins, target, seed
        self.device = next(model.parameters()).device
        self.mean = torch.as_tensor(state_mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(state_std, dtype=torch.float32, device=self.device)
        self.gen = torch.Generator(device=self.device)

    def reset(self, n: int):
        K, dev, act_dim = self.args.context_len, self.device, self.model.embed_action.in_features
        self.states = torch.zeros(n, K, self.mean.numel(), device=dev)
        self.actions = torch.zeros(n, K, act_dim, device=dev)
        self.returns = torch.zeros(n, K, device=dev, dtype=torch.long if self.bins else torch.float)
        self.timesteps = torch.zeros(n, K, device=dev, dtype=torch.long)
        self.next_return = torch.full((n,), (self.target or 0.0) / REWARD_SCALE, device=dev)
        self.live = np.ones(n, dtype=bool)  # on the host: the env's dones arrive there
        self.t = 0
        self.gen.manual_seed(self.seed)

    def _head(self, rows, n: int, token: int):
        """The model's output at token `token` of step n - 1 (action 1, MGDT return logits 0)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            buffers = (self.states, self.actions, self.returns, self.timesteps)
            return self.model.predict_last(*(b[rows, :n] for b in buffers), token).float()

    @torch.no_grad()
    def __call__(self, obs):
        """obs (N, obs_dim) -> actions (N, act_dim), numpy."""
        K = self.args.context_len
        if self.t >= K:  # window full: drop the oldest step
            for buf in (self.states, self.actions, self.returns, self.timesteps):
                buf[:, :-1] = buf[:, 1:].clone()
        p = min(self.t, K - 1)
        self.states[:, p] = (torch.as_tensor(obs, device=self.device) - self.mean) / self.std
        self.actions[:, p] = 0.0  # a_t is not known yet; causality hides it from s_t and R_t
        self.timesteps[:, p] = min(self.t, MAX_EP_LEN - 1)
        live = torch.as_tensor(np.flatnonzero(self.live), device=self.device)
        rows = slice(None) if self.live.all() else live  # finished episodes: no forward pass
        if self.bins is None:
            self.returns[:, p] = self.next_return                 # Alg. 1: condition on R_t
        else:  # MGDT Sec. 3.4: R_t ~ P(R_t | s_t, history) tilted to high returns, no target
            logits = self._head(rows, p + 1, token=0)  # R_t's own token is cut off
            self.returns[rows, p] = sample_expert_return(logits, self.args.expert_kappa, self.gen)
        self.actions[rows, p] = self._head(rows, p + 1, token=1)  # Alg. 1: a_t = DT(R, s, a, t)
        return self.actions[:, p].cpu().numpy().copy()                             # (N, act)

    def observe(self, rewards, dones):
        p = min(self.t, self.args.context_len - 1)
        r = torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
        self.next_return = self.returns[:, p] - r / REWARD_SCALE  # Alg. 1: R_{t+1} = R_t - r_t
        self.live &= ~np.asarray(dones, dtype=bool)
        self.t += 1


def evaluate(policy: DTPolicy, args: Args) -> dict:
    """Each target return (DT; the first is the headline) or expert inference (MGDT) on
    args.eval_episodes episodes at once -> {name: common.evaluate's dict}."""
    model, out = policy.model, {}
    was_training = model.training
    model.eval()
    targets = [None] if policy.bins else policy.args.target_returns or TARGET_RETURNS[args.env]
    for target in targets:
        policy.target = target
        out["expert" if target is None else f"target{target:g}"] = common.evaluate(
            policy, args.env, args.eval_episodes, seed=args.seed + 10_000,
            max_steps=args.eval_max_steps, dataset=args.dataset)
    model.train(was_training)
    return out


def summary(results: dict) -> dict:
    """Headline (first target) and per-target means, as run.log() keys."""
    out = {}
    for i, (name, res) in enumerate(results.items()):
        for key, value in (("return_mean", res["returns"].mean()),
                           ("normalized_score", res["normalized"].mean())):
            out[f"eval/{name}/{key}"] = float(value)
            if i == 0:
                out[f"eval/{key}"] = float(value)
    return out


def report(metrics: dict) -> str:
    return ", ".join(f"{k[5:]} {v:.1f}" for k, v in metrics.items() if k.count("/") == 2)


# ---- run
def check_args(args: Args) -> Args:
    """Clear errors for settings that cannot run."""
    common.env_id(args.env)
    if not (args.target_returns or args.return_bins or args.env in TARGET_RETURNS
            or args.eval_only or args.resume):
        raise ValueError(f"no default target returns for {args.env!r}: pass --target-returns R ...")
    for name in ("total_steps", "batch_size", "eval_every", "eval_episodes", "context_len",
                 "embed_dim", "n_layer", "n_head"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.embed_dim % args.n_head:
        raise ValueError(f"--embed-dim {args.embed_dim} is not divisible by --n-head {args.n_head}")
    if args.warmup_steps < 0 or not 0 <= args.dropout < 1 or args.return_loss_weight < 0:
        raise ValueError("need --warmup-steps >= 0, 0 <= --dropout < 1, --return-loss-weight >= 0")
    if args.return_bins == 1 or args.return_bins < 0:
        raise ValueError(f"--return-bins must be 0 (plain DT) or >= 2, got {args.return_bins}")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by dt.py)")
    return args


def checkpoint_args(ckpt: dict) -> Args:
    return Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})


def main(argv=None) -> dict:
    args = check_args(common.parse_args(Args, argv))
    device = common.get_device(args.cuda)
    if args.eval_only:  # everything but the evaluation settings comes from the checkpoint
        policy = load_policy(args.checkpoint, device)
        args.env = policy.args.env
        policy.args.target_returns = args.target_returns or policy.args.target_returns
        out = summary(evaluate(policy, args))
        print(f"[dt] {args.checkpoint}: {report(out)}")
        return out
    if args.resume:  # the run's own settings; this command's run length and evaluation
        keep = ("resume", "total_steps", "eval_every", "eval_episodes", "eval_max_steps", "cuda")
        saved = checkpoint_args(common.load_checkpoint(args.resume, "dt"))
        args = dataclasses.replace(saved, **{k: getattr(args, k) for k in keep})
    common.set_seed(args.seed)

    dataset = common.load_dataset(args.env, args.dataset, path=args.dataset_path)
    args.env = dataset.env
    data = TrajectoryData(dataset, args, device)
    model = DecisionTransformer(data.obs_dim, data.act_dim, args).to(device)
    optimizer, scheduler = make_optimizer(model, args)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # the batch sampler's stream
    run = common.Run(args, "dt", extra=data.stats(), model=model, optimizer=optimizer,
                     scheduler=scheduler, sampler=gen)
    print(f"[dt] {args.env}: {len(data.lengths)} episodes, {len(data.rtg)} steps, {device}")
    out = {}
    for step in run.loop(args.total_steps):
        states, actions, returns, timesteps, mask = data.sample(args.batch_size,
                                                                args.context_len, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred, logits = model(states, actions, returns, timesteps)
        losses = loss_fn(pred, logits, actions, returns, mask, args)
        optimizer.zero_grad(set_to_none=True)
        losses["total_loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # after backward, before step
        optimizer.step()
        scheduler.step()
        if run.every(LOG_EVERY):
            run.log(**{f"losses/{k}": v for k, v in losses.items()},
                    **{"charts/learning_rate": scheduler.get_last_lr()[0]})
        if run.every(args.eval_every):
            policy = DTPolicy(model, args, data.state_mean, data.state_std, data.bins,
                              seed=args.seed)
            out = summary(evaluate(policy, args))
            run.log(**out)
            run.save()
    out["run_dir"] = str(run.finish())
    print(f"[dt] step {run.step}: {report(out)}")
    return out


def load_policy(path, device="cpu") -> DTPolicy:
    """The batched policy of a dt.py checkpoint: policy.reset(n); act = policy(obs (n, obs_dim));
    policy.observe(rewards, dones). DT conditions on the checkpoint's first target return."""
    ckpt = common.load_checkpoint(path, "dt")
    args = checkpoint_args(ckpt)
    model = DecisionTransformer(ckpt["obs_dim"], ckpt["act_dim"], args).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    bins = ReturnBins(*ckpt["return_range"], args.return_bins) if args.return_bins else None
    targets = args.target_returns or TARGET_RETURNS.get(args.env, (None,))
    return DTPolicy(model, args, ckpt["state_mean"], ckpt["state_std"], bins,
                    None if bins else targets[0], seed=args.seed)


if __name__ == "__main__":
    main()
