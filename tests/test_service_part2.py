"""SPEC part two in ``detector run`` against the real Kafka-protocol broker: lifecycle records routed by
instance ID (one copy per instance of a multi-instance ``StopInstances``), and lifecycle state surviving a
SIGKILL through the changelog."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from kafka_support import (  # noqa: F401 - fixtures
    broker,
    create_topics,
    latest_findings,
    librdkafka_produce,
    read_topic,
    unique,
    wait_until,
)
from test_state import Process, _record, settings_for

from detector.core.engine import AFTER_STOP
from detector.embedded import EmbeddedBroker

pytestmark = pytest.mark.kafka

I = "i-0123456789abcdef0"
J = "i-0fedcba9876543210"


def _stop(instances: list[str], at: str) -> bytes:
    items = {"items": [{"instanceId": i} for i in instances]}
    return orjson.dumps(
        {
            "eventVersion": "1.08",
            "userIdentity": {"type": "IAMUser", "arn": "arn:aws:iam::111122223333:user/ops", "accountId": "111122223333"},
            "eventTime": at,
            "eventSource": "ec2.amazonaws.com",
            "eventName": "StopInstances",
            "awsRegion": "us-east-1",
            "sourceIPAddress": "198.51.100.7",
            "requestParameters": {"instancesSet": items},
            "responseElements": {"instancesSet": items},
            "eventID": f"stop-{at}",
        }
    )


def _state_change(instance: str, state: str, at: str) -> bytes:
    return orjson.dumps(
        {
            "version": "0",
            "id": f"sc-{instance}-{at}",
            "detail-type": "EC2 Instance State-change Notification",
            "source": "aws.ec2",
            "account": "111122223333",
            "time": at,
            "region": "us-east-1",
            "resources": [],
            "detail": {"instance-id": instance, "state": state},
        }
    )


async def _applied(proc: Process, n: int) -> bool:
    return (await proc.metrics()).get("detector_detect_records_total", 0) >= n


async def test_lifecycle_state_survives_sigkill(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Stop of I and J (one record), J started again (a state-change event), SIGKILL; after the restart
    I's old credentials in use are AfterInstanceStopped, J's records are not."""
    own = "3.225.16.109"  # an AWS address: the first-use baseline, no §5 finding
    registry = tmp_path / "registry.json"
    registry.write_text('{"accounts": {}}')
    s = settings_for(broker.bootstrap, unique("life"), registry)
    await create_topics(broker.bootstrap, {s.input_topics: 2})
    log = tmp_path / "detector.log"
    proc = Process(s, log)
    try:
        await wait_until(proc.ready, timeout=60)
        librdkafka_produce(
            broker.bootstrap,
            s.input_topics,
            [
                _record(I, own, "2026-11-01T10:00:00Z", "e1"),
                _record(J, own, "2026-11-01T10:00:00Z", "e2"),
                _stop([I, J], "2026-11-01T10:10:00Z"),
                _state_change(J, "running", "2026-11-01T10:20:00Z"),
            ],
        )

        async def applied_and_committed() -> bool:
            values = await proc.metrics()
            # 2 session records + 2 routed copies of the stop + the state change
            return values.get("detector_detect_records_total", 0) >= 5 and values.get("detector_commits_total", 0) >= 2

        await wait_until(applied_and_committed, timeout=60)
        await asyncio.sleep(1.0)
        proc.kill()
        proc = Process(s, log)
        await wait_until(proc.ready, timeout=60)
        librdkafka_produce(
            broker.bootstrap,
            s.input_topics,
            [
                _record(I, own, "2026-11-01T10:30:00Z", "e3"),  # I stopped at 10:10 and never started
                _record(J, own, "2026-11-01T10:30:00Z", "e4"),  # J started at 10:20; the key is from before its stop
            ],
        )

        async def flagged() -> bool:
            return (await proc.metrics()).get("detector_findings_total", 0) >= 1

        await wait_until(flagged, timeout=60)
        await wait_until(lambda: _applied(proc, 2), timeout=30)  # J's record too
        await asyncio.sleep(0.5)
        # nothing of the first run was consumed again: the stop and start came back from the changelog
        assert (await proc.metrics()).get("detector_detect_records_total") == 2
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
    assert log.read_text().count("state_restored") >= 2
    latest = list(latest_findings(await read_topic(broker.bootstrap, s.findings_topic)).values())
    by_instance = {(f["type"], f["resource"]["instanceDetails"]["instanceId"]): f for f in latest}
    finding = by_instance.pop((AFTER_STOP, I))
    info = finding["service"]["additionalInfo"]
    assert (info["instanceState"], info["stoppedAt"], info["clause"]) == ("stopped", "2026-11-01T10:10:00Z", "a")
    assert info["accessKeyFirstSeen"] == "2026-11-01T10:00:00Z"  # the key's first sighting survived too
    # J's key was known before its stop (10:00 <= 10:10) and J started again: clause b says it is a finding
    # as well — the same key from before the stop, in use after the restart.
    j = by_instance.pop((AFTER_STOP, J))
    assert j["service"]["additionalInfo"]["clause"] == "b"
    assert j["service"]["additionalInfo"]["startedAt"] == "2026-11-01T10:20:00Z"
    assert by_instance == {}


