"""The consumer loop both findings-topic consumers share: fetch a batch, parse and validate it, let the
handler act in AWS, then commit — offsets only past findings whose action is done.

- A message that is not JSON, not a finding, or not one of our types is skipped and counted (never
  retried, never blocking the partition).
- The handler returns the findings it could not act on *yet* (AWS throttling or outages past the retry
  budget): their partition is sought back to the first of them, its offset committed no further, and the
  batch comes again after a backoff. A crash between the AWS call and the commit repeats the batch: both
  handlers are idempotent (Security Hub replaces a finding by id; respond's statements have fixed Sids).
- ``/metrics``, ``/healthz``, ``/readyz`` (:mod:`detector.service.http`); SIGTERM finishes the batch in
  hand within ``grace_seconds``, commits and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from ..service.http import HttpServer
from ..service.kafka_config import kafka_common_kwargs
from .aws import Transient
from .findings import Finding, parse_finding
from .metrics import INTERNAL_ERROR, OutputMetrics
from .settings import OutputSettings

log = structlog.get_logger("detector.outputs")

FETCH_TIMEOUT_MS = 500
STALL_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Incoming:
    tp: TopicPartition
    offset: int
    finding: Finding


class Handler(Protocol):
    name: str

    async def handle(self, batch: list[Incoming]) -> list[Incoming]:
        """Act on the batch (in offset order); return the findings to try again later."""
        ...


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: FindingConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner.assigned -= set(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner.assigned |= set(assigned)
        self.owner.joined = True
        self.owner.metrics.ready.set(1 if self.owner.ready() else 0)
        log.info("partitions_assigned", consumer=self.owner.handler.name,
                 partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))  # fmt: skip


class FindingConsumer:
    def __init__(self, settings: OutputSettings, metrics: OutputMetrics, handler: Handler) -> None:
        self.settings = settings
        self.metrics = metrics
        self.handler = handler
        self.consumer: AIOKafkaConsumer | None = None
        self.http: HttpServer | None = None
        self.stopping = asyncio.Event()
        self.assigned: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.joined = False
        self._connected = False
        self._failed = False
        self._last_loop = time.monotonic()
        self._retry_delay = 0.0
        self.batches = 0  # batches handled (tests wait on it)
        metrics.ready.set(0)

    # --- health ------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        return not self._failed and not (self._connected and time.monotonic() - self._last_loop > STALL_SECONDS)

    def ready(self) -> bool:
        return self._connected and self.joined and not self.stopping.is_set()

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop_requested", consumer=self.handler.name)
            self.stopping.set()
            self.metrics.ready.set(0)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        self.http = HttpServer(self, s.http_host, s.http_port)
        await self.http.start()
        log.info("starting", consumer=self.handler.name, bootstrap=s.kafka_bootstrap, findings_topic=s.findings_topic,
                 group_id=s.group_id, http_port=self.http.port)  # fmt: skip
        gauges = asyncio.create_task(self._gauges())
        code = 0
        try:
            if await self._connect():
                loop = asyncio.create_task(self._loop())
                stopped = asyncio.create_task(self.stopping.wait())
                await asyncio.wait({loop, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not loop.done():
                    try:  # the batch in hand: finished and committed within the grace period
                        await asyncio.wait_for(asyncio.shield(loop), timeout=s.grace_seconds)
                    except asyncio.TimeoutError:
                        log.error("shutdown_batch_abandoned", consumer=self.handler.name, grace_seconds=s.grace_seconds)
                        loop.cancel()
                stopped.cancel()
                if loop.done() and not loop.cancelled() and loop.exception() is not None:
                    self._failed = True
                    code = 1
                    log.error("consumer_loop_failed", consumer=self.handler.name, error=repr(loop.exception()))
            return code
        finally:
            gauges.cancel()
            self._connected = False
            self.metrics.ready.set(0)
            await self._close()
            await self.http.stop()
            log.info("stopped", consumer=self.handler.name,
                     committed={f"{tp.topic}/{tp.partition}": o for tp, o in self.committed.items()})  # fmt: skip

    async def _connect(self) -> bool:
        s = self.settings
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.consumer = AIOKafkaConsumer(
                    **kafka_common_kwargs(s), group_id=s.group_id, enable_auto_commit=False,
                    auto_offset_reset="earliest", max_poll_records=s.batch_size,
                )  # fmt: skip
                await self.consumer.start()
                self.consumer.subscribe(topics=[s.findings_topic], listener=_Listener(self))
                self._connected = True
                return True
            except (KafkaError, OSError) as exc:
                self.metrics.broker_errors.inc()
                await self._close()
                log.warning("broker_unreachable", consumer=self.handler.name, retry_in_seconds=delay, error=f"{type(exc).__name__}: {exc}")
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)
        return False

    async def _close(self) -> None:
        if self.consumer is not None:
            try:
                await self.consumer.stop()
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.debug("consumer_stop_failed", exc_info=True)
            self.consumer = None

    async def _gauges(self) -> None:
        while True:
            consumer = self.consumer
            if consumer is not None:
                for tp in list(self.assigned):
                    high = consumer.highwater(tp)
                    if high is not None:
                        try:
                            position = await consumer.position(tp)
                        except (IllegalStateError, KafkaError):
                            continue
                        self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))
            self.metrics.ready.set(1 if self.ready() else 0)
            await asyncio.sleep(5.0)

    # --- the loop ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self.stopping.is_set():
            self._last_loop = time.monotonic()
            assert self.consumer is not None
            try:
                batch = await self.consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=self.settings.batch_size)
            except (IllegalStateError, KafkaError) as exc:
                log.warning("fetch_failed", consumer=self.handler.name, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            if batch:
                await self.handle_batch(batch)

    def parse(self, batch: dict[TopicPartition, list[Any]]) -> list[Incoming]:
        incoming: list[Incoming] = []
        for tp, messages in batch.items():
            self.metrics.consumed.inc(len(messages))
            for msg in messages:
                parsed = parse_finding(msg.value)
                if isinstance(parsed, str):
                    self.metrics.skipped.labels(parsed).inc()
                    log.warning("finding_skipped", consumer=self.handler.name, reason=parsed, topic=tp.topic,
                                partition=tp.partition, offset=msg.offset)  # fmt: skip
                    continue
                incoming.append(Incoming(tp, msg.offset, parsed))
        return incoming

    async def handle_batch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Parse, act, commit; seek back to the first finding to retry in each partition that has one."""
        incoming = self.parse(batch)
        try:
            retry = await self.handler.handle(incoming) if incoming else []
        except Transient as exc:
            log.warning("batch_deferred", consumer=self.handler.name, error=str(exc))
            retry = incoming
        except Exception:  # noqa: BLE001 - a bug or an AWS answer of an unexpected shape: never a crash loop
            self.metrics.failed.labels(INTERNAL_ERROR).inc(len(incoming))
            log.exception("batch_failed", consumer=self.handler.name, findings=len(incoming),
                          finding_ids=[i.finding.id for i in incoming[:10]])  # fmt: skip
            retry = []
        first: dict[TopicPartition, int] = {}
        for item in retry:
            first[item.tp] = min(first.get(item.tp, item.offset), item.offset)
        offsets: dict[TopicPartition, int] = {}
        for tp, messages in batch.items():
            if tp in first:
                assert self.consumer is not None
                self.consumer.seek(tp, first[tp])
                offsets[tp] = first[tp]
            else:
                offsets[tp] = messages[-1].offset + 1
        await self.commit({tp: o for tp, o in offsets.items() if o > self.committed.get(tp, -1)})
        self.batches += 1
        if first:
            self.metrics.batch_retries.inc()
            s = self.settings
            self._retry_delay = min(s.aws_retry_max_seconds, max(s.aws_retry_base_seconds, self._retry_delay * 2))
            log.warning("batch_retry_scheduled", consumer=self.handler.name, findings=len(retry),
                        retry_in_seconds=round(self._retry_delay, 2))  # fmt: skip
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self._retry_delay)
            except asyncio.TimeoutError:
                pass
        else:
            self._retry_delay = 0.0

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets or self.consumer is None:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # a rebalance took the partitions: their new owner repeats the batch (harmless, idempotent)
            self.metrics.commit_failures.inc()
            log.warning("commit_failed", consumer=self.handler.name, error=f"{type(exc).__name__}: {exc}")
            return
        self.metrics.commits.inc()
        self.committed.update(offsets)


async def serve(consumer: FindingConsumer) -> int:
    """Run ``consumer`` until SIGTERM/SIGINT; the process exit status."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, consumer.stop)
    loop.add_signal_handler(signal.SIGINT, consumer.stop)
    return await consumer.run()


class Recent:
    """A bounded map of finding id -> value, least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, value: Any = True) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
