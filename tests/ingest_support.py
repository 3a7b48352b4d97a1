"""Support of the `detector ingest` tests and benchmark: queues with redrive policies on a moto server, an
HTTP proxy in front of moto that injects AWS faults, and an in-process ingest service."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aws_helpers import REGION, MotoServer
from kafka_support import unique, wait_until

from detector.embedded import free_port
from detector.ingest.bridge import IngestService
from detector.ingest.settings import IngestSettings


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


# A fault: given the request (method, path, headers), None to forward, else (status, headers, body) to answer.
Fault = Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes] | None]


def sqs_error(code: str, status: int = 400) -> tuple[int, dict[str, str], bytes]:
    """An SQS (AWS JSON protocol) error answer."""
    body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": f"injected {code}"}).encode()
    return status, {"Content-Type": "application/x-amz-json-1.0", "x-amzn-query-error": f"{code};Sender"}, body


def s3_error(code: str, status: int) -> tuple[int, dict[str, str], bytes]:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
    return status, {"Content-Type": "application/xml"}, body


def sqs_action(headers: dict[str, str]) -> str:
    return headers.get("X-Amz-Target", headers.get("x-amz-target", "")).rsplit(".", 1)[-1]


class FaultProxy:
    """A real HTTP reverse proxy in front of moto: forwards every request unless ``fault`` answers it."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fault: Fault | None = None
        self.delay: Callable[[str, str, dict[str, str]], float] | None = None
        self.seen: list[tuple[str, str, str]] = []  # (method, path, sqs action)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = dict(request.headers)
        self.seen.append((request.method, request.path, sqs_action(headers)))
        if self.delay is not None:
            await asyncio.sleep(self.delay(request.method, request.path_qs, headers))
        if self.fault is not None:
            answer = self.fault(request.method, request.path_qs, headers)
            if answer is not None:
                status, answer_headers, body = answer
                return web.Response(status=status, headers=answer_headers, body=body)
        assert self._session is not None
        body = await request.read()
        forward = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "transfer-encoding")}
        async with self._session.request(request.method, self.target + request.path_qs, headers=forward, data=body) as up:
            response = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    response.headers[k] = v
            if "Content-Encoding" in up.headers:
                response.headers["Content-Encoding"] = up.headers["Content-Encoding"]
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response
