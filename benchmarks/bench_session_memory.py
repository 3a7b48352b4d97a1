"""Memory per indexed session: peak RSS of a replay over N sessions against the same over 10,000.

    python -m benchmarks.bench_session_memory [--sessions 1000000] [--small 10000] [--seed N ...] [--shape NAME ...]

Each run is ``python -m detector replay -`` in its own process, fed on standard input by this one from
the seeded generator (``eventgen.session_events``: one or two events per session — its own public
address, learnt on first use, and for about a third also a VPC endpoint of its account — each session
with its own instance and access key; the fleet shapes add, in their proportions, ``aws:ec2-instance``
sessions, credential rotations by issuance records, lifecycle operations and decoy records). Peak RSS is
the child's own (``os.wait4``). For every (seed, shape) — by default seeds 11 and 29 over ``default`` and
``fleet-5000`` (``fleet-500`` makes the same session stream: every session has its own instance) — prints
``(peak_N - peak_small) / (N - small)`` in bytes per session (issue 11: target <= 200, goal 150), every
case again, and the worst last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

from ._common import REPO, Worst, add_case_arguments, cases, header
from .eventgen import session_events


def replay_rss(sessions: int, seed: int, shape: str) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "detector", "replay", "--max-sessions", str(sessions + 10),
         "--session-ttl", str(30 * 86400), "-"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))  # type: ignore[union-attr]
    reader.start()
    buffer: list[bytes] = []
    for line in session_events(sessions, seed, shape):
        buffer.append(line)
        if len(buffer) >= 2000:
            proc.stdin.write(b"\n".join(buffer) + b"\n")
            buffer.clear()
    proc.stdin.write(b"\n".join(buffer) + b"\n")
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    reader.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"replay failed: {b''.join(err).decode()[-2000:]}")
    summary = json.loads(b"".join(err).decode().strip().splitlines()[-1])["summary"]
    return usage.ru_maxrss * 1024, f"{summary['records']:,} records, {summary['instance_records']:,} instance records"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    add_case_arguments(parser, seeds=(11, 29), shapes=("default", "fleet-5000"))
    args = parser.parse_args(argv)
    header("memory per indexed session")
    worst = Worst("index memory per session", unit="B/session", higher_is_better=False, digits=0)
    for seed, shape in cases(args):
        small, small_summary = replay_rss(args.small, seed, shape)
        big, big_summary = replay_rss(args.sessions, seed, shape)
        per = (big - small) / (args.sessions - args.small)
        detail = (f"peak RSS {small / 2**20:.1f} MiB at {args.small:,} sessions, {big / 2**20:.1f} MiB at "
                  f"{args.sessions:,}; {big_summary}")  # fmt: skip
        worst.add(seed, shape, per, detail, target="<= 200 (goal 150)")
    worst.report()


if __name__ == "__main__":
    main()
