"""When finding states go out, and which input offsets they pin (SPEC §9, at least once).

Pure bookkeeping, no I/O: the service asks it what to publish and how far each input partition may be
committed. A new finding group goes out with the batch that opened it; later states of a group go out
at most every ``update_seconds`` (the first change after a quiet period goes out at once) and on
shutdown. A change that is held back pins the lowest input offset that contributed to it, so that
offset is not committed until the change is published and acknowledged: a crash may repeat an update,
never lose one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from ..core.engine import FindingChange
from ..core.state import FindingGroup


class FindingPublisher:
    def __init__(self, update_seconds: float) -> None:
        self.update_seconds = update_seconds
        self.last_published: dict[str, float] = {}  # finding id -> wall time of the last publish
        self.pending: dict[str, tuple[FindingGroup, dict[Hashable, int]]] = {}  # held-back changes
        self.due: dict[str, FindingGroup] = {}  # to publish with the current batch
        self.fresh: set[str] = set()  # groups opened since their last publish: their next state is a creation

    def observe(self, change: FindingChange, partition: Hashable, offset: int, now: float) -> None:
        """Account for one change caused by the input at ``(partition, offset)``."""
        group = change.group
        gid = group.id
        if change.new:
            self.fresh.add(gid)
        if gid in self.due:
            return  # already going out with this batch, in its latest state
        last = self.last_published.get(gid)
        if change.new or last is None or now - last >= self.update_seconds:
            self.due[gid] = group
            self.pending.pop(gid, None)
            return
        entry = self.pending.get(gid)
        if entry is None:
            self.pending[gid] = (group, {partition: offset})
        else:
            pinned = entry[1].get(partition)
            if pinned is None or offset < pinned:
                entry[1][partition] = offset  # the lowest contributing offset pins the commit

    def take_due(self, now: float, flush_all: bool = False) -> list[FindingGroup]:
        """Groups to publish now: this batch's, held-back ones whose interval has passed, or all."""
        for gid, (group, _) in list(self.pending.items()):
            if flush_all or now - self.last_published.get(gid, 0.0) >= self.update_seconds:
                self.due[gid] = group
                del self.pending[gid]
        due = list(self.due.values())
        self.due = {}
        return due

    def published(self, groups: Iterable[FindingGroup], now: float) -> None:
        for group in groups:
            self.last_published[group.id] = now
            self.fresh.discard(group.id)

    def commit_bound(self, partition: Hashable, processed: int) -> int:
        """Highest offset (exclusive) of ``partition`` that may be committed."""
        bound = processed
        for _, offsets in self.pending.values():
            pinned = offsets.get(partition)
            if pinned is not None and pinned < bound:
                bound = pinned
        return bound

    def forget(self, gids: Iterable[str]) -> None:
        for gid in gids:
            self.last_published.pop(gid, None)
            self.pending.pop(gid, None)
            self.due.pop(gid, None)
            self.fresh.discard(gid)
