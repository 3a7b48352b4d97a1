"""`detector run` against the session's broker (Apache Kafka, else tansu): SPEC §9 end to end."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
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
    proxied_broker,
    read_topic,
    service_settings,
    unique,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from detector.demo import sample_world, world_messages
from detector.embedded import EmbeddedBroker, free_port
from detector.service.app import DetectorService
from detector.service.settings import Settings

pytestmark = pytest.mark.kafka

WORLD = sample_world()
# SPEC part two with its defaults (the IMDSv1 findings of §13 included)
EXPECTED = sorted(expected_key(e) for e in orjson.loads(WORLD.expected_part2.read_bytes()))
SPEC_METRICS = {
    "detector_events_total",
    "detector_events_malformed_total",
    "detector_instance_events_total",
    "detector_findings_total",
    "detector_sessions",
    "detector_event_lag_seconds",
    "detector_processing_seconds",
    "detector_consumer_lag",
}


def settings_for(bootstrap: str, prefix: str, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {"registry": WORLD.registry, "finding_update_seconds": 0.5, "grace_seconds": 10}
    return service_settings(bootstrap, prefix, **(defaults | overrides))


async def start(settings: Settings, cls: type[DetectorService] = DetectorService) -> tuple[DetectorService, asyncio.Task[int]]:
    service = cls(settings)
    task = asyncio.create_task(service.run())
    await wait_until(service.ready, timeout=30)
    return service, task


async def stop(service: DetectorService, task: asyncio.Task[int]) -> int:
    service.stop()
    return await asyncio.wait_for(task, timeout=30)


def world_records_total() -> int:
    from detector.core.records import decode

    return sum(len(decode(v).records) for v in world_messages(WORLD))


async def wait_consumed(service: DetectorService, records: int, timeout: float = 60) -> None:
    """Every input record read by the route stage, and every routed record applied by the detect stage."""

    def done() -> bool:
        p = service.progress()
        return p["read"] >= records and p["applied"] >= p["routed"]

    await wait_until(done, timeout=timeout)


async def test_sample_world_through_kafka_equals_expected(broker: EmbeddedBroker) -> None:
    prefix = unique("e2e")
    s = settings_for(broker.bootstrap, prefix)
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    service, task = await start(s)
    librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD))
    await wait_consumed(service, world_records_total())
    assert await stop(service, task) == 0
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED
    # every input offset committed once its outputs were acknowledged
    assert await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 3) == await end_offsets(
        broker.bootstrap, s.input_topics, 3
    )


async def test_malformed_messages_reach_the_dead_letter_topic(broker: EmbeddedBroker) -> None:
    prefix = unique("dlq")
    s = settings_for(broker.bootstrap, prefix)
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    instance_without_time = orjson.dumps(
        {
            "eventVersion": "1.08",
            "userIdentity": {"type": "AssumedRole", "arn": "arn:aws:sts::111122223333:assumed-role/r/i-0123456789abcdef0"},
            "sourceIPAddress": "203.0.113.9",
        }
    )
    bad = [b"not json", b"[1,2,3]", b'{"Records": 5}', b'{"detail-type": "AWS API Call via CloudTrail", "detail": 3}', instance_without_time, b"\xff\xfe\x00"]
    good = world_messages(WORLD)[:20]
    values = good[:10] + bad + good[10:]
    librdkafka_produce(broker.bootstrap, s.input_topics, values, keys=[f"k{i}".encode() for i in range(len(values))])
    service, task = await start(s)
    await wait_until(lambda: service.metrics.dead_letters._value.get() >= len(bad), timeout=30)
    assert await stop(service, task) == 0
    dead = await read_topic(broker.bootstrap, s.dlq_topic)
    assert sorted(m.value for m in dead) == sorted(bad)
    for msg in dead:
        headers = dict(msg.headers)
        assert headers["detector.source.topic"] == s.input_topics.encode()
        assert headers["detector.source.partition"] == b"0"
        offset = int(headers["detector.source.offset"])
        assert values[offset] == msg.value
        assert msg.key == f"k{offset}".encode()  # original key kept
        assert headers["detector.error.reason"] and headers["detector.error"]
    assert await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 1) == {0: len(values)}


class _DiesBeforeCommit(DetectorService):
    """Publishes findings, then 'dies' before any commit: the worst moment for at-least-once."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)

        async def never(partitions: Any = None) -> None:
            return None

        self.route.commit = never  # type: ignore[method-assign]
        self.detect.commit = never  # type: ignore[method-assign]


