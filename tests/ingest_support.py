"""Support of the `detector ingest` tests and benchmark: queues with redrive policies on a moto server, topics
on the test broker, and an in-process ingest service (aws_helpers.FaultProxy injects AWS faults)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aws_helpers import REGION, MotoServer
from kafka_support import create_topics, unique, wait_until

from detector.ingest.bridge import IngestService
from detector.ingest.settings import IngestSettings

INSTANCE = "i-0123456789abcdef0"


@contextmanager
def aws_env(endpoint: str) -> Iterator[dict[str, str]]:
    """The standard AWS chain of this process pointed at ``endpoint`` with test credentials (restored after)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(env)
    try:
        yield env
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def queue_arn(sqs: Any, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def make_queue(server: MotoServer, name: str | None = None, *, max_receives: int = 1, visibility: int = 30) -> tuple[str, str]:
    """A queue with a dead-letter queue (redrive after ``max_receives`` receives); returns (url, dlq url)."""
    sqs = server.client("sqs")
    name = name or unique("q")
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    redrive = json.dumps({"deadLetterTargetArn": queue_arn(sqs, dlq), "maxReceiveCount": str(max_receives)})
    url = sqs.create_queue(
        QueueName=name, Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": str(visibility)}
    )["QueueUrl"]
    return url, dlq


def notify_bucket(server: MotoServer, bucket: str, url: str, *, via_sns: bool = False) -> None:
    """Create ``bucket`` and deliver its ObjectCreated notifications to the queue, directly or via SNS."""
    s3, sqs = server.client("s3"), server.client("sqs")
    s3.create_bucket(Bucket=bucket)
    if via_sns:
        sns = server.client("sns")
        topic = sns.create_topic(Name=f"{bucket}-topic")["TopicArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn(sqs, url))
        config = {"TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}]}
    else:
        config = {"QueueConfigurations": [{"QueueArn": queue_arn(sqs, url), "Events": ["s3:ObjectCreated:*"]}]}
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config)


def queue_counts(server: MotoServer, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    attrs = server.client("sqs").get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def drain_queue(server: MotoServer, url: str) -> list[str]:
    """Every body of a queue (received and deleted)."""
    sqs = server.client("sqs")
    bodies: list[str] = []
    while msgs := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", []):
        for msg in msgs:
            bodies.append(msg["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
    return bodies


async def new_topic(bootstrap: str, prefix: str, partitions: int = 1) -> str:
    """A topic of its own for a test (the test broker, like a production one, does not create topics on use)."""
    topic = unique(prefix)
    await create_topics(bootstrap, {topic: partitions})
    return topic


def ingest_settings(bootstrap: str, topic: str, *queues: str, **overrides: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "topic": topic,
        "queue_urls": ",".join(queues),
        "http_port": 0,
        "log_level": "warning",
        "wait_seconds": 1,
        "visibility_timeout_seconds": 30,
        "aws_max_attempts": 3,
        "grace_seconds": 10,
    }
    return IngestSettings(**(values | overrides))


async def start_ingest(settings: IngestSettings, *, wait_ready: bool = True) -> tuple[IngestService, asyncio.Task[int]]:
    service = IngestService(settings)
    task = asyncio.create_task(service.run())
    if wait_ready:
        await wait_until(lambda: service.ready() or task.done(), timeout=30)
        if task.done():
            task.result()
    return service, task


async def stop_ingest(service: IngestService, task: asyncio.Task[int]) -> int:
    service.stop()
    return await asyncio.wait_for(task, timeout=30)


def sample(service: IngestService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


# --- records, log files, the command's environment -------------------------------------------------


def ct_record(n: int, instance: str = INSTANCE, **extra: Any) -> dict[str, Any]:
    return {
        "eventVersion": "1.08",
        "eventID": f"00000000-0000-0000-0000-{n:012d}",
        "eventTime": "2026-11-30T12:00:00Z",
        "eventSource": "ec2.amazonaws.com",
        "eventName": "DescribeInstances",
        "sourceIPAddress": "203.0.113.7",
        "userIdentity": {
            "type": "AssumedRole",
            "arn": f"arn:aws:sts::111122223333:assumed-role/web/{instance}",
            "sessionContext": {"sessionIssuer": {"arn": "arn:aws:iam::111122223333:role/web"}},
        },
    } | extra


def log_file(records: list[Any]) -> bytes:
    return gzip.compress(json.dumps({"Records": records}).encode(), mtime=0)


def big_object(records: int, pad: int) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    parts = [compressor.compress(b'{"Records":[')]
    for n in range(records):
        parts.append(compressor.compress((b"," if n else b"") + json.dumps(ct_record(n, padding="p" * pad)).encode()))
    parts.append(compressor.compress(b"]}") + compressor.flush())
    return b"".join(parts)


async def first_message(bootstrap: str, topic: str) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()


def ingest_env(endpoint: str, bootstrap: str, topic: str, url: str, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DETECTOR_"))}
    with aws_env(endpoint) as aws_vars:
        env.update(aws_vars)
    env.update(
        DETECTOR_KAFKA_BOOTSTRAP=bootstrap, DETECTOR_TOPIC=topic, DETECTOR_QUEUE_URLS=url, DETECTOR_HTTP_PORT=str(port),
        DETECTOR_WAIT_SECONDS="1", DETECTOR_LOG_FORMAT="json", **extra,
    )  # fmt: skip
    return env
