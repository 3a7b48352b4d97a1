"""Topic administration: create the missing topics, wait for them to settle, check the internal ones."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .kafka_config import kafka_common_kwargs
from .settings import Settings

log = structlog.get_logger("detector.service")

CHANGELOG_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": str(3600 * 1000)}


class StartupError(Exception):
    """A configuration, registry, ranges or topic problem found before consuming anything."""


async def describe_settled(admin: AIOKafkaAdminClient, topics: list[str], timeout: float = 15.0) -> list[dict[str, Any]]:
    """``describe_topics``, asked again while a topic is not yet in the metadata with its partitions.

    Apache Kafka creates topics asynchronously: CreateTopics answers once the controller has them, but the
    broker's metadata may still lack them (UNKNOWN_TOPIC_OR_PARTITION, or no partitions) for a moment.
    Taken at once, that answer would read as a topic with 0 partitions.
    """
    deadline = time.monotonic() + timeout
    while True:
        described = await admin.describe_topics(topics)
        if all(d["error_code"] == 0 and d["partitions"] for d in described) or time.monotonic() > deadline:
            return described
        await asyncio.sleep(0.1)


async def ensure_topics(s: Settings) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Create missing topics (when allowed) and check the internal ones agree in partition count.

    Returns the partition count of the sessions topic (and changelog) and the input partitions that exist
    now, as ``(topic, partition)`` header values.
    """
    admin = AIOKafkaAdminClient(**kafka_common_kwargs(s))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = {
            s.findings_topic: NewTopic(
                s.findings_topic, s.topic_partitions, s.topic_replication_factor,
                topic_configs={"cleanup.policy": "compact"},
            ),
            s.dlq_topic: NewTopic(
                s.dlq_topic, s.topic_partitions, s.topic_replication_factor,
                topic_configs={"max.message.bytes": str(s.max_message_bytes)},
            ),
            s.sessions_topic_name: NewTopic(s.sessions_topic_name, s.state_partitions, s.topic_replication_factor),
            s.changelog_topic_name: NewTopic(
                s.changelog_topic_name, s.state_partitions, s.topic_replication_factor,
                topic_configs=dict(CHANGELOG_CONFIG),
            ),
        }
        missing = [t for name, t in wanted.items() if name not in existing]
        if missing:
            if not s.auto_create_topics:
                raise StartupError(
                    f"topics missing and auto_create_topics is off: {', '.join(t.name for t in missing)}"
                )
            for topic in missing:  # one at a time: a concurrent instance may create one first
                try:
                    await admin.create_topics([topic])
                    log.info("topic_created", topic=topic.name, partitions=topic.num_partitions)
                except TopicAlreadyExistsError:
                    pass
        described = await describe_settled(admin, [s.sessions_topic_name, s.changelog_topic_name])
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        sessions, logged = counts.get(s.sessions_topic_name, 0), counts.get(s.changelog_topic_name, 0)
        if sessions != logged or sessions == 0:
            raise StartupError(
                f"sessions_topic {s.sessions_topic_name!r} has {sessions} partitions but changelog_topic "
                f"{s.changelog_topic_name!r} has {logged}: they must be equal (and non-zero), or state would "
                "be restored into the wrong partitions; recreate the changelog with the sessions topic's count"
            )
        if s.input_topics.startswith("^"):
            inputs = sorted(name for name in existing if re.match(s.input_topics, name))  # as subscribe(pattern=)
        else:
            inputs = [name for name in s.input_topics.split(",") if name in existing]
        sources: list[tuple[bytes, bytes]] = []
        if inputs:
            described = await describe_settled(admin, inputs)
            sources = [(d["topic"].encode(), str(p["partition"]).encode()) for d in described for p in d["partitions"]]
        return sessions, sources
    finally:
        await admin.close()
