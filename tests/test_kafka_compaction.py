"""Compaction of the changelog on Apache Kafka (issue 10, item 3): after the log cleaner has dropped
superseded records, a fresh instance still restores every session and finding.

The test creates the changelog itself with settings that let the broker's cleaner run within the test
(segments roll every 100 ms of appends, any dirty ratio is worth cleaning, no compaction lag; the test
broker's cleaner wakes every 200 ms), where production keeps `min.compaction.lag.ms` at an hour.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kafka_support import (  # noqa: F401 - fixtures
    broker,
    create_topics,
    end_offsets,
    librdkafka_produce,
    read_topic,
    require_real,
    service_settings,
    unique,
    wait_until,
)
from worldgen import make_world

from detector.core.records import decode
from detector.service.app import DetectorService

pytestmark = pytest.mark.kafka

FORCED_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.001",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "0",
    "file.delete.delay.ms": "0",
}


def snapshot(service: DetectorService) -> tuple[dict[int, Any], dict[int, Any]]:
    sessions = {p: {k: v.to_data() for k, v in st.sessions.items()} for p, st in service.states.items()}
    groups = {p: {k: v.to_data() for k, v in st.groups.items()} for p, st in service.states.items()}
    return sessions, groups


async def test_compacted_changelog_restores_every_session_and_finding(broker: Any, tmp_path: Path) -> None:
    require_real(broker, "log compaction")
    world = make_world(seed=5)
    registry = tmp_path / "registry.json"
    registry.write_bytes(orjson.dumps(world.registry))
    prefix = unique("compact")
    s = service_settings(broker.bootstrap, prefix, registry=registry, finding_update_seconds=0.2, state_partitions=2)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(s.changelog_topic_name, 2, 1, topic_configs=FORCED_COMPACTION)])
    finally:
        await admin.close()
    await create_topics(broker.bootstrap, {s.input_topics: 2, s.sessions_topic_name: 2})

    first = DetectorService(s)
    task = asyncio.create_task(first.run())
    await wait_until(first.ready, timeout=60)
    messages = world.messages()
    total = sum(len(decode(m).records) for m in messages)
    # in slices a little apart, so that the changelog's appends roll segments the cleaner may compact
    for i in range(8):
        librdkafka_produce(broker.bootstrap, s.input_topics, messages[i * len(messages) // 8 : (i + 1) * len(messages) // 8])
        await wait_until(lambda: first.progress()["read"] > 0 and first.progress()["applied"] >= first.progress()["routed"])
        await asyncio.sleep(0.15)  # > segment.ms: the next append rolls a segment
    await wait_until(lambda: first.progress()["read"] >= total and first.progress()["applied"] >= first.progress()["routed"], timeout=60)
    first.stop()
    assert await task == 0
    sessions, groups = snapshot(first)
    assert sum(len(v) for v in sessions.values()) > 0 and sum(len(v) for v in groups.values()) > 0

    ends = await end_offsets(broker.bootstrap, s.changelog_topic_name, 2)
    written = sum(ends.values())

    async def compacted() -> int | None:
        kept = len(await read_topic(broker.bootstrap, s.changelog_topic_name))
        return kept if kept < written else None

    kept = await wait_until(compacted, timeout=60, interval=0.5)
    assert 0 < kept < written  # superseded states are gone from the log

    second = DetectorService(s)
    task = asyncio.create_task(second.run())
    await wait_until(lambda: second.ready() and len(second.states) == s.state_partitions, timeout=60)
    assert snapshot(second) == (sessions, groups)
    second.stop()
    assert await task == 0
