"""A broker restart mid-stream on Apache Kafka (issue 10, item 2).

The session's broker is stopped (an orderly shutdown) and started again on the same log directory and
ports while the service runs: the service reconnects by itself, `/readyz` answers 503 during the outage
and 200 after it, and the findings and commits are those of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from kafka_support import (  # noqa: F401 - fixtures
    broker,
    committed_offsets,
    create_topics,
    end_offsets,
    expected_key,
    finding_key,
    latest_findings,
    librdkafka_produce,
    read_topic,
    require_real,
    service_settings,
    unique,
    wait_until,
)

from detector.core.records import decode
from detector.demo import sample_world, world_messages
from detector.service.app import DetectorService

pytestmark = pytest.mark.kafka

WORLD = sample_world()
EXPECTED = sorted(expected_key(e) for e in orjson.loads(WORLD.expected.read_bytes()))


async def status(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status


async def test_broker_restart_mid_stream_service_reconnects_and_loses_nothing(broker: Any) -> None:
    require_real(broker, "a durable log that survives a restart")
    prefix = unique("brestart")
    s = service_settings(broker.bootstrap, prefix, registry=WORLD.registry, finding_update_seconds=0.5, grace_seconds=10)
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    messages = world_messages(WORLD)
    total = sum(len(decode(m).records) for m in messages)
    half = len(messages) // 2
    service = DetectorService(s)
    task = asyncio.create_task(service.run())
    try:
        await wait_until(service.ready, timeout=60)
        assert service.http is not None
        port = service.http.port
        await asyncio.to_thread(librdkafka_produce, broker.bootstrap, s.input_topics, messages[:half])
        await wait_until(lambda: service.progress()["read"] > 0, timeout=30)

        await asyncio.to_thread(broker.stop)  # SIGTERM: an orderly shutdown, the log directory kept
        await wait_until(lambda: not service.ready(), timeout=30)
        assert await status(port, "/readyz") == 503
        assert await status(port, "/healthz") == 200  # unready, not unhealthy: a restart would not help
        assert service.metrics.broker_errors._value.get() >= 1

        await asyncio.to_thread(broker.start)  # same log directory, same ports
        await wait_until(service.ready, timeout=60)
        assert await status(port, "/readyz") == 200
        await asyncio.to_thread(librdkafka_produce, broker.bootstrap, s.input_topics, messages[half:])

        def done() -> bool:
            p = service.progress()
            return p["read"] >= total and p["applied"] >= p["routed"]

        await wait_until(done, timeout=120)
        service.stop()
        assert await asyncio.wait_for(task, timeout=60) == 0
    finally:
        if not task.done():
            service.stop()
            await asyncio.wait_for(task, timeout=60)
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED
    assert await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 3) == await end_offsets(
        broker.bootstrap, s.input_topics, 3
    )
