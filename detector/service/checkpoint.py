"""Checkpoints: the at-least-once (or exactly-once) unit of work of a stage (issue 11).

A stage processes continuously. The outputs of what it processes are queued on the producer at once (a
new finding goes out with the fetch that opened it); nothing waits for the broker between fetches. Every
``checkpoint_interval_ms``, and on revoke and shutdown, a **checkpoint**:

1. queues what is still due (held-back finding updates whose interval has passed, all of them on revoke
   and shutdown) and the detect stage's changelog: one record per session (or finding group, or lifecycle
   entry) changed since the last checkpoint, tagged with the last input offset the checkpoint covers;
2. awaits the producer's acknowledgement of everything queued since the last checkpoint — a failed
   delivery is retried with backoff (a record the broker refuses for good becomes a dead letter) and the
   checkpoint does not end before it is delivered;
3. then commits the input offsets the checkpoint covers (bounded by held-back finding changes, see
   :meth:`~detector.service.detect.DetectStage.commit_bound`).

An offset is therefore committed only after every output derived from it is acknowledged, as Kafka
Streams' ``commit.interval.ms`` and quixstreams' checkpoints do it. With a transactional producer
(``transactional_id``) the outputs wait in the stage and a checkpoint is one Kafka transaction: outputs
and input offsets together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from .output import Output, Queued, send_outputs

if TYPE_CHECKING:
    from .app import DetectorService

log = structlog.get_logger("detector.service")


class _Once:
    """A delivery callback that runs at most once: when its outputs' acknowledgements arrive, or at the
    checkpoint that awaits them, whichever comes first."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def __call__(self, *_: Any) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class Checkpointing:
    """The checkpoint half of :class:`~detector.service.stage.Stage` (a mixin over its ``service``,
    ``consumer``, ``lock``, ``outbox``, ``processed``, ``committed``, ``assigned`` and the hooks ``process``,
    ``holding``, ``prepare``, ``write_changelog`` and ``commit_bound``)."""

    service: DetectorService
    consumer: AIOKafkaConsumer | None
    group_id: str
    name: str
    lock: asyncio.Lock
    outbox: list[Output]
    processed: dict[TopicPartition, int]
    committed: dict[TopicPartition, int]
    assigned: set[TopicPartition]

    def _init_checkpoints(self) -> None:
        self.queued: list[Queued] = []  # on the producer since the last checkpoint, with their futures
        self.acks: list[_Once] = []  # to run once everything queued since the last checkpoint is delivered
        self.next_checkpoint = 0.0  # monotonic time of the next periodic checkpoint
        self.checkpoints = 0

    # --- between checkpoints -----------------------------------------------------------------------

    def checkpoint_due(self) -> bool:
        """Whether the interval has passed: the loop checks after each fetch, so under input a checkpoint
        runs within one fetch of the interval, and on an idle stream within the fetch timeout (500 ms at
        most) — what is queued then is already delivered, the checkpoint only commits."""
        return time.monotonic() >= self.next_checkpoint

    async def step(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Apply ``batch`` and queue its outputs on the producer without waiting for them.

        With transactions the outputs stay in the outbox for the checkpoint's transaction.
        """
        async with self.lock:
            if batch or self.holding():
                self.process(batch or {})
            if self.service.transactional:
                return
            delivered = self.prepare()
            await self._queue(delivered)

    async def _queue(self, delivered: Callable[[], None] | None) -> None:
        outbox, self.outbox = self.outbox, []
        sent: list[Queued] = []
        if outbox:
            producer = self.service.producer
            assert producer is not None
            sent = await send_outputs(producer, outbox, True, self.service.settings.max_message_bytes)
            self.queued.extend(sent)
        if delivered is None:
            return
        once = _Once(delivered)
        self.acks.append(once)
        futures = [future for _, future in sent if not isinstance(future, BaseException)]
        if len(futures) == len(sent):  # all queued: run the callback as soon as they are acknowledged
            gathered = asyncio.gather(*futures)
            gathered.add_done_callback(lambda done: once() if not done.cancelled() and done.exception() is None else None)

    # --- the checkpoint ----------------------------------------------------------------------------

    async def checkpoint(self, flush_all: bool = False, partitions: set[TopicPartition] | None = None) -> None:
        """Deliver everything queued since the last checkpoint, write the changelog, then commit.

        ``partitions``: commit only these (a revoke), though everything is delivered; a transaction commits
        every assigned partition (:meth:`transact`). The commit of the plain path runs outside the lock, so a
        rebalance never waits on it.
        """
        async with self.lock:
            self.next_checkpoint = time.monotonic() + self.service.settings.checkpoint_interval_ms / 1000.0
            if self.holding():
                self.process({})
            if self.service.transactional:
                await self.transact(flush_all)
                return
            delivered = self.prepare(flush_all)
            if delivered is not None:
                self.acks.append(_Once(delivered))
            self.write_changelog()
            outbox, self.outbox = self.outbox, []
            queued, self.queued = self.queued, []
            acks, self.acks = self.acks, []
            await self.service.produce_all(outbox, queued)
            for once in acks:
                once()
            self.checkpoints += 1
        await self.commit(partitions)

    async def transact(self, flush_all: bool) -> None:
        """Outputs and input offsets in one transaction (exactly once), retried until it commits."""
        service = self.service
        delivered = self.prepare(flush_all)
        self.write_changelog()
        outbox, self.outbox = self.outbox, []
        # the transaction carries the outputs of every assigned partition, so it commits all their offsets,
        # not only those of ``partitions`` (a revoke): under a cooperative assignor the others stay, and
        # their outputs committed without their offsets would be produced again after a crash
        offsets = self.offsets_to_commit()
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
        self.checkpoints += 1
        if offsets:
            service.metrics.commits.inc()
            self.committed.update(offsets)

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
        """Commit the offsets the last checkpoint covers; a failure is logged and the next one retries."""
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
