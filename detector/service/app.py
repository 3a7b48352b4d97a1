"""``detector run``: the Kafka adapter around the core (SPEC §9, issues 3 and 4).

A Kafka stream processor in two stages, both on one asyncio loop with the HTTP endpoints:

1. **route** (consumer group ``group_id``, the input topics): decode each message; instance-session,
   credential-issuance and lifecycle records (SPEC §10) are re-keyed by **instance ID** onto the internal
   ``sessions_topic`` — one copy per instance a record concerns (a ``StopInstances`` of several
   instances), each tagged with its instance in the ``detector.instance`` header when there are several;
   malformed input goes to the dead-letter topic; every other record is dropped early.
2. **detect** (consumer group ``<group_id>.detect``, the ``sessions_topic``): one ``DetectorState`` per
   partition, so a session always lives in one partition of one process. Every state change goes to the
   compacted ``changelog_topic`` (same partition, tagged with the source offset), findings to the
   findings topic. On assignment a partition is paused, its state restored from the changelog (skipping
   changes made by input that was never committed), then resumed.

At least once, in both stages: a batch is applied synchronously (the core never awaits), its outputs are
produced and awaited, and only then are its input offsets committed (``offset + 1``) — bounded, in the
detect stage, by the offsets of finding changes still held back by the update interval.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, TopicAlreadyExistsError

from .. import ipranges
from ..core import changelog
from ..core.engine import Engine, MalformedRecord, route_keys
from ..core.findings import render
from ..core.ocsf import to_ocsf
from ..core.ordering import Watermark, event_time_key, merge_runs, releasable
from ..core.records import BAD_RECORD, decode_fast, decode_routed, encode_routed
from ..core.state import DetectorState, EngineConfig, FindingGroup
from ..registry import RegistryError, load_registry
from .http import HttpServer
from .kafka_config import access_problem, consumer_kwargs, kafka_common_kwargs, producer_kwargs, transactions_enabled
from .logging import record_context
from .metrics import Metrics, type_label
from .partitioning import KeyPartitions
from .publisher import FindingPublisher
from .settings import Settings

log = structlog.get_logger("detector.service")

EMPTY_VALUE = "empty_value"
SOURCE_TOPIC = "detector.source.topic"
SOURCE_PARTITION = "detector.source.partition"
SOURCE_OFFSET = "detector.source.offset"
ROUTED_INSTANCE = "detector.instance"  # on a routed copy of a record that concerns several instances
BROKER_PROBE_SECONDS = 1.0  # once connected, the cluster is asked for its metadata this often ...
BROKER_PROBE_TIMEOUT = 5.0  # ... and counted unreachable (``/readyz`` 503) when it does not answer in time
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": str(3600 * 1000)}

Output = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]  # topic, value, key, headers, partition


class StartupError(Exception):
    """A configuration, registry, ranges or topic problem found before consuming anything."""


def eventbridge_envelope(finding: dict[str, Any]) -> dict[str, Any]:
    """Wrap a finding as EventBridge delivers GuardDuty's (``detail-type: GuardDuty Finding``)."""
    return {
        "version": "0",
        "id": str(uuid4()),
        "detail-type": "GuardDuty Finding",
        "source": "ec2-credential-detector",
        "account": finding["accountId"],
        "time": finding["updatedAt"][:19] + "Z",
        "region": finding["region"],
        "resources": [],
        "detail": finding,
    }


def finding_body(finding: dict[str, Any], new: bool, finding_format: str, envelope: bool) -> dict[str, Any]:
    """What goes on the findings topic for one finding state (``finding_format``; the envelope wraps only
    the GuardDuty-shaped format, the settings reject it with ``ocsf``). ``new``: the first state published
    of a group opened since (an OCSF Create); the later ones are Updates."""
    if finding_format == "ocsf":
        return to_ocsf(finding, new=new)
    return eventbridge_envelope(finding) if envelope else finding


def routed_instance(msg: Any) -> str | None:
    """The instance a routed copy is for (its ``detector.instance`` header), None for the whole record."""
    for name, value in msg.headers or ():
        if name == ROUTED_INSTANCE:
            return value.decode("ascii", "replace")  # type: ignore[no-any-return]
    return None


def source_headers(msg: Any) -> list[tuple[str, bytes]]:
    return [
        (SOURCE_TOPIC, msg.topic.encode()),
        (SOURCE_PARTITION, str(msg.partition).encode()),
        (SOURCE_OFFSET, str(msg.offset).encode()),
    ]


def _label(tp: TopicPartition) -> str:
    return f"{tp.topic}/{tp.partition}"


