"""A one-line progress display for long replays, on a terminal only (standard error is a TTY).

A daemon thread redraws the line every ``interval`` seconds from counters the replay updates (inputs or
S3 objects and bytes done, records read); the totals, once known (every S3 listing done), give an ETA.
Nothing is written when standard error is not a terminal, so piped or redirected output stays clean.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    """What a replay has done and (once every S3 listing is done: ``listing_done``) how much there is.
    The replay thread counts what is done; the S3 listing thread adds to the totals under ``lock``."""

    objects_done: int = 0
    bytes_done: int = 0
    objects_total: int = 0
    bytes_total: int = 0
    listing_done: bool = False
    skipped_outside_layout: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(progress: Progress, records: int, elapsed: float) -> str:
    """``objects 3/10  bytes 1.2 MiB/4.0 MiB  records 12000  4000 events/s  ETA 0:02``."""
    known = progress.listing_done
    objects = f"{progress.objects_done}/{progress.objects_total if known else '?'}"
    size = _size(progress.bytes_done) + (f"/{_size(progress.bytes_total)}" if known else "")
    rate = records / elapsed if elapsed > 0 else 0.0
    line = f"objects {objects}  bytes {size}  records {records}  {rate:,.0f} events/s"
    if known and progress.bytes_total and progress.bytes_done and elapsed > 0:
        left = max(0, progress.bytes_total - progress.bytes_done) * elapsed / progress.bytes_done
        line += f"  ETA {_duration(left)}"
    return line


class ProgressDisplay:
    """Redraws :func:`progress_line` in place on ``stream`` until :meth:`stop` (which leaves the last line)."""

    def __init__(self, progress: Progress, records: Callable[[], int], stream: TextIO, interval: float = 0.5) -> None:
        self.progress = progress
        self.records = records
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detector-progress", daemon=True)

    def start(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def _draw(self) -> None:
        line = progress_line(self.progress, self.records(), time.monotonic() - self.started)
        self.stream.write(f"\r\x1b[K{line}")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._draw()
        self.stream.write("\n")
        self.stream.flush()
