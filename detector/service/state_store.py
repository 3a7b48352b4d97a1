"""The detect stage's state store: a ``DetectorState`` per assigned partition, restored from the compacted
changelog on assignment (skipping changes made by input never committed), kept in standby across an eager
rebalance that gives the partition back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from ..core import changelog
from ..core.state import DetectorState
from .kafka_config import kafka_common_kwargs, transactions_enabled
from .settings import Settings
from .stage import _label

log = structlog.get_logger("detector.service")


class StateStore:
    """The restore and standby half of :class:`~detector.service.detect.DetectStage` (a mixin over its
    ``states``, ``restoring``, ``standby`` and consumer)."""

    def added(self, assigned: set[TopicPartition]) -> None:
        assert self.consumer is not None
        mine = {tp.partition for tp in self.assigned}
        for partition in [p for p in self.standby if p not in mine]:
            del self.standby[partition]  # moved to another member for good
        fresh = [tp for tp in assigned if tp.partition not in self.states and tp.partition not in self.restoring]
        if not fresh:
            return
        self.consumer.pause(*fresh)
        for tp in fresh:
            self.restoring[tp.partition] = asyncio.create_task(self.restore(tp), name=f"restore-{tp.partition}")
        self.service.metrics.restoring_partitions.set(len(self.restoring))

    def dropped(self, revoked: set[TopicPartition]) -> None:
        gids = []
        for tp in revoked:
            self.batch_starts.pop(tp, None)
            self.interval_starts.pop(tp, None)
            self.held.pop(tp, None)  # never applied nor committed: the next owner consumes them
            self.watermarks.pop(tp, None)
            task = self.restoring.pop(tp.partition, None)
            if task is not None:
                task.cancel()
            state = self.states.pop(tp.partition, None)
            if state is not None:
                gids.extend(state.groups)
                committed = self.committed.get(tp)
                if committed is not None and self.processed.get(tp, committed) == committed:
                    # Eager rebalancing revokes everything, then assigns most of it back: keep the state
                    # so that an unchanged assignment does not restore from the changelog again.
                    self.standby[tp.partition] = (state, committed)
        self.service.publisher.forget(gids)
        self.service.metrics.restoring_partitions.set(len(self.restoring))

    async def restore(self, tp: TopicPartition) -> None:
        """Rebuild partition ``tp``'s state from its changelog partition, then resume it."""
        service = self.service
        started = time.monotonic()
        partition = tp.partition
        try:
            assert self.consumer is not None
            committed = await self.consumer.committed(tp) or 0
            kept = self.standby.pop(partition, None)
            if kept is not None and kept[1] == committed:  # nobody else consumed it since we let it go
                state, restored, skipped = kept[0], 0, 0
            else:
                state = self.new_state()
                restored, skipped = await restore_partition(
                    service.settings, partition, committed, state, on_batch=service.metrics.restored_records.inc
                )
            self.states[partition] = state
            self.committed.setdefault(tp, committed)
        except asyncio.CancelledError:
            log.info("restore_cancelled", partition=_label(tp))
            raise
        finally:
            if self.restoring.get(partition) is asyncio.current_task():
                del self.restoring[partition]
            service.metrics.restoring_partitions.set(len(self.restoring))
        elapsed = time.monotonic() - started
        service.metrics.restore_seconds.observe(elapsed)
        if tp in self.assigned and self.consumer is not None:
            self.consumer.resume(tp)
        service.partitions_changed()
        log.info(
            "state_restored",
            partition=_label(tp),
            sessions=len(state.sessions),
            findings=len(state.groups),
            changelog_records=restored,
            skipped_uncommitted=skipped,
            kept_in_memory=kept is not None and state is kept[0],
            committed_offset=committed,
            seconds=round(elapsed, 3),
        )

    def update_gauges(self) -> None:
        m = self.service.metrics
        m.sessions.set(sum(len(s.sessions) for s in self.states.values()))
        m.findings_open.set(sum(len(s.groups) for s in self.states.values()))
        m.lifecycle_instances.set(sum(len(s.lifecycle) for s in self.states.values()))


async def restore_partition(
    settings: Settings,
    partition: int,
    committed: int,
    state: DetectorState,
    on_batch: Callable[[int], Any] | None = None,
) -> tuple[int, int]:
    """Replay changelog partition ``partition`` into ``state`` up to its high watermark at the call.

    Changes tagged with a source offset at or past ``committed`` were made by input that was never
    committed; they are skipped, since that input is consumed again and remakes them. Returns
    ``(records applied, records skipped)``.
    """
    restored = skipped = 0
    # With transactions, the changelog holds the records of aborted transactions too: one tagged with a
    # source offset that its successor consumed again and committed would pass the skip rule below.
    isolation = "read_committed" if transactions_enabled(settings) else "read_uncommitted"
    reader = AIOKafkaConsumer(
        **kafka_common_kwargs(settings), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    await reader.start()
    try:
        source = TopicPartition(settings.changelog_topic_name, partition)
        reader.assign([source])
        end = (await reader.end_offsets([source]))[source]
        await reader.seek_to_beginning(source)
        idle = 0
        while await reader.position(source) < end:
            batch = await reader.getmany(source, timeout_ms=1000, max_records=20_000)
            idle = 0 if batch else idle + 1
            if idle >= 30:
                log.warning("restore_stalled", partition=_label(source), position=await reader.position(source), end=end)
                break
            messages = batch.get(source, ())
            applied, passed = changelog.apply_records(state, messages, committed)
            restored += applied
            skipped += passed
            if on_batch is not None:
                on_batch(len(messages))
    finally:
        await reader.stop()
    state.drain_changes()
    return restored, skipped

