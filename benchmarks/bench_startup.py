"""Start-up: from process start to the first record processed, and where the time goes.

    python -m benchmarks.bench_startup [--runs 5]

Runs ``python -m detector replay --registry <sample registry> <one event>`` (the whole command: interpreter,
imports, the packaged AWS ranges, the registry, one record, the output) and reports the fastest wall
time; then, in a fresh process, the parts: imports of the replay path, loading the ranges, loading the
registry. Prints the wall time last (target <= 300 ms to first record).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import REPO, header, run_child
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    header("start-up to first record")
    registry = REPO / "detector" / "data" / "sample-world" / "registry.json"
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.jsonl"
        one.write_bytes(next(iter_events(1)) + b"\n")
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
    print(f"imports (cli, replay, core): {imports:.0f} ms; AWS ranges: {ranges:.0f} ms; registry: {reg:.0f} ms; "
          f"first record: {first:.1f} ms")  # fmt: skip
    print(f"start-up, process start to first record done: {min(walls) * 1000:.0f} ms (target <= 300 ms)")


if __name__ == "__main__":
    main()
