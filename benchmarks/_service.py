"""Helpers of the service benchmarks: a broker, topics, producing, reading the service's metrics.

The service is used only through ``DetectorService(Settings(...))``, ``run()``, ``stop()``, ``.metrics``
and ``.engine`` (its internals change); progress is read from the Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families


def quiet_logs() -> None:
    """Errors only: the service logs every finding (info) and dead letter (warning), which would bury the figures
    (``Settings.log_level`` takes effect where ``detector run`` configures logging, not in the constructor)."""
    from detector.service.logging import configure_logging

    configure_logging("error")


def names(prefix: str) -> dict[str, str]:
    return {
        "input_topics": f"{prefix}.cloudtrail",
        "findings_topic": f"{prefix}.findings",
        "dlq_topic": f"{prefix}.dlq",
        "group_id": f"{prefix}.detector",
    }


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, values: Iterable[bytes], partitions: int | None = None) -> int:
    """Produce ``values`` unkeyed; with ``partitions``, round-robin over them as a bridge writes them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20,
                                max_request_size=8 << 20)  # fmt: skip
    await producer.start()
    n = 0
    try:
        pending = []
        for value in values:
            partition = None if partitions is None else n % partitions
            pending.append(await producer.send(topic, value, partition=partition))
            n += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n


async def bare_consume(bootstrap: str, topic: str, expected: int, max_records: int = 2000) -> float:
    """Seconds from the first message to the last of a plain consumer loop (no parsing)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=unique("bare"), auto_offset_reset="earliest",
        enable_auto_commit=False, fetch_max_wait_ms=100, max_partition_fetch_bytes=8 << 20,
    )  # fmt: skip
    await consumer.start()
    try:
        seen = 0
        first = None
        while seen < expected:
            batch = await consumer.getmany(timeout_ms=500, max_records=max_records)
            for messages in batch.values():
                if first is None:
                    first = time.perf_counter()
                seen += len(messages)
            if batch:
                await consumer.commit()
        assert first is not None
        return time.perf_counter() - first
    finally:
        await consumer.stop()


def samples(metrics: Any) -> dict[str, float]:
    """Metric name -> value summed over labels, from the service's exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
