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
from typing import TypeVar

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
    if isinstance(record, dict):
        value = record.get("eventTime")
        if isinstance(value, str):
            return value
    return ""
