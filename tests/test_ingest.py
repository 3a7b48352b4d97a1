"""`detector ingest` against a real moto server (SQS, S3, SNS) and the real test broker (SPEC §14 "In")."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aws_helpers import FaultProxy, MotoServer, moto, s3_error, sqs_error  # noqa: F401 - moto: fixture
from ingest_support import (
    INSTANCE,
    aws_env,
    big_object,
    ct_record,
    first_message,
    ingest_env,
    log_file,
    drain_queue,
    ingest_settings,
    make_queue,
    new_topic,
    notify_bucket,
    queue_counts,
    sample,
    start_ingest,
    stop_ingest,
)
from kafka_support import (  # noqa: F401 - fixtures
    TcpProxy,
    broker,
    create_topics,
    expected_key,
    finding_key,
    latest_findings,
    proxied_broker,
    read_topic,
    service_settings,
    unique,
    wait_until,
)
from worldgen import make_world, write_world

from detector.embedded import EmbeddedBroker, free_port
from detector.ingest.bodies import event_key, record_key
from detector.service.logging import configure_logging

pytestmark = [pytest.mark.kafka, pytest.mark.aws]

@pytest.fixture
def aws(moto: MotoServer) -> Iterator[MotoServer]:
    with aws_env(moto.url):
        yield moto


def values(messages: list[Any]) -> list[Any]:
    return [orjson.loads(m.value) for m in messages]


# --- end to end ----------------------------------------------------------------------------------


async def test_world_through_s3_sns_and_eventbridge_yields_the_expected_findings(
    broker: EmbeddedBroker, aws: MotoServer, tmp_path: Path
) -> None:
    """Every record of a labelled world reaches the topic through ingest, and `detector run` on that topic
    finds exactly the world's expected findings. CloudTrail log files arrive by S3 -> SQS notifications, the
    bare records as log files through S3 -> SNS -> SQS, the EventBridge lines on their own queue.
    (~15 s: a whole world, one message at a time so that the topic keeps the world's arrival order.)"""
    from detector.service.app import DetectorService

    world = make_world(7)
    write_world(world, tmp_path)
    prefix = unique("ingest-e2e")
    topic = f"{prefix}.cloudtrail"
    await create_topics(broker.bootstrap, {topic: 3})
    s3_queue, s3_dlq = make_queue(aws)
    sns_queue, sns_dlq = make_queue(aws)
    eb_queue, eb_dlq = make_queue(aws)
    notify_bucket(aws, f"{prefix}-trail", s3_queue)
    notify_bucket(aws, f"{prefix}-org-trail", sns_queue, via_sns=True)
    s3, sqs = aws.client("s3"), aws.client("sqs")

    # One message at a time, each input after the previous one is done: the topic gets the world's arrival
    # order, which its expected findings (trust on first use) assume.
    settings = ingest_settings(broker.bootstrap, topic, s3_queue, sns_queue, eb_queue, concurrency=1, max_messages=1)
    logged = io.StringIO()
    configure_logging("debug", "json", stream=logged)
    service, task = await start_ingest(settings)
    expected_values: list[Any] = []
    not_eventbridge = 0
    for n, (name, data) in enumerate(world.inputs):
        key = f"AWSLogs/111122223333/CloudTrail/us-east-1/2026/11/30/111122223333_CloudTrail_us-east-1_{n:02d}.json.gz"
        if name.endswith("cloudtrail.json.gz"):
            s3.put_object(Bucket=f"{prefix}-trail", Key=key, Body=data)
            expected_values += json.loads(gzip.decompress(data))["Records"]
        elif name.endswith("records.jsonl"):
            records = []
            for line in data.splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a malformed line cannot be an element of a log file
            s3.put_object(Bucket=f"{prefix}-org-trail", Key=key, Body=log_file(records))
            expected_values += records
        else:
            lines = [line.decode() for line in data.splitlines() if line.strip()]
            for i in range(0, len(lines), 10):
                batch = [{"Id": str(j), "MessageBody": body} for j, body in enumerate(lines[i : i + 10])]
                sqs.send_message_batch(QueueUrl=eb_queue, Entries=batch)
            for line in lines:
                try:
                    value = json.loads(line)
                except ValueError:
                    value = None
                if isinstance(value, dict) and "detail-type" in value and "detail" in value:
                    expected_values.append(value)
                else:
                    not_eventbridge += 1
        for url in (s3_queue, sns_queue, eb_queue):
            await wait_until(lambda url=url: queue_counts(aws, url) == (0, 0), timeout=60)
    assert not_eventbridge > 0

    assert await stop_ingest(service, task) == 0
    configure_logging("warning", "json", stream=sys.__stderr__)
    log_text = logged.getvalue()
    assert "message_done" in log_text and "message_failed" in log_text
    assert not any(token in log_text for token in world.session_tokens)  # no secret, no body logged
    assert '"eventVersion"' not in log_text and "sourceIPAddress" not in log_text

    messages = await read_topic(broker.bootstrap, topic)
    got = values(messages)
    canon = lambda vs: sorted(orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in vs)  # noqa: E731
    assert canon(got) == canon(expected_values)  # every record, once
    for msg, value in zip(messages, got):
        key = event_key(value) if isinstance(value, dict) and "detail-type" in value else record_key(value)
        assert msg.key == (key.encode() if key else None)
    assert any(m.key for m in messages) and any(m.key is None for m in messages)
    # the bodies that are no EventBridge event went to the dead-letter queue, and nothing else did
    assert len(drain_queue(aws, eb_dlq)) == not_eventbridge
    assert drain_queue(aws, s3_dlq) == [] and drain_queue(aws, sns_dlq) == []
    assert sample(service, "detector_ingest_failures_total", reason="unknown_shape") + sample(
        service, "detector_ingest_failures_total", reason="invalid_json"
    ) == not_eventbridge
    objects = sum(1 for name, _ in world.inputs if name.endswith(("cloudtrail.json.gz", "records.jsonl")))
    assert sample(service, "detector_ingest_objects_total") == objects  # one per log file the world holds
    assert sample(service, "detector_ingest_messages_total", queue=s3_queue.rsplit("/", 1)[1], result="ignored") == 1  # s3:TestEvent

    run = service_settings(
        broker.bootstrap, prefix, input_topics=topic, registry=tmp_path / "registry.json", finding_update_seconds=0.5
    )
    detector = DetectorService(run)
    detector_task = asyncio.create_task(detector.run())
    await wait_until(detector.ready, timeout=30)

    def consumed() -> bool:
        p = detector.progress()
        consumed = detector.metrics.registry.get_sample_value("detector_events_total", {"topic": topic}) or 0
        return consumed >= len(messages) and p["applied"] >= p["routed"]

    await wait_until(consumed, timeout=60)
    detector.stop()
    assert await asyncio.wait_for(detector_task, timeout=30) == 0
    latest = latest_findings(await read_topic(broker.bootstrap, run.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == sorted(expected_key(e) for e in world.expected)


# --- bad input -----------------------------------------------------------------------------------


async def test_bad_bodies_and_objects_go_to_the_redrive_policy_and_good_ones_through(
    broker: EmbeddedBroker, aws: MotoServer
) -> None:
    topic = await new_topic(broker.bootstrap, "ingest-bad")
    url, dlq = make_queue(aws, max_receives=1, visibility=1)
    bucket = unique("bucket")
    s3, sqs = aws.client("s3"), aws.client("sqs")
    s3.create_bucket(Bucket=bucket)

    def note(key: str, bucket: str = bucket) -> str:
        return json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}]})

    s3.put_object(Bucket=bucket, Key="good.json.gz", Body=log_file([ct_record(1), ct_record(2)]))
    s3.put_object(Bucket=bucket, Key="plain.json", Body=json.dumps({"Records": [ct_record(3)]}).encode())
    s3.put_object(Bucket=bucket, Key="text.json.gz", Body=b"this is not gzip and not a CloudTrail log file, only words")
    s3.put_object(Bucket=bucket, Key="bad.json.gz", Body=b"\x1f\x8b\x08\x00" + os.urandom(200))
    s3.put_object(Bucket=bucket, Key="other.json", Body=json.dumps({"Items": [1, 2, 3], "pad": "x" * 80}).encode())
    s3.put_object(Bucket=bucket, Key="truncated.json.gz", Body=log_file([ct_record(9)] * 20)[:-40])
    bad = {
        "not json {": "invalid_json",
        json.dumps({"hello": "world"}): "unknown_shape",
        note("missing.json.gz"): "missing_object",
        note("x.json.gz", bucket="no-such-bucket-" + unique("b")): "missing_object",
        note("text.json.gz"): "not_cloudtrail",
        note("bad.json.gz"): "bad_gzip",
        note("other.json"): "not_cloudtrail",
        note("truncated.json.gz"): "bad_gzip",
    }
    good = [note("good.json.gz"), note("plain.json"), json.dumps({"Event": "s3:TestEvent", "Service": "Amazon S3"})]
    for body in [*bad, *good]:
        sqs.send_message(QueueUrl=url, MessageBody=body)

    # a failed message reaches the dead-letter queue when received again after its visibility timeout: 1 s
    service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url, visibility_timeout_seconds=1))
    await wait_until(lambda: queue_counts(aws, url) == (0, 0) and queue_counts(aws, dlq)[0] == len(bad), timeout=60)
    assert await stop_ingest(service, task) == 0
    assert sorted(drain_queue(aws, dlq)) == sorted(bad)
    reasons: dict[str, int] = {}
    for reason in bad.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        assert sample(service, "detector_ingest_failures_total", reason=reason) == count, reason
    # the good objects' records reached the topic (the truncated one may have produced a prefix first)
    got = [v["eventID"] for v in values(await read_topic(broker.bootstrap, topic))]
    assert {ct_record(n)["eventID"] for n in (1, 2, 3)} <= set(got)
    assert set(got) <= {ct_record(n)["eventID"] for n in (1, 2, 3, 9)}
    name = url.rsplit("/", 1)[1]
    assert sample(service, "detector_ingest_messages_total", queue=name, result="deleted") == 2
    assert sample(service, "detector_ingest_messages_total", queue=name, result="ignored") == 1


