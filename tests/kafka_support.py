"""Real-broker test support: one tansu broker per test session, helpers to produce and read topics.

Import the fixtures into a test module (``from kafka_support import broker, ...``). Tests isolate
themselves with unique topic names and group ids (``unique``), so one broker serves the whole session.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from detector.demo import create_topics
from detector.embedded import EmbeddedBroker
from detector.service.settings import Settings


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


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


async def read_topic(bootstrap: str, topic: str, idle: float = 1.5, timeout: float = 30.0) -> list[Any]:
    """Every message of ``topic`` from the beginning, until ``idle`` seconds pass with nothing new."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    messages: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                messages.extend(msgs)
                last = time.monotonic()
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
    """Offset after the last record of each partition, read from the records themselves.

    (The test broker's ListOffsets answer counts record batches of librdkafka producers, not records,
    so the records are the ground truth here.)
    """
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
