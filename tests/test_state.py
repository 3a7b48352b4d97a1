"""State that survives crashes, restarts and rebalances; scale-out across instances (issue 4).

Everything here runs against the real Kafka-protocol test broker: services in-process where a test
needs to look inside, and ``python -m detector run`` subprocesses where it must be killed for real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from kafka_support import (  # noqa: F401 - fixtures
    DetectorProcess,
    broker,
    committed_offsets,
    create_topics,
    end_offsets,
    finding_key,
    latest_findings,
    librdkafka_produce,
    read_topic,
    service_settings,
    unique,
    wait_until,
)
from worldgen import finding_group_key, make_world

from detector.core.engine import INSIDE_AWS, session_parts
from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService, StartupError
from detector.service.settings import Settings

pytestmark = pytest.mark.kafka


def expected_keys(world: Any) -> list[tuple[Any, ...]]:
    return sorted(
        (e["type"], e["accountId"], e["instanceId"], e["remoteAccountId"] or "", e["severity"], e["count"])
        for e in world.expected
    )


def settings_for(bootstrap: str, prefix: str, registry: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "registry": registry, "finding_update_seconds": 0.5, "grace_seconds": 10, "state_partitions": 4,
    }  # fmt: skip
    return service_settings(bootstrap, prefix, **(defaults | overrides))


def world_registry(world: Any, tmp_path: Path) -> Path:
    path = tmp_path / f"registry-{world.seed}.json"
    path.write_bytes(orjson.dumps(world.registry))
    return path


def total_records(messages: list[bytes]) -> int:
    from detector.core.records import decode

    return sum(len(decode(m).records) for m in messages)


async def caught_up(services: list[DetectorService], records: int) -> bool:
    read = sum(s.progress()["read"] for s in services)
    routed = sum(s.progress()["routed"] for s in services)
    applied = sum(s.progress()["applied"] for s in services)
    return read >= records and applied >= routed


async def run_world_through(services_count: int, world: Any, broker: EmbeddedBroker, tmp_path: Path) -> list[tuple[Any, ...]]:
    latest = await world_findings(services_count, world, broker, tmp_path)
    return sorted(finding_key(f) for f in latest)


async def world_findings(services_count: int, world: Any, broker: EmbeddedBroker, tmp_path: Path, **overrides: Any) -> list[dict[str, Any]]:
    """The latest state of every finding after ``services_count`` services consumed the world, unkeyed."""
    prefix = unique(f"scale{services_count}")
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path), **overrides)
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    services = [DetectorService(s) for _ in range(services_count)]
    tasks = [asyncio.create_task(svc.run()) for svc in services]
    # a settled group: every instance owns input and state partitions (on Apache Kafka the second member's
    # join takes a heartbeat or two to reach the first; a world produced before that is done before it)
    await wait_until(lambda: all(svc.ready() and svc.route.assigned and svc.detect.assigned for svc in services), timeout=60)
    messages = world.messages()
    librdkafka_produce(broker.bootstrap, s.input_topics, messages)  # unkeyed, like an EventBridge bridge
    await wait_until(lambda: caught_up(services, total_records(messages)), timeout=90)
    if services_count > 1:
        assert all(svc.detect.assigned for svc in services), "both instances own state partitions"
    for svc in services:
        svc.stop()
    assert await asyncio.gather(*tasks) == [0] * services_count
    return list(latest_findings(await read_topic(broker.bootstrap, s.findings_topic)).values())


async def test_two_instances_with_unkeyed_input_equal_one(broker: EmbeddedBroker, tmp_path: Path) -> None:
    world = make_world(seed=41, n_accounts=4, instances_per_account=5)
    one = await run_world_through(1, world, broker, tmp_path)
    two = await run_world_through(2, world, broker, tmp_path)
    assert one == expected_keys(world)
    assert two == one


async def test_generated_world_keyed_by_session_equals_replay(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Issue 3's acceptance shape: a librdkafka producer keyed by session; the topic's latest state is replay's answer."""
    world = make_world(seed=7)
    prefix = unique("keyed")
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path))
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    messages = world.messages()
    keys = []
    for value in messages:
        try:
            parsed = orjson.loads(value)
            record = parsed.get("detail", parsed) if isinstance(parsed, dict) else None
            parts = session_parts(record) if isinstance(record, dict) else None
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            parts = None
        keys.append(parts[0].encode() if parts else None)
    service = DetectorService(s)
    task = asyncio.create_task(service.run())
    await wait_until(service.ready, timeout=60)
    librdkafka_produce(broker.bootstrap, s.input_topics, messages, keys=keys)
    await wait_until(lambda: caught_up([service], total_records(messages)), timeout=90)
    service.stop()
    assert await task == 0
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == expected_keys(world)