async def test_bad_configuration_and_missing_queue_fail_fast(aws: MotoServer) -> None:
    from detector.ingest.bridge import StartupError

    settings = ingest_settings("127.0.0.1:1", "t", f"{aws.url}/123456789012/no-such-queue")
    with pytest.raises(StartupError, match="no-such-queue"):
        await start_ingest(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    proc = subprocess.run([sys.executable, "-m", "detector", "ingest", "--queue-url", "ftp://x"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "queue_urls" in proc.stderr and "ftp://x" in proc.stderr


async def test_a_missing_topic_is_a_start_up_error_naming_the_setting(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """The broker does not create topics on use (auto.create.topics.enable=false, as in production): ingest
    refuses to start rather than receive messages it cannot produce, which would only cycle back to the queue."""
    from detector.ingest.bridge import StartupError

    url, _ = make_queue(aws)
    aws.client("sqs").send_message(QueueUrl=url, MessageBody=json.dumps({"hello": "world"}))
    missing = unique("ingest-missing")
    with pytest.raises(StartupError, match=re.escape(f"topic '{missing}' (the `topic` setting, DETECTOR_TOPIC) does not exist")):
        await start_ingest(ingest_settings(broker.bootstrap, missing, url))
    proc = subprocess.run(
        [sys.executable, "-m", "detector", "ingest"], env=ingest_env(aws.url, broker.bootstrap, missing, url, free_port()),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "start-up error" in proc.stderr and missing in proc.stderr and "DETECTOR_TOPIC" in proc.stderr
    assert queue_counts(aws, url) == (1, 0)  # nothing received


async def test_a_missing_topic_never_makes_ingest_connected(broker: EmbeddedBroker) -> None:
    """The producer that found the topic missing is not kept: /readyz cannot answer 200 while the start-up
    error unwinds (the check above once returned ready before the error surfaced)."""
    from detector.ingest.process import Processor, StartupError

    settings = ingest_settings(broker.bootstrap, unique("ingest-missing"), "https://sqs.us-east-1.amazonaws.com/111122223333/q")
    processor = Processor(settings, None, asyncio.Event(), lambda: None)
    with pytest.raises(StartupError, match="does not exist"):
        await processor.connect()
    assert not processor.connected and processor.producer is None
    await processor.close()


# --- faults --------------------------------------------------------------------------------------


async def test_throttling_is_retried_with_backoff(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """SQS and S3 throttle the first calls: botocore's standard retries absorb it, nothing fails."""
    topic = await new_topic(broker.bootstrap, "ingest-throttle")
    url, _ = make_queue(aws)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    aws.client("s3").put_object(Bucket=bucket, Key="a.json.gz", Body=log_file([ct_record(1)]))
    proxy = FaultProxy(aws.url)
    throttled = [
        proxy.add(sqs_error("ThrottlingException", lambda r: r.action == "ReceiveMessage", times=2)),
        proxy.add(s3_error("SlowDown", 503, lambda r: r.method == "GET" and r.path.startswith(f"/{bucket}/"), times=2)),
    ]
    try:
        with aws_env(proxy.url):
            service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url))
            await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=60)
            assert await stop_ingest(service, task) == 0
    finally:
        proxy.stop()
    assert [fault.served for fault in throttled] == [2, 2]
    assert [v["eventID"] for v in values(await read_topic(broker.bootstrap, topic))] == [ct_record(1)["eventID"]]
    assert sample(service, "detector_ingest_failures_total", reason="throttled") == 0
    assert sample(service, "detector_ingest_receive_errors_total", reason="throttled") == 0


async def test_expired_credentials_and_endless_throttling_give_a_clear_error_then_recover(
    broker: EmbeddedBroker, aws: MotoServer
) -> None:
    """~10 s: two receive backoffs, botocore's retries of S3 with jitter, then a 2 s visibility timeout."""
    topic = await new_topic(broker.bootstrap, "ingest-expired")
    url, dlq = make_queue(aws, max_receives=5, visibility=2)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    drain_queue(aws, url)  # the s3:TestEvent
    proxy = FaultProxy(aws.url)
    mode = {"sqs": "expired", "s3": None}
    forever = 1 << 30
    proxy.add(sqs_error("ExpiredToken", lambda r: r.action == "ReceiveMessage" and mode["sqs"] == "expired", forever, 403))
    in_bucket = lambda r: r.method == "GET" and r.path.startswith(f"/{bucket}/")  # noqa: E731
    proxy.add(s3_error("SlowDown", 503, lambda r: in_bucket(r) and mode["s3"] == "throttled", forever))
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    try:
        with aws_env(proxy.url):
            service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url, visibility_timeout_seconds=2), wait_ready=False)
            await wait_until(lambda: sample(service, "detector_ingest_receive_errors_total", reason="expired_credentials") >= 2, timeout=30)
            assert not service.ready() and service.healthy()
            # credentials renewed; now S3 throttles every call: the message fails, is not deleted, stays in the queue
            mode.update(sqs=None, s3="throttled")
            aws.client("s3").put_object(Bucket=bucket, Key="a.json.gz", Body=log_file([ct_record(1)]))
            await wait_until(lambda: sample(service, "detector_ingest_failures_total", reason="throttled") >= 1, timeout=30)
            assert service.ready()
            assert queue_counts(aws, dlq) == (0, 0)
            mode["s3"] = None  # S3 recovers: the message comes back after its visibility timeout and goes through
            await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=30)
            assert await stop_ingest(service, task) == 0
    finally:
        proxy.stop()
        configure_logging("warning", "json", stream=sys.__stderr__)
    assert [v["eventID"] for v in values(await read_topic(broker.bootstrap, topic))] == [ct_record(1)["eventID"]]
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    receive = [line for line in lines if line["event"] == "receive_failed"]
    assert receive and receive[0]["reason"] == "expired_credentials"
    assert "ExpiredToken" in receive[0]["error"] and "renew" in receive[0]["error"]
    failed = [line for line in lines if line["event"] == "message_failed"]
    assert failed and failed[0]["reason"] == "throttled" and "SlowDown" in failed[0]["error"]
    assert failed[0]["queue"] == url.rsplit("/", 1)[1] and failed[0]["message_id"]


