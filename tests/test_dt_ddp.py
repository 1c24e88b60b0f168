"""torchrun data parallelism of dt.py (CPU, gloo), DT and Multi-Game DT: a 2-process run writes one
run folder whose checkpoint loads in one process and resumes under torchrun; one update on 2 ranks
of batch B equals one single-process update of batch 2B (disjoint windows of one stream, the
masked losses normalised over both ranks' real steps); ranks draw different windows."""
from functools import partial

import launch_ddp
import numpy as np
import torch
from test_dt_mgdt import minatar_data

import common
import dt

launch = partial(launch_ddp.launch, "dt.py")  # (args, cwd, nproc) -> the run folder
TINY = ["--embed-dim", "32", "--n-layer", "1", "--n-head", "2", "--dropout", "0.0", "--no-cuda",
        "--eval-episodes", "1", "--eval-max-steps", "3", "--warmup-steps", "1", "--lr", "1e-3",
        "--total-steps", "1", "--eval-every", "1"]


def same_update(args, tmp_path):
    """One update: 1 process x batch 8 vs 2 processes x batch 4 -> the two checkpoints."""
    (one := tmp_path / "one").mkdir()
    (two := tmp_path / "two").mkdir()
    a = common.load_checkpoint(launch(args + ["--batch-size", "8"], one, 0) / "checkpoint.pt")
    ddp = launch(args + ["--batch-size", "4"], two, 2)
    b = common.load_checkpoint(ddp / "checkpoint.pt", "dt")
    assert not any(k.startswith("module.") for k in b["model"])  # loads without DDP
    assert len(b["ranks"]) == 2 and b["step"] == 1
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6)
    return a, ddp


def test_two_ranks_one_update_equals_one_process_dt(tiny_dataset, tmp_path):
    data = str(tiny_dataset("hopper", "random", 1000))   # short episodes: padded windows
    args = TINY + ["--env", "hopper", "--dataset-path", data, "--context-len", "20"]
    a, ddp = same_update(args, tmp_path)
    fresh = dt.DecisionTransformer(11, 3, dt.check_args(dt.Args(embed_dim=32, n_layer=1,
                                                                n_head=2)))
    moved = max(float((v - fresh.state_dict()[k]).abs().max()) for k, v in a["model"].items()
                if k.startswith("blocks."))
    assert moved > 1e-4                                  # the update did change the weights
    policy = dt.load_policy(ddp / "checkpoint.pt")      # the DDP checkpoint acts in one process
    policy.reset(2)
    act = policy(np.zeros((2, 11), np.float32))
    assert act.shape == (2, 3) and np.isfinite(act).all()
    launch(TINY[:-4] + ["--env", "hopper", "--dataset-path", data, "--batch-size", "4",
                        "--total-steps", "2", "--eval-every", "2", "--resume",
                        str(ddp / "checkpoint.pt")], tmp_path / "two", 2)
    assert common.load_checkpoint(ddp / "checkpoint.pt", "dt")["step"] == 2


def test_two_ranks_one_update_equals_one_process_games(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQRL_DATA_DIR", str(tmp_path / "data"))  # the runs read it too
    for i, g in enumerate(("minatar/breakout", "minatar/asterix")):
        path = common.dataset_path(g, "dqn", None, 0, None)
        common.save_npz(path, minatar_data(g, 240, i, episode_cap=30))
    same_update(TINY + ["--env", "minatar/breakout+minatar/asterix"], tmp_path)


def test_ranks_draw_disjoint_windows_of_one_stream():
    lengths = np.array([3, 30, 7, 12, 50])
    eps = dt.Episodes(lengths, "cpu")
    eps.fields = (torch.arange(lengths.sum()),)
    whole = eps.sample(8, 5, torch.Generator().manual_seed(1))
    parts = [eps.sample(4, 5, torch.Generator().manual_seed(1), r, 2) for r in (0, 1)]
    for i in range(2):
        torch.testing.assert_close(torch.cat([p[i] for p in parts]), whole[i])
    assert not torch.equal(parts[0][0], parts[1][0])    # different windows on different ranks
