"""Replay throughput: ``detector replay FILE`` against a process that reads the file and ``orjson.loads``
every line, both timed as a user runs them.

    python -m benchmarks.bench_replay_throughput [--events 200000] [--runs 3] [--seed N ...] [--shape NAME ...]
                                                 [--instances N] [--jobs 1|2]

For every (seed, shape) — by default seeds 7 and 11 over the shapes ``default``, ``fleet-5000`` and
``fleet-500`` (``benchmarks/eventgen.py``: EventBridge JSON Lines of ~1.5 KB; the fleets with ~7%
credential issuance, decoys named like instances and lifecycle records) — generates the stream into a
file, then runs, each as a whole process from its start to its exit (wall time, interpreter start-up,
imports and the AWS ranges included, as a user sees it):

- the baseline: ``python -c 'for line in file: orjson.loads(line)'``;
- the detector: ``python -m detector replay FILE`` with its default settings (``--jobs`` is 2 on a
  machine with two CPUs or more), findings to ``/dev/null``.

Each is the fastest of ``--runs``. Prints one line per case with the ratio (baseline wall / detector
wall; issue 11's targets: >= 1.2x on 5,000 instances, >= 1.5x on 500, goal 2.0x), every case again, and
the worst case last.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ._common import Worst, add_case_arguments, best_of, cases, detector_replay, header, run_child
from .eventgen import iter_events, write_stream

BASELINE = """
import sys, orjson
loads = orjson.loads
n = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        try:
            loads(line)
        except orjson.JSONDecodeError:
            pass
        n += 1
print(n)
"""

TARGETS = {"fleet-5000": ">= 1.2x", "fleet-500": ">= 1.5x"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each; the fastest counts")
    parser.add_argument(
        "--instances", type=int, default=None,
        help="distinct EC2 instances in the stream (default: the shape's); more instances mean more "
        "first-seen sessions and addresses, the engine's costly case",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=None, help="pass --jobs to the replay "
                        "(default: none, i.e. the replay's default settings)")  # fmt: skip
    add_case_arguments(parser, seeds=(7, 11), shapes=("default", "fleet-5000", "fleet-500"))
    args = parser.parse_args(argv)
    header("replay throughput, whole processes as a user runs them (wall)")
    worst = Worst("replay / orjson.loads (baseline wall / detector wall)")
    for seed, shape in cases(args):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "events.jsonl"
            lines, size = write_stream(path, iter_events(args.events, seed, instances=args.instances, shape=shape))
            base_s = best_of(args.runs, lambda: run_child(BASELINE, str(path))[1:2])[0]
            det_s, summary = best_of(args.runs, lambda: detector_replay(path, args.jobs))
        detail = (
            f"{lines:,} events of {size / lines:.0f} B; baseline {base_s:.2f} s, {lines / base_s:,.0f}/s; detector "
            f"{det_s:.2f} s, {lines / det_s:,.0f}/s; {summary['instance_records']} instance records, "
            f"{summary['malformed']} malformed, {summary['skipped']} skipped, {summary['findings']} findings"
        )
        worst.add(seed, shape, base_s / det_s, detail, target=TARGETS.get(shape, ">= 2.0x (goal)"))
    worst.report()


if __name__ == "__main__":
    main()