async def test_broker_unreachable_messages_stay_in_the_queue(broker: EmbeddedBroker, aws: MotoServer) -> None:
    topic = await new_topic(broker.bootstrap, "ingest-nobroker")
    url, _ = make_queue(aws)
    sqs = aws.client("sqs")
    event = {"version": "0", "id": "1", "detail-type": "AWS API Call via CloudTrail", "source": "aws.ec2", "detail": ct_record(1)}
    for _ in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))
    proxy = TcpProxy(free_port(), int(broker.bootstrap.rsplit(":", 1)[1]))
    service, task = await start_ingest(ingest_settings(f"127.0.0.1:{proxy.listen_port}", topic, url, retry_max_seconds=1), wait_ready=False)
    try:
        await wait_until(lambda: sample(service, "detector_ingest_broker_errors_total") >= 2, timeout=30)
        assert queue_counts(aws, url) == (3, 0)  # not received while there is no broker to produce to
        await proxy.start()
        await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=60)
    finally:
        assert await stop_ingest(service, task) == 0
        await proxy.cut()
    got = await read_topic(broker.bootstrap, topic)
    assert len(got) == 3 and all(m.key == INSTANCE.encode() for m in got)


async def test_broker_lost_mid_run_messages_stay_until_it_is_back(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """The producer waits for a lost broker (aiokafka retries without end); the messages in work keep their
    visibility renewed, none is deleted or dead-lettered, and they go through once the broker is back."""
    async with proxied_broker(broker) as backend:  # ingest reaches the broker only through the proxy
        topic = await new_topic(backend.direct, "ingest-brokerlost")
        url, dlq = make_queue(aws, max_receives=2)
        sqs = aws.client("sqs")
        event = {"version": "0", "id": "1", "detail-type": "AWS API Call via CloudTrail", "source": "aws.ec2", "detail": ct_record(1)}
        service, task = await start_ingest(ingest_settings(backend.bootstrap, topic, url, visibility_timeout_seconds=2))
        try:
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))
            await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=30)
            await backend.proxy.cut()
            for _ in range(2):
                sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))
            await wait_until(lambda: sample(service, "detector_ingest_messages_in_flight") == 2, timeout=30)
            await asyncio.sleep(5)  # more than twice the visibility timeout
            assert queue_counts(aws, url) == (0, 2) and queue_counts(aws, dlq) == (0, 0)  # in work: not deleted, not dead
            assert sample(service, "detector_ingest_visibility_extensions_total") >= 2
            await backend.proxy.start()
            await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=60)
            assert len(await read_topic(backend.direct, topic)) == 3
        finally:
            assert await stop_ingest(service, task) == 0
    assert queue_counts(aws, dlq) == (0, 0)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_oversized_object_streamed_in_bounded_memory_and_sigterm_drains(
    broker: EmbeddedBroker, aws: MotoServer, tmp_path: Path
) -> None:
    """A 150 MB (decompressed) log file through `detector ingest` in a child process: its peak RSS stays far
    below the object; SIGTERM mid-object lets the message finish (all records acknowledged, then deleted)."""
    topic = await new_topic(broker.bootstrap, "ingest-big")
    url, _ = make_queue(aws)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    records, pad = 3000, 50_000
    data = big_object(records, pad)
    aws.client("s3").put_object(Bucket=bucket, Key="big.json.gz", Body=data)
    port = free_port()
    log = (tmp_path / "out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "detector", "ingest"],
        env=ingest_env(aws.url, broker.bootstrap, topic, url, port, DETECTOR_MAX_MESSAGE_BYTES="1000000"),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await wait_until(lambda: queue_counts(aws, url)[1] == 1, timeout=30)  # the big object's message in work
        baseline = peak_rss(proc.pid)  # the process started, imported everything, connected
        # at once: since ingest cuts records in bulk, the whole object can be done within a second
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: queue_counts(aws, url) == (0, 0) or proc.poll() is not None, timeout=120)
        rss = peak_rss(proc.pid) if proc.poll() is None else None
        assert proc.wait(timeout=60) == 0, (tmp_path / "out").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert queue_counts(aws, url) == (0, 0)
    got = await read_topic(broker.bootstrap, topic)
    assert len(got) == records and len({orjson.loads(m.value)["eventID"] for m in got}) == records
    size = records * pad
    if rss is not None:
        assert rss - baseline < size / 5, (baseline, rss, size)
    output = (tmp_path / "out").read_text()
    assert "draining" in output and "padding" not in output  # no body or record logged


