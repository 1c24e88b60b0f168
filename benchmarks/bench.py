"""seqrl benchmark harness: speed and quality measurements, side by side in one process.

Every `benchmarks/bench_*.py` module defines `ROWS = {"name": fn}`; `fn(quick: bool)` returns
a list of result dicts with keys `row`, `metric`, `value`, `unit` and optional `setting` /
`notes`. Timings are medians over repeats (see `median_time`). Results print as a markdown
table and are written to `benchmarks/results/{name}.json`.

    python benchmarks/bench.py                 # every row (long)
    python benchmarks/bench.py --only evaluation --quick
    python benchmarks/bench.py --table         # reprint all saved results
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def all_rows() -> dict:
    rows = {}
    for file in sorted(HERE.glob("bench_*.py")):
        mod = importlib.import_module(file.stem)
        for name, fn in getattr(mod, "ROWS", {}).items():
            rows[name] = fn
    return rows


def table(results: list) -> str:
    lines = ["| row | metric | value | unit | setting | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        v = r["value"]
        if isinstance(v, float):
            v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        lines.append(f"| {r['row']} | {r['metric']} | {v} | {r.get('unit', '')} | "
                     f"{r.get('setting', '')} | {r.get('notes', '')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these rows (names or substrings)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (a smoke check of the harness)")
    p.add_argument("--table", action="store_true", help="print every saved result and exit")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    a = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if a.table:
        saved = []
        for f in sorted(RESULTS.glob("*.json")):
            saved += json.loads(f.read_text())["results"]
        print(table(saved))
        return
    rows = all_rows()
    if a.list:
        print("\n".join(rows))
        return
    chosen = {n: f for n, f in rows.items() if a.only is None or any(o in n for o in a.only)}
    if not chosen:
        raise SystemExit(f"no row matches {a.only}; rows: {', '.join(rows)}")
    out = []
    for name, fn in chosen.items():
        print(f"[bench] {name} ...", flush=True)
        res = fn(a.quick)
        out += res
        if not a.quick:  # quick runs are smoke checks: never overwrite real measurements
            payload = dict(row=name, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M"),
                           results=res)
            tmp = RESULTS / f"{name}.json.tmp"
            tmp.write_text(json.dumps(payload, indent=2))
            os.replace(tmp, RESULTS / f"{name}.json")
    print(f"\nmachine: {machine()}\n")
    print(table(out))


if __name__ == "__main__":
    main()