async def test_instance_joining_and_leaving_mid_stream(broker: EmbeddedBroker, tmp_path: Path) -> None:
    world = make_world(seed=99, n_accounts=4, instances_per_account=5)
    prefix = unique("join")
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path))
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    messages = world.messages()
    thirds = [messages[: len(messages) // 3], messages[len(messages) // 3 : 2 * len(messages) // 3], messages[2 * len(messages) // 3 :]]
    a = DetectorService(s)
    task_a = asyncio.create_task(a.run())
    await wait_until(a.ready, timeout=60)
    librdkafka_produce(broker.bootstrap, s.input_topics, thirds[0])
    await wait_until(lambda: caught_up([a], total_records(thirds[0])), timeout=60)

    b = DetectorService(s)  # joins: partitions move to it with their state
    task_b = asyncio.create_task(b.run())
    await wait_until(lambda: b.ready() and a.ready() and bool(b.detect.states), timeout=60)
    librdkafka_produce(broker.bootstrap, s.input_topics, thirds[1])
    await wait_until(lambda: caught_up([a, b], total_records(thirds[0] + thirds[1])), timeout=60)

    b.stop()  # leaves: its partitions come back to a, restored from the changelog
    assert await task_b == 0
    await wait_until(lambda: a.ready() and len(a.detect.states) == s.state_partitions, timeout=60)
    librdkafka_produce(broker.bootstrap, s.input_topics, thirds[2])
    await wait_until(lambda: caught_up([a, b], total_records(messages)), timeout=60)
    a.stop()
    assert await task_a == 0
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == expected_keys(world)


async def test_restart_restores_every_session(broker: EmbeddedBroker, tmp_path: Path) -> None:
    world = make_world(seed=5)
    prefix = unique("restore")
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path))
    await create_topics(broker.bootstrap, {s.input_topics: 2})
    first = DetectorService(s)
    task = asyncio.create_task(first.run())
    await wait_until(first.ready, timeout=60)
    messages = world.messages()
    librdkafka_produce(broker.bootstrap, s.input_topics, messages)
    await wait_until(lambda: caught_up([first], total_records(messages)), timeout=60)
    first.stop()
    assert await task == 0
    before = {p: {k: v.to_data() for k, v in st.sessions.items()} for p, st in first.states.items()}
    groups = {p: {k: v.to_data() for k, v in st.groups.items()} for p, st in first.states.items()}
    assert sum(len(v) for v in before.values()) > 0

    second = DetectorService(s)
    task = asyncio.create_task(second.run())
    await wait_until(lambda: second.ready() and len(second.states) == s.state_partitions, timeout=60)
    after = {p: {k: v.to_data() for k, v in st.sessions.items()} for p, st in second.states.items()}
    assert after == before
    assert {p: {k: v.to_data() for k, v in st.groups.items()} for p, st in second.states.items()} == groups
    second.stop()
    assert await task == 0


async def test_mismatched_internal_partition_counts_fail_clearly(broker: EmbeddedBroker, tmp_path: Path) -> None:
    prefix = unique("mismatch")
    world = make_world(seed=1)
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path), state_partitions=4)
    await create_topics(broker.bootstrap, {s.sessions_topic_name: 4, s.changelog_topic_name: 2})
    service = DetectorService(s)
    with pytest.raises(StartupError, match=r"has 4 partitions but changelog_topic .* has 2"):
        await asyncio.wait_for(service.run(), timeout=30)


# --- killed for real: subprocesses and SIGKILL ---------------------------------------------------------


Process = DetectorProcess  # ``python -m detector run`` on the test's settings, watched through /metrics