async def test_sigkill_mid_message_is_redelivered_after_the_visibility_timeout(
    broker: EmbeddedBroker, aws: MotoServer, tmp_path: Path
) -> None:
    topic = await new_topic(broker.bootstrap, "ingest-kill")
    url, dlq = make_queue(aws, max_receives=3)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    records = 20_000
    aws.client("s3").put_object(Bucket=bucket, Key="big.json.gz", Body=big_object(records, 2000))
    log = (tmp_path / "out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "detector", "ingest"],
        env=ingest_env(aws.url, broker.bootstrap, topic, url, free_port(), DETECTOR_VISIBILITY_TIMEOUT_SECONDS="3"),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await first_message(broker.bootstrap, topic)  # it is producing the object's records
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sum(queue_counts(aws, url)) == 1  # not deleted
    partial = len(await read_topic(broker.bootstrap, topic, idle=0.5))
    assert partial < records, "the kill came too late to be mid-message"
    service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url))
    await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=60)
    assert await stop_ingest(service, task) == 0
    got = await read_topic(broker.bootstrap, topic)
    ids = [orjson.loads(m.value)["eventID"] for m in got]
    assert len(set(ids)) == records and len(ids) == partial + records  # the redelivery repeats the first part
    assert queue_counts(aws, dlq) == (0, 0)


