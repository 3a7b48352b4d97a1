"""The test broker itself: Apache Kafka's version is the one the deployment files name, the session
did not fall back silently, and the helpers give Apache Kafka's own answers."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from apache_kafka import KAFKA_VERSION, POM
from kafka_support import (  # noqa: F401 - fixtures
    broker,
    broker_choice,
    create_topics,
    end_offsets,
    librdkafka_produce,
    planned_broker,
    read_topic,
    unique,
)

REPO = Path(__file__).resolve().parents[1]


def test_compose_kubernetes_and_pom_name_the_tested_kafka_version() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    images = {name: svc["image"] for name, svc in compose["services"].items() if "apache/kafka" in str(svc.get("image"))}
    assert images and set(images.values()) == {f"apache/kafka:{KAFKA_VERSION}"}, images
    assert f"apache/kafka:{KAFKA_VERSION}" in (REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    prop = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    assert prop is not None and prop.text == KAFKA_VERSION
    assert f"Apache Kafka {KAFKA_VERSION}" in (REPO / "README.md").read_text()


def test_the_header_line_names_the_broker() -> None:
    line = planned_broker()
    assert re.match(rf"(Apache Kafka {re.escape(KAFKA_VERSION)} |tansu )", line), line


@pytest.mark.kafka
async def test_session_broker_is_the_one_asked_for_and_answers_end_offsets_exactly(broker: Any) -> None:
    if broker_choice() == "kafka":
        assert broker.real and broker.version == KAFKA_VERSION, "DETECTOR_TEST_BROKER=kafka must not fall back"
    topic = unique("ends")
    await create_topics(broker.bootstrap, {topic: 2})
    values = [f"v{i}".encode() for i in range(25)]
    librdkafka_produce(broker.bootstrap, topic, values, keys=[f"k{i % 5}".encode() for i in range(25)])
    ends = await end_offsets(broker.bootstrap, topic, 2)
    records = await read_topic(broker.bootstrap, topic)
    assert sum(ends.values()) == len(records) == len(values)
    assert sorted(m.value for m in records) == sorted(values)
