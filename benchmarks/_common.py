"""Shared helpers of the benchmark scripts: machine description, child processes, printing."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"machine: {machine()}")


def run_child(code: str, *args: str, stdin: Any = None) -> tuple[str, float, int]:
    """Run ``python -c code args``; return (stdout, wall seconds, peak RSS in bytes) of that child alone."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [PYTHON, "-c", code, *args], stdout=subprocess.PIPE, stdin=stdin, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"child failed with {proc.returncode}: {code[:80]!r}")
    return out.decode(), wall, usage.ru_maxrss * 1024


def best_of(n: int, fn: Any) -> Any:
    """The run with the smallest first element (seconds) of ``n`` runs of ``fn()``."""
    return min((fn() for _ in range(n)), key=lambda r: r[0])


def run_async(main_async: Any, args: Any) -> None:
    """``asyncio.run(main_async(args))``, on uvloop when ``args.uvloop``."""
    import asyncio

    if getattr(args, "uvloop", False):
        import uvloop

        uvloop.install()
    asyncio.run(main_async(args))