async def test_visibility_is_renewed_while_a_message_is_in_work(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """S3 answers slower than the visibility timeout: the heartbeat keeps the message invisible, so it is
    received once and produced once."""
    topic = await new_topic(broker.bootstrap, "ingest-slow")
    url, _ = make_queue(aws, max_receives=5)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    drain_queue(aws, url)
    proxy = FaultProxy(aws.url)
    proxy.delay = lambda r: 5.0 if r.method == "GET" and r.path.startswith(f"/{bucket}/") else 0.0
    try:
        with aws_env(proxy.url):
            service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url, visibility_timeout_seconds=2))
            aws.client("s3").put_object(Bucket=bucket, Key="a.json.gz", Body=log_file([ct_record(1)]))
            await wait_until(lambda: sample(service, "detector_ingest_oldest_message_age_seconds") > 2.5, timeout=30)
            assert sample(service, "detector_ingest_messages_in_flight") == 1
            await wait_until(lambda: sample(service, "detector_ingest_objects_total") == 1, timeout=30)
            assert sample(service, "detector_ingest_oldest_message_age_seconds") == 0
            await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=30)
            assert await stop_ingest(service, task) == 0
    finally:
        proxy.stop()
    assert sample(service, "detector_ingest_visibility_extensions_total") >= 2
    assert len(await read_topic(broker.bootstrap, topic)) == 1
    assert sum(1 for r in proxy.seen if r.action == "ReceiveMessage") >= 1
    assert sample(service, "detector_ingest_failures_total", reason="aws_error") == 0


