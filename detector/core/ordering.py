"""Order of application when one batch holds several partitions' records (pure).

Kafka orders records only within a partition. An EventBridge bridge that produces without keys
scatters one session's records over partitions, and a consumer catching up may fetch one partition's
whole backlog before another's: applied in fetch order, a session's later records could overtake its
earlier ones and trust on first use would learn the wrong address. So within a batch, runs (one per
source partition, each in its own order) are merged by ``eventTime``: a k-way merge, never a sort, so
the records of one partition — and so of one session when the input is keyed by session — keep
exactly their arrival order.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def merge_runs(runs: Iterable[Sequence[tuple[str, T]]]) -> list[T]:
    """Merge runs of ``(event_time, item)`` by event time; each run keeps its order; ties go to earlier runs.

    ``event_time`` is CloudTrail's ISO 8601 ``eventTime`` string (``YYYY-MM-DDTHH:MM:SSZ``), which sorts
    chronologically as text; a missing time is ``""`` and sorts first.
    """
    keyed = [[(t, r, i, item) for i, (t, item) in enumerate(run)] for r, run in enumerate(runs) if run]
    if len(keyed) == 1:
        return [entry[3] for entry in keyed[0]]
    return [entry[3] for entry in heapq.merge(*keyed)]


def event_time_key(record: object) -> str:
    """A record's ``eventTime`` string (a plain dict or the engine's record type), else ``""``."""
    value = record.get("eventTime") if isinstance(record, dict) else getattr(record, "eventTime", None)
    return value if isinstance(value, str) else ""


class Watermark:
    """How far in ``eventTime`` every source partition feeding one sessions partition has come.

    The detect stage holds fetched records so that a session's records routed late (another route
    instance lagging) join those routed early, in eventTime order. Holding every record a fixed window
    costs that window in latency; but a record can go as soon as every source still delivering has
    delivered something at least as new: Kafka keeps each source partition's order, so anything older
    it still has would have come first. ``mark`` is that time: the least of the newest ``eventTime``
    of each source heard from within ``idle`` seconds. A source silent longer is not waited for: the
    hold's window still bounds the wait for what it may yet send.
    """

    __slots__ = ("_sources",)

    def __init__(self, sources: Iterable[object] = (), now: float = 0.0) -> None:
        # source -> (newest eventTime, last heard). Sources known up front (the input partitions) are
        # waited for from the start, so a source not heard from yet is not overtaken either.
        self._sources: dict[object, tuple[str, float]] = {source: ("", now) for source in sources}

    def observe(self, source: object, event_time: str, now: float) -> None:
        seen = self._sources.get(source)
        self._sources[source] = (event_time if seen is None or event_time > seen[0] else seen[0], now)

    def mark(self, now: float, idle: float) -> str:
        """The eventTime every source heard from within ``idle`` seconds has reached ("" when none has)."""
        sources = self._sources
        for source in [s for s, (_, heard) in sources.items() if now - heard >= idle]:
            del sources[source]
        return min(newest for newest, _ in sources.values()) if sources else ""


def releasable(held: Sequence[tuple[float, str, Any]], mark: str, now: float, window: float) -> int:
    """How many of ``held`` — ``(arrival time, eventTime, ...)`` in offset order — may be applied now.

    Only a prefix (a partition's offsets are committed in order): the leading records at or before
    ``mark``, or held ``window`` seconds, but no record newer than one that stays held — a record routed
    late may sit behind one that must wait, and must not be overtaken by a newer one. Records held the
    window go regardless (as with a plain hold, a record later than that is applied late).
    """
    n = forced = 0
    for arrival, event_time, *_ in held:
        if now - arrival >= window:
            forced += 1
        elif event_time > mark:
            break
        n += 1
    if n == len(held):
        return n
    oldest_left = min(entry[1] for entry in held[n:])
    newest = [held[0][1]] * n  # newest[i]: the newest eventTime of held[: i + 1]
    for i in range(1, n):
        newest[i] = max(newest[i - 1], held[i][1])
    while n > forced and newest[n - 1] > oldest_left:
        n -= 1
        oldest_left = min(oldest_left, held[n][1])
    return n
