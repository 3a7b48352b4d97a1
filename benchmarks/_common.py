"""Shared helpers of the benchmark scripts: machine description, child processes, printing."""

from __future__ import annotations

import json
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
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    print(f"load average at start: {load()}" + (" (above the CPU count: other work shares the machine)" if busy else ""))


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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


def detector_replay(path: Path, jobs: int | None = None) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``python -m detector replay path`` from process start to exit, and its summary."""
    command = [PYTHON, "-m", "detector", "replay", "--output", os.devnull, str(path)]
    if jobs is not None:
        command[4:4] = ["--jobs", str(jobs)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"detector replay failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return wall, json.loads(done.stderr.decode().strip().splitlines()[-1])["summary"]


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


# --- seeds x shapes: every figure on several streams, the worst kept in view (issue 11) -------------------


def add_case_arguments(parser: Any, seeds: tuple[int, ...], shapes: tuple[str, ...]) -> None:
    """``--seed`` and ``--shape``, each repeatable; without them the script runs ``seeds`` x ``shapes``."""
    from .eventgen import SHAPES

    parser.add_argument(
        "--seed", type=int, action="append", dest="seeds", metavar="N",
        help=f"seed of the generated stream; repeatable (default: {', '.join(map(str, seeds))})",
    )  # fmt: skip
    parser.add_argument(
        "--shape", action="append", dest="shapes", choices=sorted(SHAPES), metavar="NAME",
        help=f"kind of stream ({', '.join(SHAPES)}; see benchmarks/README.md); repeatable "
        f"(default: {', '.join(shapes)})",
    )  # fmt: skip
    parser.set_defaults(default_seeds=seeds, default_shapes=shapes)


def cases(args: Any) -> list[tuple[int, str]]:
    """The (seed, shape) pairs to run: the flags' if given, else the script's defaults."""
    seeds = args.seeds or list(args.default_seeds)
    shapes = args.shapes or list(args.default_shapes)
    return [(seed, shape) for shape in shapes for seed in seeds]


class Worst:
    """One printed line per (seed, shape); :meth:`report` prints every case again and the worst last."""

    def __init__(self, figure: str, unit: str = "x", higher_is_better: bool = True, digits: int = 2) -> None:
        self.figure = figure
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.digits = digits
        self.rows: list[tuple[float, int, str, str]] = []

    def fmt(self, value: float) -> str:
        return f"{value:,.{self.digits}f}{'' if self.unit == 'x' else ' '}{self.unit}"

    def add(self, seed: int, shape: str, value: float, detail: str = "", target: str = "") -> None:
        self.rows.append((value, seed, shape, target))
        extra = f" ({detail})" if detail else ""
        aim = f" [target {target}]" if target else ""
        print(f"= seed {seed} / {shape}: {self.figure} {self.fmt(value)}{extra}{aim}", flush=True)

    def report(self) -> None:
        if not self.rows:
            raise SystemExit("no case ran")
        print(f"--- {self.figure}, every case:")
        for value, seed, shape, target in self.rows:
            print(f"  seed {seed:<4} {shape:<12} {self.fmt(value):>14}  {f'target {target}' if target else ''}")
        pick = min if self.higher_is_better else max
        value, seed, shape, target = pick(self.rows, key=lambda r: r[0])
        aim = f" (target {target})" if target else ""
        print(f"WORST {self.figure}: {self.fmt(value)} on seed {seed} / {shape}, of {len(self.rows)} cases{aim}")