async def test_http_endpoints_and_metric_names(broker: EmbeddedBroker, aws: MotoServer) -> None:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = make_queue(aws)
    service, task = await start_ingest(ingest_settings(broker.bootstrap, await new_topic(broker.bootstrap, "ingest-http"), url))
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{service.http.port}"
            for path in ("/healthz", "/readyz"):
                async with http.get(base + path) as answer:
                    assert answer.status == 200, path
            async with http.get(base + "/metrics") as answer:
                text = await answer.text()
        service.stop()
        assert not service.ready()
    finally:
        assert await asyncio.wait_for(task, timeout=30) == 0
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("messages", "records", "objects", "object_bytes", "failures", "receive_errors"):
        assert families[f"detector_ingest_{name}"].type == "counter", name  # exposed as detector_ingest_<name>_total
    assert families["detector_ingest_oldest_message_age_seconds"].type == "gauge"
    assert all(name.startswith("detector_ingest_") for name in families)
    reasons = {s.labels["reason"] for s in families["detector_ingest_failures"].samples if "reason" in s.labels}
    assert {"invalid_json", "unknown_shape", "missing_object", "not_cloudtrail", "bad_gzip", "throttled", "kafka_error"} <= reasons


async def test_events_through_a_real_eventbridge_rule_with_the_templates_pattern(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """moto's EventBridge delivers to the queue through a rule whose pattern is deploy/aws's; ingest produces
    the CloudTrail event and the state-change notification keyed by instance, and the rule drops the rest."""
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(str(Path(__file__).resolve().parents[1] / "deploy" / "aws" / "eventbridge-queue.yaml"))
    pattern = json.loads(json.dumps(template["Resources"]["Rule"]["Properties"]["EventPattern"]))
    topic = await new_topic(broker.bootstrap, "ingest-eb")
    url, _ = make_queue(aws)
    events, sqs = aws.client("events"), aws.client("sqs")
    rule = unique("rule")
    events.put_rule(Name=rule, EventPattern=json.dumps(pattern))
    events.put_targets(Rule=rule, Targets=[{"Id": "ingest", "Arn": sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]}])
    other = "i-0fedcba987654321f"
    events.put_events(
        Entries=[
            {"Source": "aws.ec2", "DetailType": "AWS API Call via CloudTrail", "Detail": json.dumps(ct_record(1))},
            {"Source": "aws.ec2", "DetailType": "EC2 Instance State-change Notification", "Detail": json.dumps({"instance-id": other, "state": "stopped"})},
            {"Source": "aws.ec2", "DetailType": "EC2 Spot Instance Interruption Warning", "Detail": json.dumps({"instance-id": other})},
        ]
    )
    service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url))
    await wait_until(lambda: sample(service, "detector_ingest_records_total", source="eventbridge") == 2, timeout=30)
    await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=30)
    assert await stop_ingest(service, task) == 0
    got = {json.loads(m.value)["detail-type"]: m.key for m in await read_topic(broker.bootstrap, topic)}
    assert got == {"AWS API Call via CloudTrail": INSTANCE.encode(), "EC2 Instance State-change Notification": other.encode()}


