"""`detector ingest --workers N`: S3 reads, splitting and producing in worker processes (real moto server,
real test broker, real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aws_helpers import MotoServer, moto  # noqa: F401 - moto: fixture
from ingest_support import (
    aws_env,
    big_object,
    ct_record,
    drain_queue,
    ingest_env,
    ingest_settings,
    log_file,
    make_queue,
    new_topic,
    notify_bucket,
    queue_counts,
    sample,
    start_ingest,
    stop_ingest,
)
from kafka_support import broker, read_topic, unique, wait_until  # noqa: F401 - broker: fixture

from detector.embedded import EmbeddedBroker, free_port
from detector.ingest.bodies import record_key
from detector.ingest.bridge import StartupError
from detector.ingest.workers import WorkerPool
from detector.service.partitioning import KeyPartitions

pytestmark = [pytest.mark.kafka, pytest.mark.aws]


@pytest.fixture
def aws(moto: MotoServer) -> Iterator[MotoServer]:
    with aws_env(moto.url):
        yield moto


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


def worker_pids(service: Any) -> list[int]:
    assert isinstance(service.processor, WorkerPool)
    return [w.process.pid for w in service.processor.workers]


async def test_two_workers_produce_every_record_once_keyed_and_counted(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """Log files through S3 notifications and events from an EventBridge queue, with two workers: every record
    on the topic once, with its instance key on the default partitioner's partition; both workers used; the
    metrics count what the workers did; stopping leaves no process behind."""
    topic = await new_topic(broker.bootstrap, "ingest-workers", partitions=3)
    logs_url, _ = make_queue(aws)
    events_url, _ = make_queue(aws)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, logs_url)
    s3, sqs = aws.client("s3"), aws.client("sqs")
    expected: dict[str, dict[str, Any]] = {}
    stored = 0
    for f in range(8):
        records = [ct_record(f * 100 + n, instance=f"i-{(f * 7 + n) % 5:017x}") for n in range(40)]
        records.append(ct_record(f * 100 + 99, userIdentity={"type": "IAMUser", "arn": "arn:aws:iam::111122223333:user/alice"}))
        expected |= {r["eventID"]: r for r in records}
        body = log_file(records)
        stored += len(body)
        s3.put_object(Bucket=bucket, Key=f"AWSLogs/111122223333/CloudTrail/us-east-1/2026/11/30/f{f}.json.gz", Body=body)
    for n in range(3):
        record = ct_record(9000 + n, instance="i-0000000000000000e")
        expected[record["eventID"]] = record
        sqs.send_message(QueueUrl=events_url, MessageBody=json.dumps({"source": "aws.ec2", "detail-type": "AWS API Call via CloudTrail", "detail": record}))

    service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, logs_url, events_url, workers=2, concurrency=8))
    pids = worker_pids(service)
    assert len(pids) == 2 and all(map(alive, pids)) and os.getpid() not in pids
    await wait_until(lambda: queue_counts(aws, logs_url) == (0, 0) and queue_counts(aws, events_url) == (0, 0), timeout=60)
    await wait_until(lambda: sample(service, "detector_ingest_records_total", source="s3") == 8 * 41, timeout=10)
    assert sample(service, "detector_ingest_records_total", source="eventbridge") == 3
    assert sample(service, "detector_ingest_objects_total") == 8
    assert sample(service, "detector_ingest_object_bytes_total") == stored
    assert sample(service, "detector_ingest_json_bytes_total") > stored
    assert sample(service, "detector_ingest_failures_total", reason="worker_lost") == 0
    assert all(w.handled > 0 for w in service.processor.workers), [w.handled for w in service.processor.workers]
    assert sample(service, "detector_ingest_ready") == 1
    assert await stop_ingest(service, task) == 0
    assert sample(service, "detector_ingest_ready") == 0  # current at a scrape, with no /readyz call in between
    assert not any(map(alive, pids))

    got = await read_topic(broker.bootstrap, topic)
    partition_of = KeyPartitions(3)
    seen: list[str] = []
    for message in got:
        value = orjson.loads(message.value)
        record = value.get("detail", value)
        seen.append(record["eventID"])
        key = record_key(record)
        assert message.key == (key.encode() if key else None)
        if key is not None:
            assert message.partition == partition_of(message.key)
    assert sorted(seen) == sorted(expected)


async def test_a_worker_killed_mid_message_fails_it_and_is_started_again(broker: EmbeddedBroker, aws: MotoServer) -> None:
    """SIGKILL of the worker producing a big object: the message fails as worker_lost (not deleted), a new
    worker starts and connects, and the message, received again after its visibility timeout, is produced
    whole."""
    topic = await new_topic(broker.bootstrap, "ingest-worker-kill")
    url, dlq = make_queue(aws, max_receives=3)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    drain_queue(aws, url)  # S3's test event: the one message in work is then the big object's
    records = 20_000
    aws.client("s3").put_object(Bucket=bucket, Key="big.json.gz", Body=big_object(records, 2000))
    settings = ingest_settings(broker.bootstrap, topic, url, workers=2, visibility_timeout_seconds=3)
    service, task = await start_ingest(settings)
    pool = service.processor
    assert isinstance(pool, WorkerPool)
    await wait_until(lambda: any(w.calls for w in pool.workers), timeout=30, interval=0.001)
    busy = next(w for w in pool.workers if w.calls)
    os.kill(busy.process.pid, signal.SIGKILL)
    await wait_until(lambda: sample(service, "detector_ingest_failures_total", reason="worker_lost") == 1, timeout=10)
    assert sum(queue_counts(aws, url)) == 1  # not deleted
    await wait_until(lambda: sample(service, "detector_ingest_worker_restarts_total") == 1 and service.ready(), timeout=30)
    await wait_until(lambda: queue_counts(aws, url) == (0, 0), timeout=60)
    assert sample(service, "detector_ingest_messages_total", queue=url.rsplit("/", 1)[1], result="deleted") == 1
    pids = worker_pids(service)
    assert await stop_ingest(service, task) == 0
    assert not any(map(alive, pids))
    ids = {orjson.loads(m.value)["eventID"] for m in await read_topic(broker.bootstrap, topic)}
    assert len(ids) == records
    assert queue_counts(aws, dlq) == (0, 0)


async def test_a_missing_topic_with_workers_is_a_start_up_error_and_leaves_no_process(broker: EmbeddedBroker, aws: MotoServer) -> None:
    url, _ = make_queue(aws)
    service, task = await start_ingest(ingest_settings(broker.bootstrap, unique("absent"), url, workers=2), wait_ready=False)
    with pytest.raises(StartupError, match="topic 'absent-.*does not exist"):
        await asyncio.wait_for(task, timeout=60)
    assert not any(map(alive, worker_pids(service)))


async def test_a_worker_that_dies_before_connecting_fails_the_start(aws: MotoServer) -> None:
    """No broker yet, so the workers retry their connection; one is killed meanwhile: the start fails
    naming it (rather than starting it again for ever), and the other worker is stopped."""
    url, _ = make_queue(aws)
    service, task = await start_ingest(ingest_settings(f"127.0.0.1:{free_port()}", "cloudtrail", url, workers=2), wait_ready=False)
    await wait_until(lambda: sample(service, "detector_ingest_broker_errors_total") >= 2, timeout=30)
    pids = worker_pids(service)
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(StartupError, match="ingest worker 0 exited .* before it connected"):
        await asyncio.wait_for(task, timeout=30)
    assert not any(map(alive, pids))


async def test_ctrl_c_to_the_process_group_drains_through_the_main_process(broker: EmbeddedBroker, aws: MotoServer, tmp_path: Path) -> None:
    """`detector ingest --workers 2` in a terminal: Ctrl-C reaches every process of the group; the workers
    ignore it and finish what they have, the main process drains and exits 0, no worker is left."""
    topic = await new_topic(broker.bootstrap, "ingest-workers-cli")
    url, _ = make_queue(aws)
    bucket = unique("bucket")
    notify_bucket(aws, bucket, url)
    drain_queue(aws, url)
    records = 3000
    aws.client("s3").put_object(Bucket=bucket, Key="big.json.gz", Body=big_object(records, 20_000))
    port = free_port()
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "detector", "ingest", "--workers", "2"],
        env=ingest_env(aws.url, broker.bootstrap, topic, url, port, DETECTOR_MAX_MESSAGE_BYTES="1000000"),
        stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
            except OSError:
                return False

        await wait_until(lambda: ready() or proc.poll() is not None, timeout=60)
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 2, out.read_text()[-3000:]
        await wait_until(lambda: queue_counts(aws, url)[1] == 1, timeout=30)  # the big object's message in work
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not any(map(alive, children))
    assert queue_counts(aws, url) == (0, 0)
    ids = {orjson.loads(m.value)["eventID"] for m in await read_topic(broker.bootstrap, topic)}
    assert len(ids) == records
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert {line.get("worker") for line in lines if line.get("event") == "connected"} == {0, 1}
    assert any(line.get("event") == "draining" for line in lines)
