"""Invariants of qvpo.py (QVPO, arXiv 2405.16173) and smoke runs of the script."""
import numpy as np
import pytest
import torch

import common
import qvpo

TINY = ["--hidden", "16", "--n-timesteps", "4", "--n-train-samples", "6", "--n-entropy-samples", "3",
        "--n-eval-samples", "4", "--batch-size", "8", "--eval-episodes", "2", "--eval-max-steps", "5",
        "--no-progress", "--no-cuda", "--log-every", "5"]


def test_advantage_weights_nonnegative_and_zero_below_mean():
    q = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 3
    w = qvpo.advantage_weights(q)
    v = q.mean(1, keepdim=True)
    assert (w >= 0).all()
    assert (w[q < v] == 0).all() and (q < v).any()
    assert torch.allclose(w[q >= v], (q - v)[q >= v])
    # the kept (argmax-Q) sample carries the largest weight, max Q - mean Q
    assert torch.allclose(w.max(1).values, q.max(1).values - q.mean(1))
    # a state whose samples all have the same Q gets weight 0 (nothing to learn from it)
    assert (qvpo.advantage_weights(torch.ones(2, 5)) == 0).all()


def test_entropy_alpha_schedule():
    args = qvpo.Args(total_steps=1000)
    assert qvpo.entropy_alpha(0, args) == pytest.approx(0.02)
    assert qvpo.entropy_alpha(500, args) == pytest.approx(0.011)
    assert qvpo.entropy_alpha(1000, args) == pytest.approx(0.002)
    assert qvpo.entropy_alpha(5000, args) == pytest.approx(0.002)  # constant after the decay
    vals = [qvpo.entropy_alpha(s, args) for s in range(0, 1001, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    args = qvpo.Args(total_steps=1000, alpha_decay_steps=100)
    assert qvpo.entropy_alpha(100, args) == pytest.approx(0.002)


def test_truncation_bootstraps_termination_cuts():
    r, q_next = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    y = qvpo.critic_target(r, torch.tensor([0.0, 1.0]), q_next, 0.99)
    assert y[0] == pytest.approx(1.0 + 0.99 * 10.0)  # truncated (not terminated): bootstraps
    assert y[1] == pytest.approx(1.0)  # terminated: no bootstrap
    # the buffer hands the update the termination flag, never the truncation flag
    buf = qvpo.ReplayBuffer(4, 3, 1, "cpu")
    buf.add(np.zeros(3), np.zeros(1), 1.0, np.ones(3), term=False, trunc=True)
    *_, term = buf.sample(5, torch.Generator().manual_seed(0))
    assert (term == 0).all()
    buf.add(np.zeros(3), np.zeros(1), 1.0, np.ones(3), term=True, trunc=False)
    assert buf.to_d4rl(np.ones(1), np.zeros(1))["terminals"].tolist() == [False, True]


def test_batched_sampler_matches_per_state_loop():
    torch.manual_seed(0)
    actor = qvpo.DiffusionPolicy(obs_dim=5, act_dim=3, hidden=32, T=6)
    critic = qvpo.TwinQ(5, 3, hidden=32)
    states = torch.randn(7, 5)
    n = 9
    batched = actor.sample(states, n, torch.Generator().manual_seed(123))  # (7, 9, 3)
    noise = torch.randn(actor.noise_shape(7, n), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        loop = torch.cat([actor.denoise(states[i:i + 1], noise[i:i + 1]) for i in range(7)])
        one_by_one = torch.stack([torch.cat([actor.denoise(states[i:i + 1], noise[i:i + 1, j:j + 1])[0]
                                             for j in range(n)]) for i in range(7)])
    assert batched.shape == (7, n, 3)
    assert torch.allclose(batched, loop, atol=1e-5) and torch.allclose(batched, one_by_one, atol=1e-5)
    assert batched.abs().max() <= 1.0  # actions clamped to [-1, 1]
    assert not torch.allclose(batched[:, 0], batched[:, 1])  # samples differ
    # argmax-Q selection: batched == per-state loop over the same noise
    best = qvpo.best_of(actor, critic, states, n, torch.Generator().manual_seed(5))
    noise = torch.randn(actor.noise_shape(7, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = []
        for i in range(7):
            acts = actor.denoise(states[i:i + 1], noise[i:i + 1])  # (1, n, 3)
            q = torch.stack([critic.q_min(states[i:i + 1], acts[:, j]) for j in range(n)], 1)  # (1, n)
            ref.append(acts[0, q[0].argmax()])
    assert torch.allclose(best, torch.stack(ref), atol=1e-5)


def test_save_resume_continues_identically(tmp_path):
    common_args = ["--env", "Pendulum-v1", "--learning-starts", "10", "--eval-every", "20", "--seed", "3",
                   "--alpha-decay-steps", "40"] + TINY
    straight = qvpo.main(common_args + ["--total-steps", "40", "--run-dir", str(tmp_path / "a")])
    half = qvpo.main(common_args + ["--total-steps", "20", "--run-dir", str(tmp_path / "b")])
    ck = common.load_checkpoint(half["checkpoint"])
    assert ck["step"] == 20 and len(ck["episode"]["actions"]) == 20  # saved mid-episode
    resumed = qvpo.main(common_args + ["--total-steps", "40", "--run-dir", str(tmp_path / "c"),
                                       "--resume", half["checkpoint"]])
    assert resumed["step"] == 40 and resumed["history"] == straight["history"]
    a, b = common.load_checkpoint(straight["checkpoint"]), common.load_checkpoint(resumed["checkpoint"])
    for k in ("actor", "critic", "actor_target", "critic_target"):
        for name, v in a["agent"][k].items():
            assert torch.equal(v, b["agent"][k][name]), (k, name)
    for k in qvpo.ReplayBuffer.FIELDS:
        assert torch.equal(a["buffer"][k], b["buffer"][k]), k
    assert torch.equal(a["gen"], b["gen"])


def test_smoke_save_replay_and_eval_only(tmp_path):
    replay = tmp_path / "replay.npz"
    out = qvpo.main(["--env", "InvertedPendulum-v5", "--total-steps", "30", "--learning-starts", "10",
                     "--eval-every", "15", "--run-dir", str(tmp_path / "run"), "--save-replay", str(replay)] + TINY)
    assert out["step"] == 30 and np.isfinite(out["eval/return_mean"]) and len(out["history"]) == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("losses/actor_loss" in l for l in lines) and any("eval/return_mean" in l for l in lines)
    data = common.load_dataset("InvertedPendulum-v5", path=replay)  # validated against the env
    assert len(data["rewards"]) == 30 and data["actions"].shape == (30, 1)
    assert np.abs(data["actions"]).max() <= 3.0  # env units (InvertedPendulum bounds are +-3)
    assert data["terminals"].any()  # the pole falls under a random policy: true terminations
    assert data["terminals"][-1] or data["timeouts"][-1]  # the last row ends an episode
    ev = qvpo.main(["--env", "InvertedPendulum-v5", "--eval-only", "--checkpoint", out["checkpoint"],
                    "--eval-episodes", "2", "--eval-max-steps", "5", "--no-cuda"])  # architecture from the checkpoint
    assert ev["step"] == 30 and np.isfinite(ev["eval/return_mean"])
    with pytest.raises(common.CheckpointError, match="InvertedPendulum"):
        qvpo.main(["--env", "Pendulum-v1", "--eval-only", "--checkpoint", out["checkpoint"]] + TINY)


def test_time_limit_is_a_timeout_not_a_terminal(tmp_path):
    """Pendulum-v1 never terminates; its 200-step time limit must be stored as a timeout."""
    replay = tmp_path / "pendulum.npz"
    qvpo.main(["--env", "Pendulum-v1", "--total-steps", "210", "--learning-starts", "1000", "--eval-every", "1000",
               "--run-dir", str(tmp_path / "run"), "--save-replay", str(replay)] + TINY)
    data = common.load_dataset("Pendulum-v1", path=replay)
    assert not data["terminals"].any()
    assert np.flatnonzero(data["timeouts"]).tolist() == [199, 209]
    eps = common.split_episodes(data)
    assert [len(e["rewards"]) for e in eps] == [200, 10]


def test_stop_return_ends_the_run_early(tmp_path):
    out = qvpo.main(["--env", "Pendulum-v1", "--total-steps", "50", "--learning-starts", "100", "--eval-every", "10",
                     "--stop-return=-1e9", "--run-dir", str(tmp_path / "run")] + TINY)
    assert out["step"] == 10 and len(out["history"]) == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="--checkpoint"):
        qvpo.main(["--eval-only"] + TINY)
    with pytest.raises(ValueError, match="continuous"):
        qvpo.main(["--env", "CartPole-v1", "--total-steps", "5"] + TINY)