def test_queue_url_flag_repeats_and_adds_to_the_setting(aws: MotoServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    first = f"{aws.url}/123456789012/first-missing"
    argv = [sys.executable, "-m", "detector", "ingest", "--queue-url", first, "--queue-url", "ftp://second", "--kafka-bootstrap", "127.0.0.1:1"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ftp://second" in proc.stderr  # the second URL was read too
    env["DETECTOR_QUEUE_URLS"] = first
    argv = argv[:4] + ["--queue-url", f"{aws.url}/123456789012/second-missing", "--kafka-bootstrap", "127.0.0.1:1"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    # flags override the environment, as for every setting
    assert proc.returncode == 2 and "start-up error" in proc.stderr and "second-missing" in proc.stderr
    assert "first-missing" not in proc.stderr


async def test_sigterm_during_a_broker_outage_exits_within_the_grace_period(broker: EmbeddedBroker, aws: MotoServer) -> None:
    async with proxied_broker(broker) as backend:
        topic = await new_topic(backend.direct, "ingest-outage-stop")
        url, dlq = make_queue(aws, max_receives=2)
        service, task = await start_ingest(ingest_settings(backend.bootstrap, topic, url, grace_seconds=2, visibility_timeout_seconds=3))
        await backend.proxy.cut()
        event = {"version": "0", "id": "1", "detail-type": "AWS API Call via CloudTrail", "source": "aws.ec2", "detail": ct_record(1)}
        aws.client("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(event))
        await wait_until(lambda: sample(service, "detector_ingest_messages_in_flight") == 1, timeout=30)
        started = time.monotonic()
        assert await stop_ingest(service, task) == 0
        assert time.monotonic() - started < 10
        assert sample(service, "detector_ingest_failures_total", reason="shutdown") == 1
        assert sum(queue_counts(aws, url)) == 1 and queue_counts(aws, dlq) == (0, 0)  # left to the queue


async def test_deletes_go_in_batches_and_each_message_answers_for_itself(aws: MotoServer) -> None:
    """Messages done together share a DeleteMessageBatch call; an entry SQS refuses (a receipt handle that
    is no longer valid) fails its own delete only, as DeleteMessage would, and the others are gone."""
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError

    from detector.ingest.bridge import _Deleter

    url, _ = make_queue(aws)
    sqs = aws.client("sqs")
    for n in range(12):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{n}")
    receipts: list[str] = []
    while len(receipts) < 12:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60).get("Messages", [])
        receipts += [m["ReceiptHandle"] for m in got]
    async with get_session().create_client("sqs") as client:
        deleter = _Deleter(client, url)
        results = await asyncio.gather(*(deleter.delete(r) for r in [*receipts, "not-a-receipt-handle"]), return_exceptions=True)
    assert results[:12] == [None] * 12
    assert isinstance(results[12], ClientError) and results[12].operation_name == "DeleteMessageBatch"
    assert queue_counts(aws, url) == (0, 0)
