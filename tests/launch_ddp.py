"""Start a seqrl script under torchrun (CPU, gloo) or plain python, for the data-parallel tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, args: list, cwd, nproc: int) -> Path:
    """`script` under torchrun with `nproc` processes (0: plain python), 1 thread per process,
    in folder `cwd` -> its run folder, checked to be the only one (rank 0 alone makes it)."""
    cmd = [sys.executable, str(ROOT / script)]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = list((Path(cwd) / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]
