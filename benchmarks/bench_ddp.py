"""Benchmarks of torchrun data parallelism (DistributedDataParallel, gloo on the CPU): training
updates per second of gato_tokens.py and dt.py in 1 process (plain python) and in 2 (`python -m
torch.distributed.run --standalone --nproc_per_node=2`), side by side in one run on one machine.

Every process has one thread (OMP_NUM_THREADS=1) and the same per-process batch, so 2 processes
train on twice the samples per update (`--batch-size` is per process). Each configuration runs
at two lengths, N and 3N updates, as subprocesses in a temp folder on a small generated hopper
dataset (the tests' tiny_dataset recipe), with the smallest evaluation (1 episode of 3 steps,
once, at the last update); startup (imports, data, process group) and that final evaluation and
checkpoint cancel out of (3N - N) / (t(3N) - t(N)) updates/s. Repeats are interleaved (1 and 2
processes alternate) and each length's time is the median over them. Scaling efficiency is
samples/s with 2 processes / (2 x samples/s with 1); 1.0 is perfect.

On a 2-core CPU the scaling is bounded by the cores (torchrun's agent and the OS share them) and
by gloo's all-reduce of the gradients; the code path (one DDP process per device, a gradient
all-reduce per update) is the one a GPU cluster runs with NCCL, where it scales further.

    python benchmarks/bench.py --only ddp            # both rows, saved to results/
    python benchmarks/bench_ddp.py --quick           # print only (about 1 minute per file)
    python benchmarks/bench_ddp.py --only gato_tokens
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too

import common
from bench import machine, table

ROOT = Path(__file__).resolve().parents[1]
# a small but not trivial model per file; --batch-size is per process
FLAGS = {
    "gato_tokens.py": ["--n-layer", "2", "--n-embd", "128", "--n-head", "4", "--seq-len", "300",
                       "--vocab", "action", "--batch-size", "16", "--dropout", "0.0",
                       "--filter-frac", "0.0", "--lr", "1e-3", "--warmup-steps", "1"],
    "dt.py": ["--embed-dim", "128", "--n-layer", "3", "--context-len", "20",
              "--batch-size", "64"],
}
SAMPLE = {"gato_tokens.py": "300-token sequences", "dt.py": "20-step windows"}
EVAL = ["--eval-episodes", "1", "--eval-max-steps", "3", "--eval-every", str(10**9)]
DATA = dict(env="hopper", dataset="medium", size=10_000, seed=0, budget=20_000)  # ARS, seconds


def make_data(folder: Path) -> Path:
    """A small generated hopper-medium .npz (as tests/conftest.py's tiny_dataset), written under
    `folder` through SEQRL_DATA_DIR so that the user's dataset cache is never touched."""
    old = os.environ.get("SEQRL_DATA_DIR")
    os.environ["SEQRL_DATA_DIR"] = str(folder)
    try:
        data = common.load_dataset(verbose=False, **DATA)
    finally:
        if old is None:
            os.environ.pop("SEQRL_DATA_DIR")
        else:
            os.environ["SEQRL_DATA_DIR"] = old
    path = folder / "hopper-medium-small.npz"
    common.save_npz(path, data)
    return path


def run_seconds(file: str, nproc: int, steps: int, data: Path, cwd: Path) -> float:
    """Wall-clock seconds of one training run of `steps` updates in a fresh folder `cwd`;
    checks that it wrote one run folder whose checkpoint holds `nproc` ranks."""
    cmd = [sys.executable, str(ROOT / file)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["--env", "hopper", "--no-cuda", "--dataset-path", str(data),
            "--total-steps", str(steps)] + EVAL + FLAGS[file]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               SEQRL_DATA_DIR=str(data.parent))
    cwd.mkdir(parents=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])}\nexited with {out.returncode}:\n"
                           f"{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
    runs = list((cwd / "runs").iterdir())
    if len(runs) != 1:
        raise RuntimeError(f"{file} x {nproc}: {len(runs)} run folders, not one (rank 0's)")
    ckpt = common.load_checkpoint(runs[0] / "checkpoint.pt", file[:-3])
    ranks = len(ckpt.get("ranks", [None]))
    if ckpt["step"] != steps or ranks != nproc:
        raise RuntimeError(f"{file} x {nproc}: checkpoint at step {ckpt['step']} with {ranks} "
                           f"ranks, expected step {steps} with {nproc}")
    print(f"[ddp] {file} {nproc} process{'es' if nproc > 1 else ''}, {steps} updates: "
          f"{seconds:.1f} s", flush=True)
    return seconds


def scaling(file: str, quick: bool) -> list:
    """Updates/s and samples/s in 1 and 2 processes, and the scaling efficiency."""
    n, repeats = (10, 1) if quick else (40, 3)
    times = {(p, s): [] for p in (1, 2) for s in (n, 3 * n)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        for r in range(repeats):
            for p, s in times:  # interleaved: load drift hits both process counts alike
                times[p, s].append(run_seconds(file, p, s, data, tmp / f"{p}x{s}_{r}"))
    med = {k: statistics.median(v) for k, v in times.items()}
    ups = {p: 2 * n / (med[p, 3 * n] - med[p, n]) for p in (1, 2)}
    startup = {p: med[p, n] - n / ups[p] for p in (1, 2)}
    batch = int(FLAGS[file][FLAGS[file].index("--batch-size") + 1])
    sps = {p: ups[p] * batch * p for p in (1, 2)}
    eff = sps[2] / (2 * sps[1])
    row = f"ddp_{file[:-3]}"
    setting = (f"{' '.join(FLAGS[file])} (per process); 1 thread per process, gloo, "
               f"{os.cpu_count()} cores; ({3 * n} - {n}) updates, median of {repeats}")
    out = []
    for p in (1, 2):
        name = f"{p} process{'es' if p > 1 else ''}"
        out += [dict(row=row, metric=f"{name}: updates", value=ups[p], unit="updates/s",
                     setting=setting, notes=f"global batch {batch * p}; startup, final eval "
                     f"and checkpoint {startup[p]:.1f} s (not counted)"),
                dict(row=row, metric=f"{name}: samples", value=sps[p], unit="samples/s",
                     setting=setting, notes=SAMPLE[file])]
    out.append(dict(row=row, metric="scaling efficiency", value=eff, unit="",
                    setting=setting, notes="samples/s(2) / (2 x samples/s(1)); 2 cores, gloo"))
    return out


ROWS = {"ddp_gato_tokens": lambda quick: scaling("gato_tokens.py", quick),
        "ddp_dt": lambda quick: scaling("dt.py", quick)}


if __name__ == "__main__":  # prints only; `bench.py --only ddp` also saves the results
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 10 updates, one repeat")
    p.add_argument("--only", nargs="+", default=["gato_tokens", "dt"],
                   help="gato_tokens and/or dt")
    a = p.parse_args()
    results = []
    for name, fn in ROWS.items():
        if any(o in name for o in a.only):
            try:
                results += fn(a.quick)
            except RuntimeError as e:  # one file failing does not lose the other's row
                print(f"[ddp] {name} failed: {e}", flush=True)
    print(f"\nmachine: {machine()}\n")
    print(table(results))
