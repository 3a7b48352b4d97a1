"""``detector run`` with ``finding_format = "ocsf"`` against the real test broker: OCSF 1.3 Detection
Findings on the findings topic, keyed by finding id, a group's first state a Create and later ones Updates."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from kafka_support import (  # noqa: F401 - fixtures
    broker,
    create_topics,
    expected_key,
    finding_key,
    librdkafka_produce,
    read_topic,
    service_settings,
    unique,
    wait_until,
)
from ocsf_schema import assert_valid_ocsf

from detector.core.records import decode
from detector.demo import sample_world, world_messages
from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService
from detector.service.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.kafka

WORLD = sample_world()


async def test_ocsf_findings_on_the_topic(broker: EmbeddedBroker) -> None:
    # One record per batch and no update interval: every change of a group is a state on the topic.
    s = service_settings(
        broker.bootstrap, unique("ocsf"), registry=WORLD.registry, finding_format="ocsf",
        finding_update_seconds=0, max_poll_records=1, reorder_window_ms=0,
    )  # fmt: skip
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    service = DetectorService(s)
    task = asyncio.create_task(service.run())
    await wait_until(service.ready, timeout=30)
    values = world_messages(WORLD)
    total = sum(len(decode(v).records) for v in values)
    librdkafka_produce(broker.bootstrap, s.input_topics, values)
    await wait_until(lambda: (p := service.progress())["read"] >= total and p["applied"] >= p["routed"], timeout=60)
    service.stop()
    assert await asyncio.wait_for(task, timeout=30) == 0

    messages = await read_topic(broker.bootstrap, s.findings_topic)
    events = [orjson.loads(m.value) for m in messages]
    assert events
    by_id: dict[str, list[dict[str, Any]]] = {}
    for msg, event in sorted(zip(messages, events), key=lambda pair: (pair[0].partition, pair[0].offset)):
        assert_valid_ocsf(event)
        assert msg.key == event["finding_info"]["uid"].encode() == event["unmapped"]["id"].encode()
        by_id.setdefault(event["finding_info"]["uid"], []).append(event)
    for states in by_id.values():
        assert [e["activity_id"] for e in states] == [1] + [2] * (len(states) - 1)
        counts = [e["count"] for e in states]
        assert counts == sorted(counts)
    assert any(len(states) > 1 for states in by_id.values()), "no finding was updated: the test shows nothing"
    latest = sorted(finding_key(states[-1]["unmapped"]) for states in by_id.values())
    assert latest == sorted(expected_key(e) for e in orjson.loads(WORLD.expected_part2.read_bytes()))  # part two defaults


def test_the_eventbridge_envelope_is_for_guardduty_findings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETECTOR_CONFIG", raising=False)
    monkeypatch.setenv("DETECTOR_FINDING_FORMAT", "OCSF")
    assert load_settings().finding_format == "ocsf"
    monkeypatch.setenv("DETECTOR_EVENTBRIDGE_ENVELOPE", "true")
    with pytest.raises(SettingsError, match="eventbridge_envelope wraps GuardDuty-shaped findings; it cannot be combined with finding_format ocsf"):
        load_settings()
    assert load_settings(overrides={"finding_format": "guardduty"}).eventbridge_envelope is True
    assert Settings.model_fields["finding_format"].default == "guardduty"
