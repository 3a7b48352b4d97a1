"""``detector run``: the Kafka adapter around the core (SPEC §9, issues 3, 4 and 11) — the composition root.

A Kafka stream processor in two stages, both on one asyncio loop with the HTTP endpoints (or one of them,
with the ``stage`` setting, so that two processes use two cores):

1. **route** (consumer group ``group_id``, the input topics): decode each message; instance-session,
   credential-issuance and lifecycle records (SPEC §10) are re-keyed by **instance ID** onto the internal
   ``sessions_topic`` — one copy per instance a record concerns (a ``StopInstances`` of several
   instances), each tagged with its instance in the ``detector.instance`` header when there are several;
   malformed input goes to the dead-letter topic; every other record is dropped early.
2. **detect** (consumer group ``<group_id>.detect``, the ``sessions_topic``): one ``DetectorState`` per
   partition, so a session always lives in one partition of one process. Every changed key goes to the
   compacted ``changelog_topic`` once per checkpoint (same partition, tagged with the source offset),
   findings to the findings topic at once. On assignment a partition is paused, its state restored from the changelog (skipping
   changes made by input that was never committed), then resumed.

At least once, in both stages: a batch is applied synchronously (the core never awaits) and its outputs are
queued on the producer; every ``checkpoint_interval_ms``, on revoke and at shutdown a checkpoint awaits
their acknowledgement and only then commits the input offsets (``offset + 1``) — bounded, in the detect
stage, by the offsets of finding changes still held back by the update interval (:mod:`.checkpoint`).

The modules, along the pipeline: :mod:`.stage` (a consumer-group member and its rebalance listener),
:mod:`.route` and :mod:`.detect` (the two stages), :mod:`.checkpoint` (delivery, changelog, commit),
:mod:`.state_store` (the detect stage's per-partition
state and its restore), :mod:`.output` (producing), :mod:`.topics` (topic administration) and
:mod:`.reload` (registry and ip-ranges reloads). This module wires them into :class:`DetectorService`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from .. import ipranges
from ..core.engine import Engine
from ..core.state import DetectorState
from ..registry import RegistryError, load_registry
from .detect import DetectStage, _parse_routed
from .http import HttpServer
from .kafka_config import access_problem, producer_kwargs, transactions_enabled
from .metrics import Metrics
from .output import Output, Queued, eventbridge_envelope, finding_body, produce_all, send_outputs, undeliverable
from .partitioning import KeyPartitions
from .publisher import FindingPublisher
from .reload import Reloads
from .route import RouteStage, route_keys
from .settings import Settings
from .stage import (
    EMPTY_VALUE,
    ROUTED_INSTANCE,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    Stage,
    _label,
    routed_instance,
    source_headers,
)
from .state_store import restore_partition
from .topics import CHANGELOG_CONFIG, StartupError, describe_settled, ensure_topics

__all__ = [  # what tests, benchmarks and the demo import from here
    "CHANGELOG_CONFIG", "EMPTY_VALUE", "ROUTED_INSTANCE", "SOURCE_OFFSET", "SOURCE_PARTITION", "SOURCE_TOPIC",
    "DetectStage", "DetectorService", "Output", "RouteStage", "Stage", "StartupError", "_parse_routed",
    "describe_settled", "eventbridge_envelope", "finding_body", "install_signal_handlers", "restore_partition",
    "route_keys", "routed_instance", "send_outputs", "serve", "source_headers",
]

log = structlog.get_logger("detector.service")

BROKER_PROBE_SECONDS = 1.0  # once connected, the cluster is asked for its metadata this often ...
BROKER_PROBE_TIMEOUT = 5.0  # ... and counted unreachable (``/readyz`` 503) when it does not answer in time


class DetectorService(Reloads):
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
        # ``stage``: the stages this process runs (both, or one per process: see docs/scaling.md)
        self.stages: list[Stage] = [st for st in (self.detect, self.route) if settings.stage in ("all", st.name)]
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
            and all(st.joined for st in self.stages)
            and any(st.assigned for st in self.stages)
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
                results = await asyncio.gather(*(st.loop() for st in self.stages), return_exceptions=True)
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
                self.producer = AIOKafkaProducer(**self._producer_kwargs())
                await self.producer.start()
                for stage in reversed(self.stages):  # route first, as before
                    await stage.start()
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
        """Create/check the topics (:func:`.topics.ensure_topics`) and tell the stages what they found."""
        sessions, sources = await ensure_topics(self.settings)
        self.detect.partitions_total = sessions
        if self.route.partition_of.partitions != sessions:
            self.route.partition_of = KeyPartitions(sessions)
        if sources:
            self.detect.sources = sources

    def _producer_kwargs(self) -> dict[str, Any]:
        """The producer's settings; a process running one stage gets a transactional ID of its own (the
        stage's name appended), so that the route and detect processes of one instance do not fence each
        other."""
        kwargs = producer_kwargs(self.settings)
        if self.settings.stage != "all" and kwargs.get("transactional_id"):
            kwargs["transactional_id"] = f"{kwargs['transactional_id']}.{self.settings.stage}"
        return kwargs

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
            for stage in self.stages:
                try:
                    await asyncio.wait_for(stage.checkpoint(flush_all=True), timeout=max(0.1, deadline - time.monotonic()))
                except (asyncio.TimeoutError, KafkaError) as exc:
                    log.error("shutdown_flush_failed", stage=stage.name, error=f"{type(exc).__name__}: {exc}")
        self._connected = False
        self.metrics.ready.set(0)
        committed = {_label(tp): o for st in (self.route, self.detect) for tp, o in st.committed.items()}
        await self._close_clients()
        if self.http is not None:
            await self.http.stop()
        log.info("stopped", committed=committed)

    async def produce_all(self, outputs: list[Output], queued: list[Queued] | None = None) -> None:
        """Produce every output and wait for the acks (:func:`.output.produce_all`)."""
        await produce_all(self, outputs, queued)

    def _undeliverable(self, item: Output, exc: BaseException) -> Output:
        return undeliverable(self, item, exc)

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
