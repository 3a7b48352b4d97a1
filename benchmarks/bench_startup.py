"""Start-up: from process start to the first record processed, and where the time goes.

    python -m benchmarks.bench_startup [--runs 5] [--seed N ...] [--shape NAME ...]

For every (seed, shape) — by default seed 7 over ``default`` and ``fleet-5000`` — runs ``python -m detector
replay --registry <sample registry> <the shape's first event>`` (the whole command: interpreter, imports,
the packaged AWS ranges, the registry, one record, the output) and reports the fastest wall time; then, in
a fresh process, the parts: imports of the replay path, loading the ranges, loading the registry. Prints
one line per case, every case again, and the worst wall time last (target <= 300 ms to first record).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import REPO, Worst, add_case_arguments, cases, header, run_child
from .eventgen import iter_events

PARTS = """
import sys, time
t0 = time.perf_counter()
import detector.cli
from detector.replay import Replayer
from detector.core.engine import Engine
from detector.core.state import DetectorState
t1 = time.perf_counter()
from detector.ipranges import load
ranges = load()[0]
t2 = time.perf_counter()
from detector.registry import load_registry
registry = load_registry(sys.argv[1])
t3 = time.perf_counter()
Replayer(Engine(registry, ranges), DetectorState()).run([sys.argv[2]])
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def one_case(args: argparse.Namespace, seed: int, shape: str) -> tuple[float, str]:
    registry = REPO / "detector" / "data" / "sample-world" / "registry.json"
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.jsonl"
        one.write_bytes(next(iter_events(1, seed, shape=shape)) + b"\n")
        walls = []
        for _ in range(args.runs):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "detector", "replay", "--registry", str(registry), str(one)],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            walls.append(time.perf_counter() - started)
        parts = [run_child(PARTS, str(registry), str(one))[0].split() for _ in range(args.runs)]
    imports, ranges, reg, first = (min(float(p[i]) for p in parts) * 1000 for i in range(4))
    return min(walls) * 1000, (f"imports (cli, replay, core) {imports:.0f} ms; AWS ranges {ranges:.0f} ms; "
                               f"registry {reg:.0f} ms; first record {first:.1f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    add_case_arguments(parser, seeds=(7,), shapes=("default", "fleet-5000"))
    args = parser.parse_args(argv)
    header("start-up to first record")
    worst = Worst("start-up, process start to first record done", unit="ms", higher_is_better=False, digits=0)
    for seed, shape in cases(args):
        wall, detail = one_case(args, seed, shape)
        worst.add(seed, shape, wall, detail, target="<= 300 ms")
    worst.report()


if __name__ == "__main__":
    main()
