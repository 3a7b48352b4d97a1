"""The base of both stages: one consumer-group member, its rebalance listener, and what both share."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from .kafka_config import consumer_kwargs
from .logging import record_context
from .output import Output, send_outputs

if TYPE_CHECKING:
    from .app import DetectorService

log = structlog.get_logger("detector.service")

EMPTY_VALUE = "empty_value"
SOURCE_TOPIC = "detector.source.topic"
SOURCE_PARTITION = "detector.source.partition"
SOURCE_OFFSET = "detector.source.offset"
ROUTED_INSTANCE = "detector.instance"  # on a routed copy of a record that concerns several instances


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

