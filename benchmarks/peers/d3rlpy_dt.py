"""d3rlpy's Decision Transformer beside dt.py: training updates/s on the same generated
hopper/medium data, the same CPU and thread count, the official gym config for both (K=20,
d=128, 3 layers, 1 head, ReLU, dropout 0.1, batch 64, AdamW 1e-4 / weight decay 1e-4, warmup 10k,
clip 0.25, rewards / 1000, z-scored states); dt.py also with --bf16. The two alternate for
--rounds rounds; printed: the medians, and each round's ratio (neighbours in time, so the host's
drift cancels) with their median. FLOPs for MFU: benchmarks/bench_dt.py.

d3rlpy 2.8.1 pins gymnasium 1.0.0, so it lives in its own venv (torch first, as a CPU wheel, so
that pip never pulls a CUDA build):

    python -m venv /work/peer_venv_dt
    /work/peer_venv_dt/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /work/peer_venv_dt/bin/pip install d3rlpy==2.8.1 "gymnasium[mujoco]==1.0.0"
    python make_datasets.py --env hopper --dataset medium        # the 1M-transition data, once
    python benchmarks/peers/d3rlpy_dt.py --peer-python /work/peer_venv_dt/bin/python
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def rate(update, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        update()
    t = time.perf_counter()
    for _ in range(n):
        update()
    return n / (time.perf_counter() - t)


def d3rlpy_update(path: str):
    """-> update(): d3rlpy's own training step (sample_trajectory_batch + algo.update), as its
    fit() loop runs it, with the config of d3rlpy's DT reproduction script for hopper."""
    import d3rlpy
    from d3rlpy.algos.utility import build_scalers_with_trajectory_slicer

    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    dataset = d3rlpy.dataset.MDPDataset(
        observations=data["observations"], actions=data["actions"], rewards=data["rewards"],
        terminals=data["terminals"].astype(np.float32),
        timeouts=data["timeouts"].astype(np.float32))
    optim = d3rlpy.optimizers.AdamWFactory(
        weight_decay=1e-4, clip_grad_norm=0.25,
        lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=10_000))
    algo = d3rlpy.algos.DecisionTransformerConfig(
        batch_size=64, learning_rate=1e-4, context_size=20, max_timestep=1000, num_heads=1,
        num_layers=3, attn_dropout=0.1, resid_dropout=0.1, embed_dropout=0.1,
        activation_type="relu", optim_factory=optim,
        encoder_factory=d3rlpy.models.VectorEncoderFactory([128], exclude_last_activation=True),
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
        reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(0.001),
        position_encoding_type=d3rlpy.PositionEncodingType.SIMPLE).create(device=False)
    build_scalers_with_trajectory_slicer(algo, dataset)
    algo.build_with_dataset(dataset)

    def update():
        algo.update(dataset.sample_trajectory_batch(64, length=20))

    return update


def dt_update(path: str, bf16: bool):
    sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]
    import bench_dt

    import common
    import dt

    data = common.load_dataset("hopper", path=path, verbose=False)
    args = dt.check_args(dt.Args(bf16=bf16))  # K = 20 and the other defaults
    cpu = torch.device("cpu")
    return bench_dt.make_update(dt.TrajectoryData(data, args, cpu), args, cpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-python", default="/work/peer_venv_dt/bin/python",
                   help="python of the venv with d3rlpy 2.8.1")
    p.add_argument("--data", default=None, help="hopper/medium .npz (default: seqrl's cache)")
    p.add_argument("--updates", type=int, default=20, help="timed updates per measurement")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both")
    p.add_argument("--child", choices=["d3rlpy"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child:  # inside the peer venv: print d3rlpy's rate
        print(json.dumps(dict(rate=rate(d3rlpy_update(a.data), a.updates))))
        return
    if a.data is None:
        sys.path.insert(0, str(HERE.parent.parent))
        import common
        a.data = str(common.dataset_path("hopper", "medium"))
    if not Path(a.data).exists():
        sys.exit(f"{a.data} is missing: python make_datasets.py --env hopper --dataset medium")
    ours = {False: dt_update(a.data, False), True: dt_update(a.data, True)}
    rates = {"dt.py fp32": [], "dt.py bf16": [], "d3rlpy fp32": []}
    for _ in range(a.rounds):
        rates["dt.py fp32"].append(rate(ours[False], a.updates))
        child = subprocess.run([a.peer_python, __file__, "--child", "d3rlpy", "--data", a.data,
                                "--updates", str(a.updates), "--threads", str(a.threads)],
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"d3rlpy failed (install lines: --help):\n{child.stderr[-3000:]}")
        rates["d3rlpy fp32"].append(json.loads(child.stdout.strip().splitlines()[-1])["rate"])
        rates["dt.py bf16"].append(rate(ours[True], a.updates))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"hopper/medium {a.data}, batch 64, K=20, d=128, 3 layers, {a.threads} threads, "
          f"{a.updates} updates x {a.rounds} rounds")
    for k, v in rates.items():
        print(f"  {k:12s} {med[k]:6.2f} updates/s  (rounds: {', '.join(f'{x:.2f}' for x in v)})")
    for k in ("dt.py fp32", "dt.py bf16"):  # paired by round: robust to the host's drift
        r = [a / b for a, b in zip(rates[k], rates["d3rlpy fp32"])]
        print(f"  ratio {k} / d3rlpy: {statistics.median(r):.2f}x median of rounds "
              f"({', '.join(f'{x:.2f}' for x in r)}); "
              f"of medians {med[k] / med['d3rlpy fp32']:.2f}x")


if __name__ == "__main__":
    main()