async def test_sigkill_three_times_mid_stream_loses_no_finding(broker: EmbeddedBroker, tmp_path: Path) -> None:
    world = make_world(seed=2024, n_accounts=3, instances_per_account=5)
    prefix = unique("kill")
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path), finding_update_seconds=0.2)
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    messages = world.messages()
    chunks = [messages[i * len(messages) // 4 : (i + 1) * len(messages) // 4] for i in range(4)]
    log = tmp_path / "detector.log"
    proc = Process(s, log)
    try:
        for i, chunk in enumerate(chunks):
            await wait_until(proc.ready, timeout=60)
            before = (await proc.metrics()).get("detector_events_total", 0)
            librdkafka_produce(broker.bootstrap, s.input_topics, chunk)
            if i < 3:  # killed mid-stream, as soon as it has started on this chunk
                await wait_until(lambda: _progressed(proc, before), timeout=60, interval=0.02)
                proc.kill()
                proc = Process(s, log)
        # the last process reads only what was never committed: wait for both stages to drain, i.e. to
        # have committed every offset of the input and of the sessions topic
        async def drained() -> bool:
            for topic, group, n in ((s.input_topics, s.group_id, 3), (s.sessions_topic_name, s.detect_group_id, s.state_partitions)):
                done = await committed_offsets(broker.bootstrap, group, topic, n)
                if {p: c or 0 for p, c in done.items()} != await end_offsets(broker.bootstrap, topic, n):
                    return False
            return True

        await wait_until(drained, timeout=90, interval=0.5)
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    # By finding group: an instance may have two sessions (its role's and `aws:ec2-instance`'s, SPEC §10).
    got = {finding_group_key(f): (f["severity"], f["service"]["count"]) for f in latest.values()}
    for group in world.groups:
        key = world.group_key(group)
        assert key in got, f"finding lost across SIGKILLs: {key}"
        assert got[key][0] == group.severity, key
        assert got[key][1] >= group.count, f"count went down for {key}: {got[key][1]} < {group.count}"
    assert len(got) == len(world.groups), "no extra finding groups"
    assert log.read_text().count("state_restored") >= 3 * s.state_partitions


async def _progressed(proc: Process, before: float) -> bool:
    return (await proc.metrics()).get("detector_events_total", 0) > before


def _record(instance: str, source: str, at: str, event_id: str) -> bytes:
    return orjson.dumps(
        {
            "eventVersion": "1.08",
            "userIdentity": {
                "type": "AssumedRole",
                "principalId": f"AROAEXAMPLE:{instance}",
                "arn": f"arn:aws:sts::111122223333:assumed-role/app-role/{instance}",
                "accountId": "111122223333",
                "accessKeyId": "ASIAEXAMPLEKEY000001",
            },
            "eventTime": at,
            "eventSource": "s3.amazonaws.com",
            "eventName": "ListBuckets",
            "awsRegion": "us-east-1",
            "sourceIPAddress": source,
            "eventID": event_id,
        }
    )


async def test_trust_on_first_use_baseline_survives_sigkill(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The instance's own AWS address is learnt; after SIGKILL and restart an attacker's AWS address is still flagged."""
    from detector.ipranges import load

    ranges = load()[0]
    own, attacker = "3.225.16.109", "52.45.102.28"
    assert ranges.lookup_text(own) and ranges.lookup_text(attacker)
    registry = tmp_path / "registry.json"
    registry.write_text('{"accounts": {}}')  # home inventory unknown: trust on first use applies
    prefix = unique("tofu")
    s = settings_for(broker.bootstrap, prefix, registry)
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    instance = "i-0123456789abcdef0"
    log = tmp_path / "detector.log"
    proc = Process(s, log)
    try:
        await wait_until(proc.ready, timeout=60)
        librdkafka_produce(broker.bootstrap, s.input_topics, [_record(instance, own, "2026-11-01T10:00:00Z", "e1")])

        async def learnt_and_committed() -> bool:
            values = await proc.metrics()
            return values.get("detector_detect_records_total", 0) >= 1 and values.get("detector_commits_total", 0) >= 2

        await wait_until(learnt_and_committed, timeout=60)

        async def detect_committed_all() -> bool:  # the learnt baseline is behind a committed offset
            done = await committed_offsets(broker.bootstrap, s.detect_group_id, s.sessions_topic_name, s.state_partitions)
            ends = await end_offsets(broker.bootstrap, s.sessions_topic_name, s.state_partitions)
            return sum(ends.values()) >= 1 and {p: c or 0 for p, c in done.items()} == ends

        await wait_until(detect_committed_all, timeout=30, interval=0.2)
        proc.kill()
        proc = Process(s, log)
        await wait_until(proc.ready, timeout=60)
        librdkafka_produce(
            broker.bootstrap,
            s.input_topics,
            [
                _record(instance, own, "2026-11-01T10:05:00Z", "e2"),
                _record(instance, attacker, "2026-11-01T10:06:00Z", "e3"),
            ],
        )

        async def flagged() -> bool:
            return (await proc.metrics()).get("detector_findings_total", 0) >= 1

        await wait_until(flagged, timeout=60)
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
    latest = list(latest_findings(await read_topic(broker.bootstrap, s.findings_topic)).values())
    assert len(latest) == 1
    finding = latest[0]
    assert finding["type"] == INSIDE_AWS and finding["severity"] == 8 and finding["service"]["count"] == 1
    assert finding["service"]["action"]["awsApiCallAction"]["remoteIpDetails"]["ipAddressV4"] == attacker
    assert finding["service"]["additionalInfo"]["baseline"]["firstUseIpv4"] == own


async def test_commit_held_back_mid_batch_restores_exactly_after_sigkill(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A held-back finding update pins its offset; the commit must stop at the *batch* start, else the
    earlier records of that batch — whose changelog records carry the batch's last offset and are skipped
    on restore — would be lost: here, a trust-on-first-use baseline learnt just before the pinned record."""
    from detector.core.engine import OUTSIDE_AWS

    registry = tmp_path / "registry.json"
    registry.write_text('{"accounts": {}}')
    prefix = unique("pinbatch")
    s = settings_for(broker.bootstrap, prefix, registry, finding_update_seconds=3600, state_partitions=1)
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    victim, other = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2"
    own, attacker, outside = "3.225.16.109", "52.45.102.28", "203.0.113.77"
    log = tmp_path / "detector.log"
    proc = Process(s, log)
    try:
        await wait_until(proc.ready, timeout=60)
        # opens an OutsideAWS finding for `other` (published at once)
        librdkafka_produce(broker.bootstrap, s.input_topics, [_record(other, outside, "2026-11-01T10:00:00Z", "a1")])
        await wait_until(lambda: _metric_at_least(proc, "detector_finding_updates_total", 1), timeout=60)
        # one batch: `victim` learns its own address, then `other`'s finding changes (held back: pins)
        librdkafka_produce(
            broker.bootstrap,
            s.input_topics,
            [
                _record(victim, own, "2026-11-01T10:01:00Z", "b1"),
                _record(other, outside, "2026-11-01T10:01:30Z", "b2"),
            ],
        )
        await wait_until(lambda: _metric_at_least(proc, "detector_detect_records_total", 3), timeout=60)
        await asyncio.sleep(1.5)  # commits of the pinned batch have happened
        proc.kill()
        proc = Process(s, log)
        await wait_until(proc.ready, timeout=60)
        librdkafka_produce(broker.bootstrap, s.input_topics, [_record(victim, attacker, "2026-11-01T10:05:00Z", "c1")])
        await wait_until(lambda: _metric_at_least(proc, "detector_detect_records_total", 1), timeout=60)
        assert proc.terminate() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    by_instance = {(f["resource"]["instanceDetails"]["instanceId"], f["type"]): f for f in latest.values()}
    assert by_instance[(other, OUTSIDE_AWS)]["service"]["count"] == 2
    flagged = by_instance.get((victim, INSIDE_AWS))
    assert flagged is not None, "the baseline learnt before the pinned record was lost on restore"
    assert flagged["service"]["action"]["awsApiCallAction"]["remoteIpDetails"]["ipAddressV4"] == attacker


async def _metric_at_least(proc: Process, name: str, value: float) -> bool:
    return (await proc.metrics()).get(name, 0) >= value


async def test_readyz_answers_503_while_a_partition_restores_then_200(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """SPEC §9: /readyz is 200 only once partitions are assigned *and* state is restored."""
    from detector.core import changelog
    from detector.core.engine import Engine
    from detector.core.state import DetectorState

    sessions = 60_000  # a restore long enough to be seen (tens of microseconds per changelog record)
    state = DetectorState(track_changes=True)
    engine = Engine()
    for i in range(sessions):
        engine.apply(state, {
            "eventVersion": "1.10", "eventTime": "2026-05-04T10:00:00Z", "eventName": "GetObject",
            "userIdentity": {"type": "AssumedRole", "arn": f"arn:aws:sts::111122223333:assumed-role/web/i-{i:017x}"},
            "sourceIPAddress": "vpce.amazonaws.com" if i % 2 else "s3.amazonaws.com",
        })  # fmt: skip
    entries = changelog.drain(state)
    assert len(entries) == sessions
    prefix = unique("readyz")
    s = settings_for(broker.bootstrap, prefix, world_registry(make_world(seed=5), tmp_path), state_partitions=1)
    await create_topics(broker.bootstrap, {s.input_topics: 1, s.sessions_topic_name: 1, s.changelog_topic_name: 1})
    librdkafka_produce(broker.bootstrap, s.changelog_topic_name, [v for _, v in entries], keys=[k for k, _ in entries])

    service = DetectorService(s)
    task = asyncio.create_task(service.run())
    seen: list[tuple[int, float]] = []  # (/readyz status, partitions restoring) while starting
    async with aiohttp.ClientSession() as http:
        while True:
            if service.http is not None and service.http.port:
                async with http.get(f"http://127.0.0.1:{service.http.port}/readyz") as resp:
                    seen.append((resp.status, service.metrics.restoring_partitions._value.get()))
                if seen[-1][0] == 200:
                    break
            assert not task.done(), "the service stopped"
            await asyncio.sleep(0.02)
    assert (503, 1.0) in seen, f"never seen not-ready while restoring: {sorted(set(seen))}"
    assert len(service.states[0].sessions) == sessions  # ready means restored
    service.stop()
    assert await task == 0
