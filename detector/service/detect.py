"""The detect stage: ``sessions_topic`` partitions -> per-partition state, changelog, findings."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from ..core import changelog
from ..core.engine import MalformedRecord
from ..core.findings import render
from ..core.ordering import Watermark, event_time_key, merge_runs, releasable
from ..core.records import BAD_RECORD, decode_routed
from ..core.state import DetectorState, EngineConfig, FindingGroup
from .metrics import type_label
from .output import finding_body
from .stage import SOURCE_PARTITION, SOURCE_TOPIC, Stage, routed_instance
from .state_store import StateStore

if TYPE_CHECKING:
    from .app import DetectorService

log = structlog.get_logger("detector.service")


def _parse_routed(msg: Any) -> tuple[Any, tuple[bytes, bytes]]:
    """The record of a sessions-topic message (None when it is not one) and its source partition
    (from the route stage's headers; empty when absent)."""
    record = decode_routed(msg.value)
    source = (b"", b"")
    for name, value in msg.headers or ():
        if name == SOURCE_TOPIC:
            source = (value, source[1])
        elif name == SOURCE_PARTITION:
            source = (source[0], value)
    return record, source


class DetectStage(StateStore, Stage):
    """``sessions_topic`` partitions → per-partition state, changelog, findings."""

    name = "detect"

    def __init__(self, service: DetectorService) -> None:
        super().__init__(service, service.settings.detect_group_id)
        self.states: dict[int, DetectorState] = {}
        self.restoring: dict[int, asyncio.Task[None]] = {}
        self.standby: dict[int, tuple[DetectorState, int]] = {}  # revoked states and their committed offset
        # fetched, not yet applied: (arrival, eventTime, message, record, source) in offset order
        self.held: dict[TopicPartition, list[tuple[float, str, Any, Any, tuple[bytes, bytes]]]] = {}
        self.watermarks: dict[TopicPartition, Watermark] = {}
        self.sources: list[tuple[bytes, bytes]] = []  # the input partitions (found at start-up), waited for
        if service.settings.reorder_window_ms > 0:
            self.fetch_timeout_ms = max(10, min(500, service.settings.reorder_window_ms // 2))
        # first offset applied after each checkpoint not yet committed past, and since the last checkpoint
        self.batch_starts: dict[TopicPartition, list[int]] = {}
        self.interval_starts: dict[TopicPartition, int] = {}
        self.records_applied = 0
        self.partitions_total = service.settings.state_partitions

    def subscribe(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        consumer.subscribe(topics=[self.service.settings.sessions_topic_name], listener=listener)

    def new_state(self) -> DetectorState:
        s = self.service.settings
        cap = max(1, math.ceil(s.max_sessions / max(1, self.partitions_total)))
        config = EngineConfig(
            session_ttl_seconds=s.session_ttl_seconds, max_sessions=cap, finding_ttl_seconds=s.finding_ttl_seconds
        )
        return DetectorState(config, track_changes=True)

    def commit_bound(self, tp: TopicPartition, processed: int) -> int:
        """``processed``, or — when a held-back finding change pins an earlier offset — the start of the
        checkpoint interval holding that offset.

        A changelog record carries the last offset its checkpoint covers and is skipped on restore when that
        is at or past the committed offset. Committing mid-interval would skip changes made by the interval's
        earlier offsets, which are never consumed again; committing at interval starts (the first offset
        applied after a checkpoint) keeps restore exact.
        """
        pinned = self.service.publisher.commit_bound(tp, processed)
        if pinned >= processed:
            self.batch_starts.pop(tp, None)  # later pins can only fall in later intervals
            return processed
        starts = self.batch_starts.get(tp, ())
        below = [start for start in starts if start <= pinned]
        bound = max(below) if below else self.committed.get(tp, 0)
        if starts:  # interval starts below the bound are no longer needed
            self.batch_starts[tp] = [start for start in starts if start >= bound]
        return bound

    def holding(self) -> bool:
        return bool(self.held)

    def process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Hold fetched records until every source still delivering has caught up with them, at most
        ``reorder_window_ms``, then apply them (see :meth:`_apply`).

        Several route instances write one sessions partition in wall-clock order; holding records a
        moment lets the records one instance routed late join, in eventTime order, those another routed
        early — so two instances apply a session's records in the order one would. A record is released
        as soon as every source partition heard from within the window has delivered a record at least
        as new (:class:`~detector.core.ordering.Watermark`), so under steady input the hold costs about
        one fetch, not the window.
        """
        window = self.service.settings.reorder_window_ms / 1000.0
        if self.service.stopping.is_set():
            window = 0.0  # shutting down: apply whatever is held, so its outputs go out before the commit
        now = time.monotonic()
        holds = self.service.settings.reorder_window_ms > 0
        for tp, messages in batch.items():
            held = self.held.setdefault(tp, [])
            watermark = self.watermarks.get(tp)
            if watermark is None:
                watermark = self.watermarks[tp] = Watermark(self.sources, now)
            for msg in messages:
                record, source = _parse_routed(msg)
                event_time = event_time_key(record)
                held.append((now, event_time, msg, record, source))
                if holds:
                    watermark.observe(source, event_time, now)
        due: dict[TopicPartition, list[tuple[float, str, Any, Any, tuple[bytes, bytes]]]] = {}
        for tp, held in list(self.held.items()):
            if window <= 0:
                n = len(held)
            else:
                n = releasable(held, self.watermarks[tp].mark(now, window), now, window)
            if n:
                due[tp] = held[:n]
                if n == len(held):
                    del self.held[tp]
                else:
                    del held[:n]
        if due:
            self._apply(due)

    def _apply(self, batch: dict[TopicPartition, list[tuple[float, str, Any, Any, tuple[bytes, bytes]]]]) -> None:
        service = self.service
        m = service.metrics
        apply = service.engine.apply
        observe = service.publisher.observe
        now = time.time()
        counters = service.engine.counters
        instance_before = counters.instance_records
        for tp, entries in batch.items():
            state = self.states.get(tp.partition)
            if state is None:  # not restored (paused partitions yield nothing; this is a safety net)
                continue
            expired, evicted = state.expired, state.evicted
            for msg, record in self._in_event_time_order(entries):
                if record is None:
                    reason = BAD_RECORD
                    m.malformed.labels(reason).inc()
                    self.dead_letter(msg, reason, "not a CloudTrail record on the sessions topic", list(msg.headers or ()))
                    continue
                try:
                    changes = apply(state, record, routed_instance(msg))
                except MalformedRecord as exc:
                    m.malformed.labels(exc.reason).inc()
                    self.dead_letter(msg, exc.reason, str(exc), list(msg.headers or ()))
                    continue
                for change in changes:
                    if change.new:
                        group = change.group
                        m.findings.labels(type_label(group.type), str(group.severity)).inc()
                    observe(change, tp, msg.offset, now)
            m.evictions.labels("ttl").inc(state.expired - expired)
            m.evictions.labels("lru").inc(state.evicted - evicted)
            self.processed[tp] = entries[-1][2].offset + 1
            if tp not in self.interval_starts:
                self.interval_starts[tp] = entries[0][2].offset
            self.records_applied += len(entries)
            m.detected.inc(len(entries))
        m.instance_events.inc(counters.instance_records - instance_before)

    @staticmethod
    def _in_event_time_order(entries: list[tuple[float, str, Any, Any, tuple[bytes, bytes]]]) -> list[tuple[Any, Any]]:
        """``(message, record)`` of one partition's released entries, the runs from different input
        partitions merged by eventTime.

        Several route instances interleave their writes into a partition by wall-clock timing; the
        merge gives every instance count the order a single route instance gives.
        """
        runs: dict[tuple[bytes, bytes], list[tuple[str, tuple[Any, Any]]]] = {}
        for _, event_time, msg, record, source in entries:
            runs.setdefault(source, []).append((event_time, (msg, record)))
        return merge_runs(runs.values())

    def write_changelog(self) -> None:
        """Queue one changelog record per key (session, finding group, lifecycle entry) changed since the last
        checkpoint, tagged with the last offset of its partition the checkpoint covers."""
        service = self.service
        changelog_topic = service.settings.changelog_topic_name
        sessions_topic = service.settings.sessions_topic_name
        written = 0
        for partition, state in self.states.items():
            tp = TopicPartition(sessions_topic, partition)
            start = self.interval_starts.pop(tp, None)
            if start is None:
                continue  # nothing applied since the last checkpoint, so nothing changed
            self.batch_starts.setdefault(tp, []).append(start)
            offset_header = [(changelog.OFFSET_HEADER, str(self.processed[tp] - 1).encode())]
            for key, value in changelog.drain(state):
                self.outbox.append((changelog_topic, value, key, offset_header, partition))
                written += 1
        service.metrics.changelog_records.inc(written)

    def prepare(self, flush_all: bool = False) -> Callable[[], None] | None:
        """Queue the finding states that are due (all of them when ``flush_all``); return what to do once
        they are acknowledged. They count as published at once, so that the update interval holds back the
        next change of a group while this one is on its way."""
        service = self.service
        s = service.settings
        groups = service.publisher.take_due(time.time(), flush_all=flush_all)
        if not groups:
            return None
        rendered: list[tuple[FindingGroup, dict[str, Any]]] = []
        for group in groups:
            finding = render(group)
            rendered.append((group, finding))
            new = group.id in service.publisher.fresh
            body = finding_body(finding, new, s.finding_format, s.eventbridge_envelope)
            self.outbox.append((s.findings_topic, orjson.dumps(body), group.id.encode(), [], None))
        service.publisher.published(groups, time.time())

        def delivered() -> None:
            sent_at = time.time()
            service.metrics.finding_updates.inc(len(groups))
            for group, finding in rendered:
                service.metrics.event_lag.observe(max(0.0, sent_at - group.last_ts))
                if group.version == 1:
                    log.info(
                        "finding",
                        finding_id=group.id,
                        type=group.type,
                        severity=group.severity,
                        account=group.account,
                        instance=group.instance_id,
                        remote_account=group.remote_account,
                        count=group.count,
                    )
                if service.on_finding is not None:
                    service.on_finding(finding)

        return delivered
