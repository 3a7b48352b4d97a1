"""The base of both stages: one consumer-group member, its rebalance listener, and what both share."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from .kafka_config import consumer_kwargs
from .logging import record_context
from .checkpoint import Checkpointing
from .output import Output

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


class Stage(Checkpointing, ABC):
    """One consumer-group member: fetch, apply and queue the outputs continuously; checkpoint (deliver, then
    commit) every ``checkpoint_interval_ms`` and on revoke (see :mod:`.checkpoint`)."""

    name = "stage"

    def __init__(self, service: DetectorService, group_id: str) -> None:
        self.service = service
        self.group_id = group_id
        self.consumer: AIOKafkaConsumer | None = None
        self.lock = asyncio.Lock()  # one step or checkpoint at a time; rebalances wait
        self.processed: dict[TopicPartition, int] = {}  # next offset to commit
        self.committed: dict[TopicPartition, int] = {}
        self.assigned: set[TopicPartition] = set()
        self.joined = False  # this stage's consumer has had its first assignment (maybe empty)
        self.outbox: list[Output] = []  # outputs not yet queued on the producer
        self._init_checkpoints()

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

    def write_changelog(self) -> None:
        """At a checkpoint: queue the state changes made since the last one (the detect stage's changelog)."""

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
                # not bounded by the next checkpoint: fetching at a faster pace when idle changes how the
                # detect stage's reorder hold interleaves sources (see Checkpointing.checkpoint_due)
                batch = await self.consumer.getmany(timeout_ms=self.fetch_timeout_ms, max_records=settings.max_poll_records)
            except (IllegalStateError, KafkaError) as exc:
                log.warning("fetch_failed", stage=self.name, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            started = time.perf_counter()
            await self.step(batch)
            if batch:
                metrics.processing.observe(time.perf_counter() - started)
            if self.checkpoint_due():
                await self.checkpoint()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.service.metrics.rebalances.labels("revoked").inc()
        await self.checkpoint(flush_all=True, partitions=revoked & self.assigned)
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

