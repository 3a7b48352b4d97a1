"""``detector run``: the Kafka adapter around the core (SPEC §9) — at least once, observable.

One asyncio loop runs the consumer loop, the HTTP endpoints and the registry watcher. A fetched batch
is decoded and applied to the state synchronously (the core never awaits), then its outputs (finding
states, dead letters) are produced and awaited, and only then are the input offsets committed
(``offset + 1``), bounded by the offsets of finding changes still held back by the update interval.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
)

from .. import ipranges
from ..core.engine import Engine, MalformedRecord
from ..core.findings import render
from ..core.records import decode
from ..core.registry import Registry
from ..core.state import DetectorState, EngineConfig, FindingGroup
from ..registry import RegistryError, load_registry
from .http import HttpServer
from .kafka_config import consumer_kwargs, kafka_common_kwargs, producer_kwargs
from .metrics import Metrics
from .publisher import FindingPublisher
from .settings import Settings

log = structlog.get_logger("detector.service")

EMPTY_VALUE = "empty_value"


class StartupError(Exception):
    """A configuration, registry or ranges problem found before consuming anything."""


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


class _RebalanceListener(ConsumerRebalanceListener):
    """aiokafka swallows exceptions raised here, so every failure is logged and counted explicitly."""

    def __init__(self, service: DetectorService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self.service.on_revoked(set(revoked))
        except Exception:  # noqa: BLE001 - must not vanish silently
            log.exception("rebalance_revoke_failed")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.service.on_assigned(set(assigned))
        except Exception:  # noqa: BLE001
            log.exception("rebalance_assign_failed")


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
        self.engine = Engine(registry, ranges)
        self.state = DetectorState(
            EngineConfig(
                session_ttl_seconds=settings.session_ttl_seconds,
                max_sessions=settings.max_sessions,
                finding_ttl_seconds=settings.finding_ttl_seconds,
            )
        )
        self.publisher = FindingPublisher(settings.finding_update_seconds)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.http: HttpServer | None = None
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # one batch (process, produce, ack) at a time; rebalances wait
        self._dead: list[tuple[Any, str, str]] = []  # (message, reason, detail) for the dead letters
        self._processed: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._committed: dict[TopicPartition, int] = {}
        self._assigned: set[TopicPartition] = set()
        self._connected = False
        self._consumer_failed = False
        self._last_loop = time.monotonic()
        self._registry_stamp = self._stamp()
        self._seen_counts = (0, 0, 0)
        m = self.metrics
        m.session_ttl.set(settings.session_ttl_seconds)
        m.session_capacity.set(settings.max_sessions)
        m.registry_accounts.set(len(registry.accounts))
        m.ready.set(0)

    # --- health ------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Event loop responsive (we are answering) and the consumer loop alive and turning."""
        stalled = time.monotonic() - self._last_loop > max(60.0, 4 * self.settings.grace_seconds)
        return not self._consumer_failed and not (self._connected and stalled)

    def ready(self) -> bool:
        return self._connected and bool(self._assigned) and not self.stopping.is_set()

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
            group_id=s.group_id,
            http_port=self.http.port,
            registry=self.engine.registry.summary(),
            ip_ranges={k: v for k, v in self.ranges_info.items() if k != "source"},
        )
        watcher = asyncio.create_task(self._watch_registry(), name="registry-watcher")
        try:
            if await self._connect():
                await self._consume()
            return 0
        finally:
            watcher.cancel()
            await self._shutdown()

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop_requested")
            self.stopping.set()

    async def _connect(self) -> bool:
        """Start producer and consumer, retrying with capped exponential backoff until stopped."""
        s = self.settings
        delay = 0.5
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            try:
                if s.auto_create_topics:
                    await self._ensure_topics()
                self.producer = AIOKafkaProducer(**producer_kwargs(s))
                await self.producer.start()
                self.consumer = AIOKafkaConsumer(**consumer_kwargs(s))
                await self.consumer.start()
                kind, value = s.input_subscription
                listener = _RebalanceListener(self)
                if kind == "pattern":
                    self.consumer.subscribe(pattern=value, listener=listener)
                else:
                    self.consumer.subscribe(topics=value, listener=listener)
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
        s = self.settings
        admin = AIOKafkaAdminClient(**kafka_common_kwargs(s))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [
                NewTopic(
                    s.findings_topic,
                    s.topic_partitions,
                    s.topic_replication_factor,
                    topic_configs={"cleanup.policy": "compact"},
                ),
                NewTopic(s.dlq_topic, s.topic_partitions, s.topic_replication_factor),
            ]
            missing = [t for t in wanted if t.name not in existing]
            if missing:
                try:
                    await admin.create_topics(missing)
                    log.info("topics_created", topics=[t.name for t in missing])
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await client.stop()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    log.debug("client_stop_failed", exc_info=True)
        self.consumer = None
        self.producer = None

    async def _shutdown(self) -> None:
        """Publish pending updates, commit, leave the group. The listener is not called on stop()."""
        if self._connected and self.consumer is not None:
            try:
                async with self._lock:
                    await asyncio.wait_for(self._flush(flush_all=True), timeout=self.settings.grace_seconds)
                await asyncio.wait_for(self._commit(), timeout=self.settings.grace_seconds)
            except (asyncio.TimeoutError, KafkaError) as exc:
                log.error("shutdown_flush_failed", error=f"{type(exc).__name__}: {exc}")
        self._connected = False
        self.metrics.ready.set(0)
        await self._close_clients()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped", committed={f"{tp.topic}/{tp.partition}": o for tp, o in self._committed.items()})

    # --- consuming ---------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.consumer is not None
        s = self.settings
        next_lag = 0.0
        while not self.stopping.is_set():
            self._last_loop = time.monotonic()
            try:
                batch = await self.consumer.getmany(timeout_ms=500, max_records=s.max_poll_records)
            except (IllegalStateError, KafkaError) as exc:
                log.warning("fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            started = time.perf_counter()
            async with self._lock:
                if batch:
                    self._process(batch)
                await self._flush()
            await self._commit()
            if batch:
                self.metrics.processing.observe(time.perf_counter() - started)
            now = time.monotonic()
            if now >= next_lag:
                self._update_gauges()
                next_lag = now + 5.0

    def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Decode and apply one batch; queue dead letters and due finding states. Never awaits."""
        m = self.metrics
        apply = self.engine.apply
        state = self.state
        observe = self.publisher.observe
        now = time.time()
        for tp, messages in batch.items():
            m.events.labels(tp.topic).inc(len(messages))
            for msg in messages:
                if msg.value is None:
                    decoded = None
                    error: str | None = EMPTY_VALUE
                    detail = "message has no value"
                    m.malformed.labels(EMPTY_VALUE).inc()
                else:
                    decoded = decode(msg.value)
                    error = decoded.error
                    detail = f"{len(decoded.malformed)} malformed element(s): {', '.join(sorted(set(decoded.malformed)))}"
                    for reason in decoded.malformed:
                        m.malformed.labels(reason).inc()
                if decoded is not None:
                    for record in decoded.records:
                        try:
                            changes = apply(state, record)
                        except MalformedRecord as exc:
                            m.malformed.labels(exc.reason).inc()
                            if error is None:
                                error, detail = exc.reason, str(exc)
                            continue
                        for change in changes:
                            if change.new:
                                group = change.group
                                m.findings.labels(group.type.rsplit(".", 1)[-1], str(group.severity)).inc()
                            observe(change, tp, msg.offset, now)
                if error is not None:
                    self._dead.append((msg, error, detail))
            self._processed[tp] = messages[-1].offset + 1
        counters = self.engine.counters
        seen = (counters.instance_records, state.expired, state.evicted)
        m.instance_events.inc(seen[0] - self._seen_counts[0])
        m.evictions.labels("ttl").inc(seen[1] - self._seen_counts[1])
        m.evictions.labels("lru").inc(seen[2] - self._seen_counts[2])
        self._seen_counts = seen

    async def _flush(self, flush_all: bool = False) -> None:
        """Produce queued dead letters and due finding states; return once all are acknowledged."""
        now = time.time()
        groups = self.publisher.take_due(now, flush_all=flush_all)
        dead, self._dead = self._dead, []
        if not groups and not dead:
            return
        s = self.settings
        outputs: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
        rendered: list[tuple[FindingGroup, dict[str, Any]]] = []
        for group in groups:
            finding = render(group)
            rendered.append((group, finding))
            body = eventbridge_envelope(finding) if s.eventbridge_envelope else finding
            outputs.append((s.findings_topic, orjson.dumps(body), group.id.encode(), []))
        for msg, error, detail in dead:
            headers = list(msg.headers or ()) + [
                ("detector.error.reason", error.encode()),
                ("detector.error", detail.encode()[:1000]),
                ("detector.source.topic", msg.topic.encode()),
                ("detector.source.partition", str(msg.partition).encode()),
                ("detector.source.offset", str(msg.offset).encode()),
            ]
            outputs.append((s.dlq_topic, msg.value if msg.value is not None else b"", msg.key, headers))
        await self._produce_all(outputs)
        sent_at = time.time()
        self.publisher.published(groups, sent_at)
        self.metrics.dead_letters.inc(len(dead))
        self.metrics.finding_updates.inc(len(groups))
        for group, finding in rendered:
            self.metrics.event_lag.observe(max(0.0, sent_at - group.last_ts))
            if group.version == 1 or self.on_finding is not None:
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
            if self.on_finding is not None:
                self.on_finding(finding)

    async def _produce_all(self, outputs: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]]) -> None:
        """Produce every output and wait for the acks, retrying failures with backoff.

        Gives up only when stopping and the grace period is over (the caller then skips the commit,
        so the inputs are consumed again after a restart).
        """
        assert self.producer is not None
        todo = outputs
        delay = 0.2
        deadline: float | None = None
        while todo:
            futures = []
            for topic, value, key, headers in todo:
                try:
                    futures.append(await self.producer.send(topic, value=value, key=key, headers=headers))
                except KafkaError as exc:
                    futures.append(exc)
            failed = []
            for item, fut in zip(todo, futures, strict=True):
                if isinstance(fut, Exception):
                    failed.append((item, fut))
                    continue
                try:
                    await fut
                except KafkaError as exc:
                    failed.append((item, exc))
            if not failed:
                return
            todo = [item for item, _ in failed]
            log.warning("produce_failed", pending=len(todo), error=f"{type(failed[0][1]).__name__}: {failed[0][1]}")
            if self.stopping.is_set():
                deadline = deadline or time.monotonic() + self.settings.grace_seconds
                if time.monotonic() > deadline:
                    raise KafkaError("could not deliver outputs before the grace period ended")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _commit(self, partitions: set[TopicPartition] | None = None) -> None:
        if self.consumer is None:
            return
        assigned = self._assigned if partitions is None else partitions
        offsets = {}
        for tp, processed in self._processed.items():
            if tp not in assigned:
                continue
            bound = self.publisher.commit_bound(tp, processed)
            if bound > self._committed.get(tp, -1):
                offsets[tp] = bound
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            self.metrics.commit_failures.inc()
            log.warning("commit_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.metrics.commits.inc()
        self._committed.update(offsets)

    # --- rebalances --------------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.metrics.rebalances.labels("revoked").inc()
        async with self._lock:
            await self._flush(flush_all=True)
        await self._commit(revoked & self._assigned)
        self._assigned -= revoked
        for tp in revoked:
            self._processed.pop(tp, None)
            self._committed.pop(tp, None)
        self.metrics.assigned_partitions.set(len(self._assigned))
        self.metrics.ready.set(1 if self.ready() else 0)
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assigned").inc()
        self._assigned |= assigned
        self.metrics.assigned_partitions.set(len(self._assigned))
        self.metrics.ready.set(1 if self.ready() else 0)
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    # --- gauges ------------------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        m = self.metrics
        m.sessions.set(len(self.state.sessions))
        m.findings_open.set(len(self.state.groups))
        m.ready.set(1 if self.ready() else 0)
        if self.consumer is None:
            return
        for tp in self._assigned:
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            position = self._processed.get(tp, self._committed.get(tp, 0))
            m.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))

    # --- registry reload ---------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        path = self.settings.registry
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
            registry: Registry = await asyncio.to_thread(load_registry, path)
        except RegistryError as exc:
            self.metrics.registry_reloads.labels("failure").inc()
            log.error("registry_reload_failed", reason=reason, error=str(exc))
            return False
        self.engine.registry = registry
        self.metrics.registry_reloads.labels("success").inc()
        self.metrics.registry_accounts.set(len(registry.accounts))
        log.info("registry_reloaded", reason=reason, **registry.summary())
        return True

    async def _watch_registry(self) -> None:
        interval = self.settings.registry_reload_seconds
        if self.settings.registry is None or interval <= 0:
            return
        while not self.stopping.is_set():
            await asyncio.sleep(interval)
            stamp = self._stamp()
            if stamp is not None and stamp != self._registry_stamp:
                self._registry_stamp = stamp
                await self.reload_registry("file_changed")


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