class _Listener(ConsumerRebalanceListener):
    """aiokafka swallows exceptions raised here, so every failure is logged and counted explicitly."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self.stage.on_revoked(set(revoked))
        except Exception:  # noqa: BLE001 - must not vanish silently
            log.exception("rebalance_revoke_failed", stage=self.stage.name)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.stage.on_assigned(set(assigned))
        except Exception:  # noqa: BLE001
            log.exception("rebalance_assign_failed", stage=self.stage.name)


class Stage(ABC):
    """One consumer-group member: fetch a batch, apply it, produce its outputs, then commit."""

    name = "stage"

    def __init__(self, service: DetectorService, group_id: str) -> None:
        self.service = service
        self.group_id = group_id
        self.consumer: AIOKafkaConsumer | None = None
        self.lock = asyncio.Lock()  # one batch (process, produce, ack) at a time; rebalances wait
        self.processed: dict[TopicPartition, int] = {}  # next offset to commit
        self.committed: dict[TopicPartition, int] = {}
        self.assigned: set[TopicPartition] = set()
        self.joined = False  # this stage's consumer has had its first assignment (maybe empty)
        self.outbox: list[Output] = []

    @abstractmethod
    def subscribe(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        """Subscribe ``consumer`` to this stage's topics with ``listener``."""

    @abstractmethod
    def process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Apply a fetched batch synchronously, queueing its outputs in ``self.outbox``."""

    fetch_timeout_ms = 500

    def holding(self) -> bool:
        """Whether fetched records wait in the stage (then ``process`` runs even without new ones)."""
        return False

    def commit_bound(self, tp: TopicPartition, processed: int) -> int:
        return processed

    def prepare(self, flush_all: bool = False) -> Callable[[], None] | None:
        """Move outputs that are due into the outbox; return what to do once they are delivered."""
        return None

    async def flush(self, flush_all: bool = False) -> None:
        """Deliver the outbox (and whatever :meth:`prepare` adds), every output acknowledged."""
        delivered = self.prepare(flush_all)
        outbox, self.outbox = self.outbox, []
        await self.service.produce_all(outbox)
        if delivered is not None:
            delivered()

    async def settle(
        self,
        batch: dict[TopicPartition, list[Any]] | None = None,
        flush_all: bool = False,
        partitions: set[TopicPartition] | None = None,
    ) -> None:
        """Apply ``batch``, deliver its outputs, then commit: the at-least-once unit of work.

        With a transactional producer, outputs and offsets go in one Kafka transaction instead.
        The commit of the plain path runs outside the lock, so a rebalance never waits on it.
        """
        async with self.lock:
            if batch or self.holding():
                self.process(batch or {})
            if self.service.transactional:
                await self.transact(flush_all, partitions)
                return
            await self.flush(flush_all)
        await self.commit(partitions)

    async def transact(self, flush_all: bool, partitions: set[TopicPartition] | None) -> None:
        """Outputs and input offsets in one transaction (exactly once), retried until it commits."""
        service = self.service
        delivered = self.prepare(flush_all)
        outbox, self.outbox = self.outbox, []
        offsets = self.offsets_to_commit(partitions)
        if not outbox and not offsets:
            return
        delay = 0.2
        deadline: float | None = None
        while True:
            producer = service.producer
            assert producer is not None
            try:
                async with service.transaction_lock, producer.transaction():
                    for _, sent in await send_outputs(producer, outbox, True, service.settings.max_message_bytes):
                        if isinstance(sent, BaseException):
                            raise sent
                        await sent
                    if offsets:
                        await producer.send_offsets_to_transaction(offsets, self.group_id)
                break
            except KafkaError as exc:
                service.metrics.commit_failures.inc()
                log.warning("transaction_failed", stage=self.name, error=f"{type(exc).__name__}: {exc}")
                if service.stopping.is_set():
                    deadline = deadline or time.monotonic() + service.settings.grace_seconds
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if delivered is not None:
            delivered()
        if offsets:
            service.metrics.commits.inc()
            self.committed.update(offsets)

    # machinery
    async def start(self) -> None:
        kwargs = consumer_kwargs(self.service.settings)
        kwargs["group_id"] = self.group_id
        self.consumer = AIOKafkaConsumer(**kwargs)
        self.joined = False
        await self.consumer.start()
        self.subscribe(self.consumer, _Listener(self))

    async def stop(self) -> None:
        if self.consumer is not None:
            try:
                await self.consumer.stop()
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.debug("consumer_stop_failed", stage=self.name, exc_info=True)
            self.consumer = None

    async def loop(self) -> None:
        service = self.service
        settings = service.settings
        metrics = service.metrics
        while not service.stopping.is_set():
            service.heartbeat()
            assert self.consumer is not None
            try:
                batch = await self.consumer.getmany(timeout_ms=self.fetch_timeout_ms, max_records=settings.max_poll_records)
            except (IllegalStateError, KafkaError) as exc:
                log.warning("fetch_failed", stage=self.name, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            started = time.perf_counter()
            await self.settle(batch)
            if batch:
                metrics.processing.observe(time.perf_counter() - started)

    def offsets_to_commit(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        allowed = self.assigned if partitions is None else partitions
        offsets = {}
        for tp, processed in self.processed.items():
            if tp in allowed:
                bound = self.commit_bound(tp, processed)
                if bound > self.committed.get(tp, -1):
                    offsets[tp] = bound
        return offsets

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        if self.consumer is None:
            return
        offsets = self.offsets_to_commit(partitions)
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            self.service.metrics.commit_failures.inc()
            log.warning("commit_failed", stage=self.name, error=f"{type(exc).__name__}: {exc}")
            return
        self.service.metrics.commits.inc()
        self.committed.update(offsets)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.service.metrics.rebalances.labels("revoked").inc()
        await self.settle(flush_all=True, partitions=revoked & self.assigned)
        self.assigned -= revoked
        self.dropped(revoked)
        for tp in revoked:
            self.processed.pop(tp, None)
            self.committed.pop(tp, None)
        self.service.partitions_changed()
        log.info("partitions_revoked", stage=self.name, partitions=sorted(_label(tp) for tp in revoked))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.service.metrics.rebalances.labels("assigned").inc()
        self.assigned |= assigned
        self.joined = True
        self.added(assigned)
        self.service.partitions_changed()
        log.info("partitions_assigned", stage=self.name, partitions=sorted(_label(tp) for tp in assigned))

    def added(self, assigned: set[TopicPartition]) -> None:
        pass

    def dropped(self, revoked: set[TopicPartition]) -> None:
        pass

    def update_lag(self) -> None:
        if self.consumer is None:
            return
        gauge = self.service.metrics.consumer_lag
        for tp in self.assigned:
            high = self.consumer.highwater(tp)
            if high is not None:
                position = self.processed.get(tp, self.committed.get(tp, high))
                gauge.labels(tp.topic, str(tp.partition)).set(max(0, high - position))

    def dead_letter(self, msg: Any, reason: str, detail: str, headers: list[tuple[str, bytes]]) -> None:
        s = self.service.settings
        headers = headers + [("detector.error.reason", reason.encode()), ("detector.error", detail.encode()[:1000])]
        self.outbox.append((s.dlq_topic, msg.value if msg.value is not None else b"", msg.key, headers, None))
        self.service.metrics.dead_letters.inc()
        with record_context(msg.topic, msg.partition, msg.offset):
            log.warning("dead_letter", stage=self.name, reason=reason, detail=detail[:200])


class RouteStage(Stage):
    """Input topics → ``sessions_topic`` keyed by instance ID; malformed input → dead letters."""

    name = "route"

    def __init__(self, service: DetectorService) -> None:
        super().__init__(service, service.settings.group_id)
        self.records_read = 0
        self.records_routed = 0
        # the sessions topic's partition of each key, as the default partitioner computes it (start-up sets
        # the topic's real count)
        self.partition_of = KeyPartitions(service.settings.state_partitions)

    def subscribe(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        kind, value = self.service.settings.input_subscription
        if kind == "pattern":
            consumer.subscribe(pattern=value, listener=listener)
        else:
            consumer.subscribe(topics=value, listener=listener)

    def process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Route one batch, its partitions merged by eventTime (see :mod:`detector.core.ordering`)."""
        m = self.service.metrics
        sessions_topic = self.service.settings.sessions_topic_name
        outbox = self.outbox
        partition_of = self.partition_of
        read = routed = kept = 0  # routed: copies on the sessions topic; kept: records they came from
        runs = []
        for tp, messages in batch.items():
            m.events.labels(tp.topic).inc(len(messages))
            run = []
            for msg in messages:
                decoded = decode_fast(msg.value) if msg.value is not None else None
                first = decoded.records[0] if decoded is not None and decoded.records else None
                run.append((event_time_key(first), (msg, decoded)))
            runs.append(run)
            self.processed[tp] = messages[-1].offset + 1
        for msg, decoded in merge_runs(runs):
            if decoded is None:
                m.malformed.labels(EMPTY_VALUE).inc()
                self.dead_letter(msg, EMPTY_VALUE, "message has no value", list(msg.headers or ()) + source_headers(msg))
                continue
            headers: list[tuple[str, bytes]] | None = None
            problem: MalformedRecord | None = None
            read += decoded.ignored  # records that cannot matter: counted, never routed
            for record in decoded.records:
                read += 1
                try:
                    keys = route_keys(record)
                except MalformedRecord as exc:
                    m.malformed.labels(exc.reason).inc()
                    problem = problem or exc
                    continue
                if not keys:
                    continue
                if headers is None:
                    headers = source_headers(msg)
                value = encode_routed(record)
                if len(keys) == 1:
                    key = keys[0].encode()
                    outbox.append((sessions_topic, value, key, headers, partition_of(key)))
                else:  # one copy per instance, each applied only for its instance (Engine.apply's ``only``)
                    for name in keys:
                        key = name.encode()
                        outbox.append((sessions_topic, value, key, [*headers, (ROUTED_INSTANCE, key)], partition_of(key)))
                routed += len(keys)
                kept += 1
            if decoded.malformed:
                for reason in decoded.malformed:
                    m.malformed.labels(reason).inc()
                kinds = ", ".join(sorted(set(decoded.malformed)))
                self.dead_letter(
                    msg,
                    decoded.malformed[0],
                    f"{len(decoded.malformed)} malformed element(s): {kinds}",
                    list(msg.headers or ()) + source_headers(msg),
                )
            elif problem is not None:
                self.dead_letter(msg, problem.reason, str(problem), list(msg.headers or ()) + source_headers(msg))
        self.records_read += read
        self.records_routed += routed
        m.repartitioned.inc(routed)
        m.records_dropped.inc(read - kept)


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