async def test_crash_between_publish_and_commit_loses_no_finding(broker: EmbeddedBroker) -> None:
    prefix = unique("crash")
    s = settings_for(broker.bootstrap, prefix)
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD))
    doomed, task = await start(s, _DiesBeforeCommit)
    await wait_consumed(doomed, world_records_total())
    await wait_until(lambda: not doomed.publisher.pending and doomed.metrics.finding_updates._value.get() > 0)
    task.cancel()  # killed: no orderly shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 3) == {0: None, 1: None, 2: None}
    assert set((await committed_offsets(broker.bootstrap, s.detect_group_id, s.sessions_topic_name, 6)).values()) == {None}
    # The findings topic is wiped of nothing; a restarted instance re-reads everything uncommitted.
    service, task = await start(s)
    await wait_consumed(service, world_records_total())
    assert await stop(service, task) == 0
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED


async def test_held_back_updates_pin_the_commit_until_published(broker: EmbeddedBroker) -> None:
    """With a one-hour update interval, offsets that changed an open finding stay uncommitted."""
    prefix = unique("pin")
    # one record per batch, so a group's later records arrive in later batches than the one that opened
    # it whatever the fetch timing (with 10, all of a group's records could share one batch)
    s = settings_for(broker.bootstrap, prefix, finding_update_seconds=3600, max_poll_records=1, reorder_window_ms=0)
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    service, task = await start(s)
    librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD))
    await wait_consumed(service, world_records_total())
    # the detect stage has committed what it may (its loop commits after each batch it settles)
    await wait_until(lambda: service.detect.committed and not service.detect.outbox, timeout=30)
    assert service.publisher.pending, "the sample world updates open findings"
    pins: dict[int, int] = {}
    for _, offsets in service.publisher.pending.values():
        for tp, offset in offsets.items():
            pins[tp.partition] = min(offset, pins.get(tp.partition, offset))
    parts = s.state_partitions
    committed = await committed_offsets(broker.bootstrap, s.detect_group_id, s.sessions_topic_name, parts)
    for partition, pinned in pins.items():
        assert committed[partition] is None or committed[partition] <= pinned
    assert await stop(service, task) == 0  # shutdown publishes the held-back states, then commits
    for topic, group, n in ((s.input_topics, s.group_id, 1), (s.sessions_topic_name, s.detect_group_id, parts)):
        ends = await end_offsets(broker.bootstrap, topic, n)
        done = await committed_offsets(broker.bootstrap, group, topic, n)
        assert {p: done[p] or 0 for p in done} == ends
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED


async def test_registry_hot_reload_keeps_old_on_bad_file(broker: EmbeddedBroker, tmp_path: Path) -> None:
    prefix = unique("reload")
    registry = tmp_path / "registry.json"
    registry.write_bytes(WORLD.registry.read_bytes())
    s = settings_for(broker.bootstrap, prefix, registry=registry, registry_reload_seconds=0.2)
    service, task = await start(s)
    before = service.engine.registry
    data = orjson.loads(registry.read_bytes())
    data["accounts"]["999988887777"] = {"name": "new", "affiliated": True}
    registry.write_bytes(orjson.dumps(data))
    await wait_until(lambda: "999988887777" in service.engine.registry.accounts, timeout=10)
    assert service.engine.registry is not before
    good = service.engine.registry
    registry.write_text('{"accounts": {"12345": {}}}')  # account ID not 12 digits
    await wait_until(lambda: service.metrics.registry_reloads.labels("failure")._value.get() >= 1, timeout=10)
    assert service.engine.registry is good
    os.kill(os.getpid(), 0)  # the process is alive and well
    assert await stop(service, task) == 0


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.text()


