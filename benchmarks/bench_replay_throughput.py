"""Replay throughput against a process that only reads the same file and ``orjson.loads`` every line.

    python -m benchmarks.bench_replay_throughput [--events 200000] [--runs 3]

Generates a seeded, realistic EventBridge JSON Lines stream (``benchmarks/eventgen.py``: ~1.4-1.5 KB
per event, ~40% EC2 instance-role sessions over many instances, credential issuance, other identities,
attacks, escaped policy documents, malformed lines), then runs, each in its own process and timed
inside it (start-up excluded: see ``bench_startup``):

- the baseline: ``for line in file: orjson.loads(line)``;
- the detector: ``Replayer.run([file])`` with the packaged AWS ranges, as ``detector replay`` runs it.

Prints both, and the ratio last (baseline seconds / detector seconds; the target is >= 2.0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ._common import best_of, header, run_child
from .eventgen import iter_events, write_stream

BASELINE = """
import sys, time, orjson
loads = orjson.loads
t = time.perf_counter()
n = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        try:
            loads(line)
        except orjson.JSONDecodeError:
            pass
        n += 1
print(time.perf_counter() - t, n)
"""

DETECTOR = """
import json, sys, time
from detector.core.engine import Engine
from detector.core.state import DetectorState
from detector.ipranges import load
from detector.replay import Replayer
replayer = Replayer(Engine(aws_ranges=load()[0]), DetectorState())
t = time.perf_counter()
summary = replayer.run([sys.argv[1]])
print(time.perf_counter() - t, json.dumps(summary.as_dict()))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each; the fastest counts")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    header("replay throughput")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        lines, size = write_stream(path, iter_events(args.events, args.seed))
        print(f"input: {lines} events, {size / lines:.0f} bytes/event, {size / 1e6:.0f} MB")

        def baseline() -> tuple[float, str]:
            out, _, _ = run_child(BASELINE, str(path))
            seconds, n = out.split()
            return float(seconds), n

        def detector() -> tuple[float, dict]:
            out, _, _ = run_child(DETECTOR, str(path))
            seconds, summary = out.split(" ", 1)
            return float(seconds), json.loads(summary)

        base_s, _ = best_of(args.runs, baseline)
        det_s, summary = best_of(args.runs, detector)
    print(f"baseline (read + orjson.loads every line): {base_s:.3f} s, {lines / base_s:,.0f} events/s")
    print(
        f"detector (Replayer.run): {det_s:.3f} s, {lines / det_s:,.0f} events/s — "
        f"{summary['records']} records, {summary['instance_records']} instance records, "
        f"{summary['malformed']} malformed, {summary['findings']} findings"
    )
    print(f"ratio (baseline time / detector time): {base_s / det_s:.2f}x (target >= 2.0x)")


if __name__ == "__main__":
    main()