async def test_lifecycle_state_moves_with_its_partition_on_rebalance(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """One StopInstances of six instances, routed to each instance's partition; a second service joins and
    takes partitions with their lifecycle entries; every instance's old credentials are then flagged once."""
    from test_state import caught_up, total_records

    from detector.service.app import DetectorService

    own = "3.225.16.109"
    instances = [f"i-0{n:016x}" for n in range(1, 7)]
    registry = tmp_path / "registry.json"
    registry.write_text('{"accounts": {}}')
    s = settings_for(broker.bootstrap, unique("life-rebalance"), registry)
    await create_topics(broker.bootstrap, {s.input_topics: 2})
    first = [_record(i, own, "2026-11-01T10:00:00Z", f"a{i}") for i in instances]
    first += [_stop(instances, "2026-11-01T10:10:00Z"), _state_change(instances[1], "running", "2026-11-01T10:20:00Z")]
    a = DetectorService(s)
    task_a = asyncio.create_task(a.run())
    await wait_until(a.ready, timeout=60)
    librdkafka_produce(broker.bootstrap, s.input_topics, first)
    await wait_until(lambda: caught_up([a], total_records(first)), timeout=60)
    assert sum(len(st.lifecycle) for st in a.detect.states.values()) == 6  # one entry per instance, no copies

    b = DetectorService(s)  # joins: partitions move to it with their state
    task_b = asyncio.create_task(b.run())
    await wait_until(lambda: b.ready() and a.ready() and bool(b.detect.states), timeout=60)
    entries = [bits for svc in (a, b) for st in svc.detect.states.values() for bits in st.lifecycle]
    assert len(entries) == len(set(entries)) == 6 and any(st.lifecycle for st in b.detect.states.values())
    later = [_record(i, own, "2026-11-01T10:30:00Z", f"b{i}") for i in instances]
    librdkafka_produce(broker.bootstrap, s.input_topics, later)
    await wait_until(lambda: caught_up([a, b], total_records(first + later)), timeout=60)
    for svc in (a, b):
        svc.stop()
    assert await asyncio.gather(task_a, task_b) == [0, 0]
    latest = list(latest_findings(await read_topic(broker.bootstrap, s.findings_topic)).values())
    assert sorted((f["type"], f["resource"]["instanceDetails"]["instanceId"]) for f in latest) == [
        (AFTER_STOP, i) for i in instances
    ]
    clauses = {f["resource"]["instanceDetails"]["instanceId"]: f["service"]["additionalInfo"]["clause"] for f in latest}
    assert clauses == {i: ("b" if i == instances[1] else "a") for i in instances}
