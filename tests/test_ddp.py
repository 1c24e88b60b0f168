"""torchrun data parallelism of gato_tokens.py (CPU, gloo): a 2-process run writes one run folder
whose checkpoint loads in one process; one update on 2 ranks of batch B equals one single-process
update of batch 2B (the ranks' rows are disjoint and the masked loss is normalised over both);
ranks draw different rows of one stream."""
from functools import partial

import launch_ddp
import numpy as np
import torch

import common
import gato_tokens as g

launch = partial(launch_ddp.launch, "gato_tokens.py")  # (args, cwd, nproc) -> the run folder
TINY = ["--env", "hopper", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--seq-len", "300",
        "--vocab", "action", "--eval-episodes", "1", "--eval-max-steps", "3", "--warmup-steps", "1",
        "--lr", "1e-3", "--no-cuda", "--dropout", "0.0", "--filter-frac", "0.0"]


def test_two_ranks_one_update_equals_one_process_on_both_batches(tiny_dataset, tmp_path):
    data = str(tiny_dataset("hopper", "random", 1000))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    step = TINY + ["--dataset-path", data, "--total-steps", "1", "--eval-every", "1"]
    single = launch(step + ["--batch-size", "8"], one, 0)
    ddp = launch(step + ["--batch-size", "4"], two, 2)   # per process: 2 x 4 rows
    a = common.load_checkpoint(single / "checkpoint.pt", "gato_tokens")
    b = common.load_checkpoint(ddp / "checkpoint.pt", "gato_tokens")
    assert not any(k.startswith("module.") for k in b["model"])  # loads without DDP
    assert len(b["ranks"]) == 2 and b["step"] == 1
    init = g.GatoModel(g.Args(n_layer=1, n_embd=32, n_head=2, seq_len=300, vocab="action"))
    moved = 0.0
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6)
        if k in init.state_dict() and v.shape == init.state_dict()[k].shape:
            moved = max(moved, float((v - init.state_dict()[k]).abs().max()))
    assert moved > 1e-4                                  # the update did change the weights
    # the DDP checkpoint acts in one process, and resumes under torchrun
    policy = g.load_policy(ddp / "checkpoint.pt", env="hopper", temperature=0.0)
    policy.reset(2)
    act = policy(np.zeros((2, 11), np.float32))
    assert act.shape == (2, 3) and np.isfinite(act).all()
    launch(TINY + ["--dataset-path", data, "--batch-size", "4", "--total-steps", "2",
                   "--eval-every", "2", "--resume", str(ddp / "checkpoint.pt")], two, 2)
    assert common.load_checkpoint(ddp / "checkpoint.pt", "gato_tokens")["step"] == 2


def test_ranks_draw_disjoint_rows_of_one_stream():
    rng = np.random.default_rng(0)
    n = 200
    data = dict(observations=rng.normal(size=(n, 3)).astype(np.float32),
                actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                rewards=np.repeat(np.arange(10.0), 20) / 20, terminals=np.zeros(n, bool),
                timeouts=(np.arange(n) % 20 == 19))
    args = g.Args(filter_frac=0.0, seq_len=40, batch_size=4, vocab="action")
    task = g.Task("fake", data, args)
    whole = g.sample_batch([task], g.Args(**{**vars(args), "batch_size": 8}),
                           torch.Generator().manual_seed(3))
    parts = [g.sample_batch([task], args, torch.Generator().manual_seed(3), r, 2) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])
    assert not np.array_equal(parts[0][0], parts[1][0])  # different windows on different ranks
    assert (whole[0][:2] != g.PAD).sum() > 0 and len(parts[0][2]) > 0