class DetectStage(Stage):
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
        self.batch_starts: dict[TopicPartition, list[int]] = {}  # first offset of each batch not yet committed past
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
        batch holding that offset.

        A changelog record carries the last offset of its batch and is skipped on restore when that is
        at or past the committed offset. Committing mid-batch would skip changes made by the batch's
        earlier offsets, which are never consumed again; committing at batch starts keeps restore exact.
        """
        pinned = self.service.publisher.commit_bound(tp, processed)
        if pinned >= processed:
            self.batch_starts.pop(tp, None)  # later pins can only fall in later batches
            return processed
        starts = self.batch_starts.get(tp, ())
        below = [start for start in starts if start <= pinned]
        bound = max(below) if below else self.committed.get(tp, 0)
        if starts:  # batch starts below the bound are no longer needed
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
        changelog_topic = service.settings.changelog_topic_name
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
            last = entries[-1][2].offset
            offset_header = [(changelog.OFFSET_HEADER, str(last).encode())]
            for key, value in changelog.drain(state):
                self.outbox.append((changelog_topic, value, key, offset_header, tp.partition))
                m.changelog_records.inc()
            m.evictions.labels("ttl").inc(state.expired - expired)
            m.evictions.labels("lru").inc(state.evicted - evicted)
            self.processed[tp] = last + 1
            self.batch_starts.setdefault(tp, []).append(entries[0][2].offset)
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

    def prepare(self, flush_all: bool = False) -> Callable[[], None] | None:
        """Queue the finding states that are due (all of them when ``flush_all``) behind the changelog."""
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

        def delivered() -> None:
            sent_at = time.time()
            service.publisher.published(groups, sent_at)
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

    # --- state restoration -------------------------------------------------------------------------

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
            for msg in messages:
                offset = changelog.source_offset(msg.headers)
                if offset is not None and offset >= committed:
                    skipped += 1
                    continue
                changelog.apply_record(state, msg.key, msg.value)
                restored += 1
            if on_batch is not None:
                on_batch(len(messages))
    finally:
        await reader.stop()
    state.drain_changes()
    return restored, skipped


async def send_outputs(
    producer: AIOKafkaProducer, outputs: list[Output], batched: bool, max_bytes: int
) -> list[tuple[list[Output], Any]]:
    """Queue ``outputs`` on ``producer``; return each group of outputs with its delivery future, or with the
    :class:`KafkaError` raised queueing it.

    ``batched``: the outputs with a partition (routed and changelog records) go as one record batch per
    run that fills aiokafka's batch size (``create_batch``/``send_batch``): no per-record future, and a
    batch is delivered or fails as a whole. Partition order is kept. The others, a value over ``max_bytes``
    (which the producer refuses as before, so it becomes a dead letter), and all of them when not
    ``batched``, go one by one (``send``).
    """
    sent: list[tuple[list[Output], Any]] = []
    groups: dict[tuple[str, int], list[Output]] = {}
    for item in outputs:
        topic, value, key, headers, partition = item
        if batched and partition is not None and (value is None or len(value) <= max_bytes):
            groups.setdefault((topic, partition), []).append(item)
            continue
        try:
            sent.append(([item], await producer.send(topic, value=value, key=key, headers=headers, partition=partition)))
        except KafkaError as exc:
            sent.append(([item], exc))
    for (topic, partition), items in groups.items():
        batch, members = producer.create_batch(), []
        for item in items:
            if batch.append(key=item[2], value=item[1], timestamp=None, headers=item[3]) is None:
                # full (an empty batch takes any one record): send it, start the next with this record
                sent.append((members, await _send_batch(producer, batch, topic, partition)))
                batch, members = producer.create_batch(), []
                batch.append(key=item[2], value=item[1], timestamp=None, headers=item[3])
            members.append(item)
        sent.append((members, await _send_batch(producer, batch, topic, partition)))
    return sent


async def _send_batch(producer: AIOKafkaProducer, batch: Any, topic: str, partition: int) -> Any:
    try:
        return await producer.send_batch(batch, topic, partition=partition)
    except KafkaError as exc:
        return exc


async def describe_settled(admin: AIOKafkaAdminClient, topics: list[str], timeout: float = 15.0) -> list[dict[str, Any]]:
    """``describe_topics``, asked again while a topic is not yet in the metadata with its partitions.

    Apache Kafka creates topics asynchronously: CreateTopics answers once the controller has them, but the
    broker's metadata may still lack them (UNKNOWN_TOPIC_OR_PARTITION, or no partitions) for a moment.
    Taken at once, that answer would read as a topic with 0 partitions.
    """
    deadline = time.monotonic() + timeout
    while True:
        described = await admin.describe_topics(topics)
        if all(d["error_code"] == 0 and d["partitions"] for d in described) or time.monotonic() > deadline:
            return described
        await asyncio.sleep(0.1)


class DetectorService:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        on_finding: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.on_finding = on_finding
        try:
            registry = load_registry(settings.registry)
            ranges, self.ranges_info = ipranges.load(settings.ip_ranges)
        except (RegistryError, ipranges.IpRangesError) as exc:
            raise StartupError(str(exc)) from None
        self.engine = Engine(
            registry, ranges, stop_grace_seconds=settings.stop_grace_seconds, imdsv1_findings=settings.imdsv1_findings
        )
        self.publisher = FindingPublisher(settings.finding_update_seconds)
        self.transactional = transactions_enabled(settings)
        self.transaction_lock = asyncio.Lock()  # both stages share the one transactional producer
        self.producer: AIOKafkaProducer | None = None
        self.http: HttpServer | None = None
        self.route = RouteStage(self)
        self.detect = DetectStage(self)
        self.stopping = asyncio.Event()
        self._connected = False
        self._broker_reachable = True  # as the last probe found it (see _probe_broker)
        self._failed = False
        self._last_loop = time.monotonic()
        self._stamps = {"registry": self._stamp(settings.registry), "ip_ranges": self._stamp(settings.ip_ranges)}
        m = self.metrics
        m.session_ttl.set(settings.session_ttl_seconds)
        m.session_capacity.set(settings.max_sessions)
        m.registry_accounts.set(len(registry.accounts))
        m.ready.set(0)

    # --- health ------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self._last_loop = time.monotonic()

    def healthy(self) -> bool:
        """Event loop responsive (we are answering) and the consumer loops alive and turning."""
        stalled = time.monotonic() - self._last_loop > max(60.0, 4 * self.settings.grace_seconds)
        return not self._failed and not (self._connected and stalled)

    def ready(self) -> bool:
        return (
            self._connected
            and self._broker_reachable
            and not self.stopping.is_set()
            and self.route.joined
            and self.detect.joined
            and bool(self.route.assigned or self.detect.assigned)
            and not self.detect.restoring
        )

    def partitions_changed(self) -> None:
        self.metrics.assigned_partitions.set(len(self.route.assigned) + len(self.detect.assigned))
        self.metrics.ready.set(1 if self.ready() else 0)

    def progress(self) -> dict[str, int]:
        """Records read from the inputs, routed to the sessions topic, and applied by the detect stage."""
        return {
            "read": self.route.records_read,
            "routed": self.route.records_routed,
            "applied": self.detect.records_applied,
        }

    @property
    def states(self) -> dict[int, DetectorState]:
        return self.detect.states

    # --- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until :meth:`stop`; returns the process exit status."""
        s = self.settings
        self.http = HttpServer(self, s.http_host, s.http_port)
        await self.http.start()
        log.info(
            "starting",
            bootstrap=s.kafka_bootstrap,
            input=s.input_topics,
            findings_topic=s.findings_topic,
            dlq_topic=s.dlq_topic,
            sessions_topic=s.sessions_topic_name,
            changelog_topic=s.changelog_topic_name,
            group_id=s.group_id,
            http_port=self.http.port,
            registry=self.engine.registry.summary(),
            ip_ranges={k: v for k, v in self.ranges_info.items() if k != "source"},
        )
        background = [
            asyncio.create_task(self._watch_files(), name="file-watcher"),
            asyncio.create_task(self._gauges(), name="gauges"),
            asyncio.create_task(self._probe_broker(), name="broker-probe"),
        ]
        if s.registry_sync_seconds > 0:
            background.append(asyncio.create_task(self._sync_registry_loop(), name="registry-sync"))
        code = 0
        try:
            if await self._connect():
                results = await asyncio.gather(self.route.loop(), self.detect.loop(), return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    self._failed = True
                    code = 1
                    for err in errors:
                        log.error("consumer_loop_failed", error=f"{type(err).__name__}: {err}")
            return code
        finally:
            for task in background:
                task.cancel()
            await self._shutdown()

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop_requested")
            self.stopping.set()
            self.metrics.ready.set(0)

    async def _connect(self) -> bool:
        """Create/check topics, start producer and consumers; retry with capped backoff until stopped."""
        s = self.settings
        delay = 0.5
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            try:
                problem = await access_problem(s)
                if problem is not None:
                    raise StartupError(problem)
                await self._ensure_topics()
                self.producer = AIOKafkaProducer(**producer_kwargs(s))
                await self.producer.start()
                await self.route.start()
                await self.detect.start()
                self._connected = True
                log.info("connected", attempt=attempt)
                return True
            except (KafkaError, OSError) as exc:
                self.metrics.broker_errors.inc()
                await self._close_clients()
                log.warning(
                    "broker_unreachable",
                    attempt=attempt,
                    retry_in_seconds=round(delay, 1),
                    error=f"{type(exc).__name__}: {exc}",
                )
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, s.startup_retry_max_seconds)
        return False

    async def _ensure_topics(self) -> None:
        """Create missing topics (when allowed) and check the internal ones agree in partition count."""
        s = self.settings
        admin = AIOKafkaAdminClient(**kafka_common_kwargs(s))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = {
                s.findings_topic: NewTopic(
                    s.findings_topic, s.topic_partitions, s.topic_replication_factor,
                    topic_configs={"cleanup.policy": "compact"},
                ),
                s.dlq_topic: NewTopic(
                    s.dlq_topic, s.topic_partitions, s.topic_replication_factor,
                    topic_configs={"max.message.bytes": str(s.max_message_bytes)},
                ),
                s.sessions_topic_name: NewTopic(s.sessions_topic_name, s.state_partitions, s.topic_replication_factor),
                s.changelog_topic_name: NewTopic(
                    s.changelog_topic_name, s.state_partitions, s.topic_replication_factor,
                    topic_configs=dict(CHANGELOG_CONFIG),
                ),
            }
            missing = [t for name, t in wanted.items() if name not in existing]
            if missing:
                if not s.auto_create_topics:
                    raise StartupError(
                        f"topics missing and auto_create_topics is off: {', '.join(t.name for t in missing)}"
                    )
                for topic in missing:  # one at a time: a concurrent instance may create one first
                    try:
                        await admin.create_topics([topic])
                        log.info("topic_created", topic=topic.name, partitions=topic.num_partitions)
                    except TopicAlreadyExistsError:
                        pass
            described = await describe_settled(admin, [s.sessions_topic_name, s.changelog_topic_name])
            counts = {d["topic"]: len(d["partitions"]) for d in described}
            sessions, logged = counts.get(s.sessions_topic_name, 0), counts.get(s.changelog_topic_name, 0)
            if sessions != logged or sessions == 0:
                raise StartupError(
                    f"sessions_topic {s.sessions_topic_name!r} has {sessions} partitions but changelog_topic "
                    f"{s.changelog_topic_name!r} has {logged}: they must be equal (and non-zero), or state would "
                    "be restored into the wrong partitions; recreate the changelog with the sessions topic's count"
                )
            self.detect.partitions_total = sessions
            if self.route.partition_of.partitions != sessions:
                self.route.partition_of = KeyPartitions(sessions)
            if s.input_topics.startswith("^"):
                inputs = sorted(name for name in existing if re.match(s.input_topics, name))  # as subscribe(pattern=)
            else:
                inputs = [name for name in s.input_topics.split(",") if name in existing]
            if inputs:
                described = await describe_settled(admin, inputs)
                self.detect.sources = [
                    (d["topic"].encode(), str(p["partition"]).encode()) for d in described for p in d["partitions"]
                ]
        finally:
            await admin.close()

    async def _close_clients(self) -> None:
        await self.route.stop()
        await self.detect.stop()
        if self.producer is not None:
            try:
                await self.producer.stop()
            except Exception:  # noqa: BLE001
                log.debug("producer_stop_failed", exc_info=True)
            self.producer = None

    async def _shutdown(self) -> None:
        """Publish pending updates, commit, leave the groups — all within one grace period.

        aiokafka's ``stop()`` never calls the rebalance listener, so this does the listener's work.
        """
        deadline = time.monotonic() + self.settings.grace_seconds
        if self._connected:
            for task in list(self.detect.restoring.values()):
                task.cancel()
            # detect first: its held-back finding updates are the output that matters most
            for stage in (self.detect, self.route):
                try:
                    await asyncio.wait_for(stage.settle(flush_all=True), timeout=max(0.1, deadline - time.monotonic()))
                except (asyncio.TimeoutError, KafkaError) as exc:
                    log.error("shutdown_flush_failed", stage=stage.name, error=f"{type(exc).__name__}: {exc}")
        self._connected = False
        self.metrics.ready.set(0)
        committed = {_label(tp): o for st in (self.route, self.detect) for tp, o in st.committed.items()}
        await self._close_clients()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped", committed=committed)

    async def produce_all(self, outputs: list[Output]) -> None:
        """Produce every output and wait for the acks, retrying failures with backoff.

        Gives up only when stopping and the grace period is over (the caller's commit then fails to
        happen, so the inputs are consumed again after a restart).
        """
        if not outputs:
            return
        assert self.producer is not None
        todo = outputs
        delay = 0.2
        deadline: float | None = None
        batched = True  # the first round in batches; a retry one by one, so each failure is told apart
        while todo:
            failed = []
            alone: set[int] = set()  # failures of a record sent on its own (a batch's are retried one by one)
            for items, sent in await send_outputs(self.producer, todo, batched, self.settings.max_message_bytes):
                error = sent if isinstance(sent, KafkaError) else None
                if error is None:
                    try:
                        await sent
                        continue
                    except KafkaError as exc:
                        error = exc
                if len(items) == 1:
                    alone.add(len(failed))
                failed.extend((item, error) for item in items)
            batched = False
            if not failed:
                return
            fatal = {n for n in alone if not getattr(failed[n][1], "retriable", True)}
            if fatal:
                failed = [pair for n, pair in enumerate(failed) if n not in fatal] + [
                    (self._undeliverable(*failed[n]), failed[n][1]) for n in sorted(fatal)
                ]
            todo = [item for item, _ in failed]
            log.warning("produce_failed", pending=len(todo), error=f"{type(failed[0][1]).__name__}: {failed[0][1]}")
            if self.stopping.is_set():
                deadline = deadline or time.monotonic() + self.settings.grace_seconds
                if time.monotonic() > deadline:
                    raise KafkaError("could not deliver outputs before the grace period ended")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _undeliverable(self, item: Output, exc: BaseException) -> Output:
        """An output the broker refuses for good (e.g. too large) becomes a dead letter, truncated if need be.

        Never loops forever on a message that can never be delivered, and never drops one silently.
        """
        topic, value, key, headers, _ = item
        if any(name == "detector.undeliverable" for name, _ in headers):
            raise KafkaError(f"dead letter refused by the broker: {type(exc).__name__}: {exc}")
        body = value or b""
        marks = [("detector.undeliverable", f"{type(exc).__name__} producing to {topic}".encode())]
        limit = self.settings.max_message_bytes // 2
        if len(body) > limit:
            marks.append(("detector.truncated", str(len(body)).encode()))
            body = body[:limit]
        if topic != self.settings.dlq_topic:
            marks.append(("detector.error.reason", b"undeliverable"))
            self.metrics.dead_letters.inc()
        log.error("output_undeliverable", topic=topic, bytes=len(value or b""), error=f"{type(exc).__name__}: {exc}")
        return (self.settings.dlq_topic, body, key, headers + marks, None)

    async def _probe_broker(self) -> None:
        """Once connected, ask the cluster for its metadata every second: not ready while it cannot answer.

        The consumers and the producer ride out an outage on their own (aiokafka reconnects, the loops
        retry), so nothing else would tell an orchestrator that the service has stopped making progress.
        """
        while True:
            await asyncio.sleep(BROKER_PROBE_SECONDS)
            producer = self.producer
            if not self._connected or producer is None:
                continue
            error = None
            try:
                await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=BROKER_PROBE_TIMEOUT)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                self.metrics.broker_errors.inc()
            if (error is None) != self._broker_reachable:
                self._broker_reachable = error is None
                if error is None:
                    log.info("broker_reachable_again")
                else:
                    log.warning("broker_lost", error=error)
            self.metrics.ready.set(1 if self.ready() else 0)

    async def _gauges(self) -> None:
        while True:
            self.detect.update_gauges()
            self.route.update_lag()
            self.detect.update_lag()
            self.metrics.ready.set(1 if self.ready() else 0)
            await asyncio.sleep(5.0)

    # --- registry and ranges reload ----------------------------------------------------------------

    @staticmethod
    def _stamp(path: Any) -> tuple[int, int] | None:
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def reload_registry(self, reason: str) -> bool:
        """Load the registry file again; a bad file keeps the registry in force (SPEC §7)."""
        path = self.settings.registry
        if path is None:
            return False
        try:
            registry = await asyncio.to_thread(load_registry, path)
        except RegistryError as exc:
            self.metrics.registry_reloads.labels("failure").inc()
            log.error("registry_reload_failed", reason=reason, error=str(exc))
            return False
        self.engine.registry = registry
        self.metrics.registry_reloads.labels("success").inc()
        self.metrics.registry_accounts.set(len(registry.accounts))
        log.info("registry_reloaded", reason=reason, **registry.summary())
        return True

    async def reload_ip_ranges(self, reason: str) -> bool:
        try:
            ranges, info = await asyncio.to_thread(ipranges.load, self.settings.ip_ranges)
        except ipranges.IpRangesError as exc:
            log.error("ip_ranges_reload_failed", reason=reason, error=str(exc))
            return False
        self.engine.aws_ranges, self.ranges_info = ranges, info
        log.info("ip_ranges_reloaded", reason=reason, createDate=info["createDate"], prefixes=info["prefixes"])
        return True

    async def sync_registry_once(self) -> bool:
        """Rebuild the registry from AWS and swap it in; on any failure keep the registry in force."""
        from ..aws import SyncOptions, sync_registry, write_registry
        from ..core.registry import registry_from_mapping

        s = self.settings
        options = SyncOptions(
            role_name=s.registry_sync_role_name,
            regions=tuple(r for r in s.registry_sync_regions.split(",") if r.strip()),
            endpoint_url=s.registry_sync_endpoint_url,
        )
        try:
            overlay = load_registry(s.registry_sync_overlay) if s.registry_sync_overlay is not None else None
            mapping = await sync_registry(None, options, overlay=overlay, progress=lambda line: log.debug("registry_sync", line=line))
            registry = registry_from_mapping(mapping, "aws-sync")
            if s.registry_sync_output is not None:
                await asyncio.to_thread(write_registry, s.registry_sync_output, mapping)
        except Exception as exc:  # noqa: BLE001 - SyncError, RegistryError, OSError, botocore's many kinds
            self.metrics.registry_syncs.labels("failure").inc()
            log.error("registry_sync_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        self.engine.registry = registry
        self.metrics.registry_syncs.labels("success").inc()
        self.metrics.registry_accounts.set(len(registry.accounts))
        log.info("registry_synced", **registry.summary())
        return True

    async def _sync_registry_loop(self) -> None:
        while not self.stopping.is_set():
            await self.sync_registry_once()
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.settings.registry_sync_seconds)
            except asyncio.TimeoutError:
                pass

    async def _watch_files(self) -> None:
        interval = self.settings.registry_reload_seconds
        if interval <= 0:
            return
        while not self.stopping.is_set():
            await asyncio.sleep(interval)
            for name, path, reload in (
                ("registry", self.settings.registry, self.reload_registry),
                ("ip_ranges", self.settings.ip_ranges, self.reload_ip_ranges),
            ):
                stamp = self._stamp(path)
                if stamp is not None and stamp != self._stamps[name]:
                    self._stamps[name] = stamp
                    await reload("file_changed")


def install_signal_handlers(service: DetectorService, loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM/SIGINT stop gracefully; a second SIGINT forces; SIGHUP reloads the registry."""
    interrupts = {"count": 0}

    def on_interrupt() -> None:
        interrupts["count"] += 1
        if interrupts["count"] > 1:
            log.warning("forced_exit")
            os._exit(130)
        service.stop()

    loop.add_signal_handler(signal.SIGTERM, service.stop)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(service.reload_registry("sighup")))


async def serve(settings: Settings) -> int:
    service = DetectorService(settings)
    install_signal_handlers(service, asyncio.get_running_loop())
    return await service.run()
