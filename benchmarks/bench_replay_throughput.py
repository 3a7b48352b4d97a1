"""Replay throughput against a process that only reads the same file and ``orjson.loads`` every line.

    python -m benchmarks.bench_replay_throughput [--events 200000] [--runs 3] [--seed 7] [--instances N]

Generates a seeded, realistic EventBridge JSON Lines stream (``benchmarks/eventgen.py``: ~1.4-1.5 KB
per event, ~40% EC2 instance-role sessions over many instances, credential issuance, other identities,
attacks, escaped policy documents, malformed lines), then runs, each in its own process and timed
inside it (start-up excluded: see ``bench_startup``):

- the baseline: ``for line in file: orjson.loads(line)``;
- the detector: ``Replayer.run([file])`` with the packaged AWS ranges, as ``detector replay`` runs it:
  in one process (``--jobs 1``), and split (``--jobs 2``, the default on a machine with two CPUs or
  more: a forked scanner decodes and sorts every line while the first process applies the ones that
  may matter; wall time, with the CPU seconds of both processes also printed).

Prints all three, and the ratios last (baseline seconds / detector seconds; the target is >= 2.0).
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
import json, resource, sys, time
from detector.core.engine import Engine
from detector.core.state import DetectorState
from detector.ipranges import load
from detector.replay import Replayer
def cpu():  # CPU seconds of this process and of its waited-for children (the split replay's scanner)
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
replayer = Replayer(Engine(aws_ranges=load()[0]), DetectorState(), jobs=int(sys.argv[2]))
c, t = cpu(), time.perf_counter()
summary = replayer.run([sys.argv[1]])
print(time.perf_counter() - t, cpu() - c, json.dumps(summary.as_dict()))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each; the fastest counts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--instances", type=int, default=None,
        help="distinct EC2 instances in the stream (default: events / 100, i.e. ~40 calls per session); "
        "more instances mean more first-seen sessions and addresses, the engine's costly case",
    )  # fmt: skip
    args = parser.parse_args(argv)
    header("replay throughput")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        lines, size = write_stream(path, iter_events(args.events, args.seed, instances=args.instances))
        print(f"input: {lines} events, {size / lines:.0f} bytes/event, {size / 1e6:.0f} MB")

        def baseline() -> tuple[float, str]:
            out, _, _ = run_child(BASELINE, str(path))
            seconds, n = out.split()
            return float(seconds), n

        def detector(jobs: int) -> tuple[float, float, dict]:
            out, _, _ = run_child(DETECTOR, str(path), str(jobs))
            seconds, cpu, summary = out.split(" ", 2)
            return float(seconds), float(cpu), json.loads(summary)

        base_s, _ = best_of(args.runs, baseline)
        one_s, one_cpu, summary = best_of(args.runs, lambda: detector(1))
        two_s, two_cpu, summary2 = best_of(args.runs, lambda: detector(2))
    assert summary == summary2, "the split replay must count exactly what the one-process replay counts"
    print(f"baseline (read + orjson.loads every line, one process): {base_s:.3f} s, {lines / base_s:,.0f} events/s")
    print(
        f"detector, one process (--jobs 1): {one_s:.3f} s, {lines / one_s:,.0f} events/s, {one_cpu:.2f} CPU s — "
        f"{summary['records']} records, {summary['instance_records']} instance records, "
        f"{summary['malformed']} malformed, {summary['findings']} findings"
    )
    print(f"detector, split (--jobs 2, the default on 2+ CPUs): {two_s:.3f} s, {lines / two_s:,.0f} events/s, {two_cpu:.2f} CPU s")
    print(f"ratio, one process (baseline time / detector time): {base_s / one_s:.2f}x")
    print(f"ratio, split (baseline time / detector time): {base_s / two_s:.2f}x (target >= 2.0x)")


if __name__ == "__main__":
    main()