async def test_broker_started_late_then_ready_and_processing(broker: EmbeddedBroker) -> None:
    prefix = unique("late")
    async with proxied_broker(broker, start=False) as late:  # nothing listens at late.bootstrap yet
        s = settings_for(late.bootstrap, prefix, startup_retry_max_seconds=1.0)
        service = DetectorService(s)
        task = asyncio.create_task(service.run())
        await wait_until(lambda: service.http is not None and service.http.port != 0 and service.metrics.broker_errors._value.get() >= 2)
        assert (await _get(service.http.port, "/readyz"))[0] == 503
        assert (await _get(service.http.port, "/healthz"))[0] == 200
        await late.proxy.start()  # the broker appears
        await create_topics(late.direct, {s.input_topics: 1})
        await wait_until(service.ready, timeout=30)
        assert (await _get(service.http.port, "/readyz"))[0] == 200
        await asyncio.to_thread(librdkafka_produce, late.direct, s.input_topics, world_messages(WORLD))
        await wait_consumed(service, world_records_total())
        assert await stop(service, task) == 0
        latest = latest_findings(await read_topic(late.direct, s.findings_topic))
        assert sorted(finding_key(f) for f in latest.values()) == EXPECTED


async def test_metrics_endpoint_is_valid_prometheus_text(broker: EmbeddedBroker) -> None:
    prefix = unique("metrics")
    s = settings_for(broker.bootstrap, prefix)
    await create_topics(broker.bootstrap, {s.input_topics: 2})
    service, task = await start(s)
    librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD) + [b"garbage"])
    await wait_consumed(service, world_records_total())

    async def lag_exported() -> str | None:  # after one gauge refresh (every 5 s) with the partitions assigned
        status, text = await _get(service.http.port, "/metrics")
        return text if status == 200 and "\ndetector_consumer_lag{" in text else None

    text = await wait_until(lag_exported, timeout=15, interval=0.2)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families.values()}
    assert SPEC_METRICS <= names, SPEC_METRICS - names
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("detector_events_total", (("topic", s.input_topics),))] == len(world_messages(WORLD)) + 1
    assert samples[("detector_events_malformed_total", (("reason", "invalid_json"),))] >= 1
    assert samples[("detector_instance_events_total", ())] > 0
    assert sum(v for (n, _), v in samples.items() if n == "detector_findings_total") == len(EXPECTED)
    assert samples[("detector_sessions", ())] > 0
    assert any(n == "detector_consumer_lag" for n, _ in samples)
    assert (await _get(service.http.port, "/readyz"))[0] == 200
    assert (await _get(service.http.port, "/healthz"))[0] == 200
    assert await stop(service, task) == 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); text parsed by prometheus_client only")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_sigterm_publishes_pending_commits_and_exits_zero(broker: EmbeddedBroker, tmp_path: Path) -> None:
    prefix = unique("sigterm")
    s = settings_for(broker.bootstrap, prefix, finding_update_seconds=3600)
    asyncio.run(create_topics(broker.bootstrap, {s.input_topics: 3}))
    librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD) + [b"not json"])
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "DETECTOR_KAFKA_BOOTSTRAP": broker.bootstrap,
            "DETECTOR_INPUT_TOPICS": s.input_topics,
            "DETECTOR_FINDINGS_TOPIC": s.findings_topic,
            "DETECTOR_DLQ_TOPIC": s.dlq_topic,
            "DETECTOR_GROUP_ID": s.group_id,
            "DETECTOR_REGISTRY": str(WORLD.registry),
            "DETECTOR_HTTP_PORT": str(port),
            "DETECTOR_FINDING_UPDATE_SECONDS": "3600",
        }
    )
    log = (tmp_path / "stdout").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "detector", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        total = len(world_messages(WORLD)) + 1

        async def consumed() -> bool:
            try:
                _, text = await _get(port, "/metrics")
            except aiohttp.ClientError:
                return False
            values: dict[str, float] = {}
            for fam in text_string_to_metric_families(text):
                for sample in fam.samples:
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
            return (
                values.get("detector_events_total", 0) >= total
                and values.get("detector_detect_records_total", 0) >= values.get("detector_repartitioned_total", 1)
            )

        asyncio.run(wait_until(consumed, timeout=60))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - started < 20
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "stdout").read_text()
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and all("event" in line for line in lines), output[:2000]
    assert "sessionToken" not in output and "IQoJb3JpZ2lu" not in output  # no secret ever logged
    dead = [line for line in lines if line["event"] == "dead_letter"]
    assert len(dead) == 6  # the sample world's 5 malformed inputs and ours, each with its position bound
    for line in dead:
        assert line["topic"] == s.input_topics and line["reason"]
        assert isinstance(line["partition"], int) and isinstance(line["offset"], int)
    latest = latest_findings(asyncio.run(read_topic(broker.bootstrap, s.findings_topic)))
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED  # held-back updates went out
    committed = asyncio.run(committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 3))
    assert committed == asyncio.run(end_offsets(broker.bootstrap, s.input_topics, 3))


