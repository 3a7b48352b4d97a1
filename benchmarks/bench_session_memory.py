"""Memory per indexed session: peak RSS of a replay over N sessions against the same over 10,000.

    python -m benchmarks.bench_session_memory [--sessions 1000000] [--small 10000]

Each run is ``python -m detector replay -`` in its own process, fed on standard input by this one from
the seeded generator (``eventgen.session_events``: one or two events per session — its own public
address, learnt on first use, and for about a third also a VPC endpoint of its account — each session
with its own instance and access key). Peak RSS is the child's own (``os.wait4``). Prints both peaks and,
last, ``(peak_N - peak_small) / (N - small)`` in bytes per session (target <= 200, hard limit 400).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

from ._common import REPO, header
from .eventgen import session_events


def replay_rss(sessions: int, seed: int) -> tuple[int, str]:
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
    for line in session_events(sessions, seed):
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
    return usage.ru_maxrss * 1024, b"".join(err).decode().strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    header("memory per indexed session")
    small, small_summary = replay_rss(args.small, args.seed)
    print(f"{args.small:>9,} sessions: peak RSS {small / 2**20:7.1f} MiB  {small_summary}")
    big, big_summary = replay_rss(args.sessions, args.seed)
    print(f"{args.sessions:>9,} sessions: peak RSS {big / 2**20:7.1f} MiB  {big_summary}")
    per = (big - small) / (args.sessions - args.small)
    print(f"memory per session: {per:.0f} bytes/session (target <= 200, hard limit 400)")


if __name__ == "__main__":
    main()