async def test_oversized_malformed_message_is_dead_lettered_truncated_and_stream_goes_on(broker: EmbeddedBroker) -> None:
    prefix = unique("big")
    s = settings_for(broker.bootstrap, prefix, max_message_bytes=64 * 1024)
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    huge = b"{" + b"x" * (300 * 1024)  # malformed, larger than the producer may send
    values = [huge] + world_messages(WORLD)[:30]
    librdkafka_produce(broker.bootstrap, s.input_topics, values)
    service, task = await start(s)
    await wait_until(lambda: service.route.committed, timeout=30)
    await wait_until(
        lambda: next(iter(service.route.committed.values())) == len(values), timeout=30
    )  # not wedged on the message it cannot deliver
    assert await stop(service, task) == 0
    dead = await read_topic(broker.bootstrap, s.dlq_topic)
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["detector.truncated"] == str(len(huge)).encode()
    assert headers["detector.source.offset"] == b"0"
    assert huge.startswith(dead[0].value) and 0 < len(dead[0].value) <= 32 * 1024


async def test_broker_lost_mid_run_service_keeps_retrying_and_recovers(broker: EmbeddedBroker) -> None:
    """The network to the broker is cut for a while mid-stream; the service neither crashes nor loses work."""
    async with proxied_broker(broker) as backend:
        prefix = unique("lost")
        s = settings_for(backend.bootstrap, prefix)
        service = DetectorService(s)
        task = asyncio.create_task(service.run())
        try:
            await create_topics(backend.direct, {s.input_topics: 1})
            await wait_until(service.ready, timeout=30)
            messages = world_messages(WORLD)
            half = len(messages) // 2
            # the proxy runs on this loop: produce from a thread
            await asyncio.to_thread(librdkafka_produce, backend.direct, s.input_topics, messages[:half])
            await wait_until(lambda: service.progress()["read"] > 0, timeout=30)
            errors = service.metrics.broker_errors._value.get()
            await backend.proxy.cut()
            # the outage: fetches, produces and commits fail, seen by the service; the loops keep turning
            await wait_until(lambda: service.metrics.broker_errors._value.get() >= errors + 2, timeout=60)
            assert not task.done()
            assert (await _get(service.http.port, "/healthz"))[0] == 200  # unready, but healthy
            assert (await _get(service.http.port, "/readyz"))[0] == 503
            await backend.proxy.start()
            await asyncio.to_thread(librdkafka_produce, backend.direct, s.input_topics, messages[half:])
            await wait_consumed(service, world_records_total(), timeout=120)
            assert await stop(service, task) == 0
            latest = latest_findings(await read_topic(backend.direct, s.findings_topic))
            assert sorted(finding_key(f) for f in latest.values()) == EXPECTED
            committed = await committed_offsets(backend.direct, s.group_id, s.input_topics, 1)
            assert committed == await end_offsets(backend.direct, s.input_topics, 1)
        finally:
            if not task.done():
                service.stop()
                await asyncio.wait_for(task, timeout=30)


async def test_eventbridge_envelope_option_wraps_findings_keyed_by_id(broker: EmbeddedBroker) -> None:
    prefix = unique("envelope")
    s = settings_for(broker.bootstrap, prefix, eventbridge_envelope=True)
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD))
    service, task = await start(s)
    await wait_consumed(service, world_records_total())
    assert await stop(service, task) == 0
    messages = await read_topic(broker.bootstrap, s.findings_topic)
    events = [orjson.loads(m.value) for m in messages]
    assert events and all(e["detail-type"] == "GuardDuty Finding" and e["version"] == "0" for e in events)
    assert all(m.key == e["detail"]["id"].encode() and e["account"] == e["detail"]["accountId"] for m, e in zip(messages, events))
    latest = latest_findings(messages)  # unwraps the envelope
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED
