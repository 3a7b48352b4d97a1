"""The ``detector ingest`` process: SQS in, Kafka out (SPEC §14 "In"). The SQS half; the other is :mod:`.process`.

One receiver per queue long-polls SQS while fewer than ``concurrency`` messages are in work. Each message
is handled by its own task, which hands the body to the :class:`~.process.Processor` (in this process, or
with ``workers`` > 1 to a worker process through :class:`~.workers.WorkerPool`): an EventBridge event
produced as is; every S3 object it names streamed, split and produced record by record. The message is
deleted only once every produced record is acknowledged. While it
is in work a heartbeat renews its visibility timeout. A failed message is not deleted: a bad body
(not JSON, unknown shape, an object that is not a log file) is released at once so the queue's redrive
policy moves it to the dead-letter queue after ``maxReceiveCount`` receives; a transient failure (AWS or
Kafka) stays invisible until its visibility timeout, a natural backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from ..service.http import HttpServer
from .metrics import ACCESS_DENIED, SHUTDOWN, IngestMetrics
from .process import PERMANENT, MessageFailed, Processor, StartupError, Tally, aws_client_config, aws_reason, describe_aws_error, sleep_unless
from .settings import IngestSettings
from .workers import WorkerPool

__all__ = ["IngestService", "StartupError", "serve"]

log = structlog.get_logger("detector.ingest")

DELETE_CALLS = 4  # DeleteMessageBatch calls in flight per queue


def queue_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(eq=False)
class InWork:
    queue: str
    receipt: str
    message_id: str
    sent: float  # epoch seconds SQS received it (else when we did)
    received: float  # monotonic
    renewed: float  # monotonic, last visibility change
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    reading: bool = True  # still counted against `concurrency` (not yet only awaiting acks and deletion)


class IngestService:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.metrics = IngestMetrics([queue_name(u) for u in settings.queues])
        self.metrics.oldest_age.set_function(self._oldest_age)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready() else 0.0)  # current at every scrape, probe or not
        self.stopping = asyncio.Event()
        self.http = HttpServer(self, settings.http_host, settings.http_port)
        self.processor: Processor | WorkerPool | None = None  # produces what messages carry: here, or in workers
        self.in_work: dict[str, InWork] = {}  # by receipt handle
        # Receivers wait on it for room; each queue's receiver asks for what is free when it polls, so with
        # several queues up to (queues - 1) x max_messages more than `concurrency` may be in work at once.
        self._room = asyncio.Condition()
        self._reading = 0  # messages in work not yet only awaiting their acks and deletion
        self._receiving_ok: dict[str, bool] = {u: False for u in settings.queues}
        self._loop_alive = False
        self._sqs: Any = None
        self._deleters: dict[str, _Deleter] = {}

    # --- probes --------------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self._loop_alive

    def ready(self) -> bool:
        return self.processor is not None and self.processor.connected and all(self._receiving_ok.values()) and not self.stopping.is_set()

    def _oldest_age(self) -> float:
        if not self.in_work:
            return 0.0
        return max(0.0, time.time() - min(w.sent for w in self.in_work.values()))

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop_requested")
            self.stopping.set()

    # --- life cycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        await self.http.start()
        self._loop_alive = True
        log.info("http_listening", port=self.http.port)
        session = get_session()
        try:
            async with contextlib.AsyncExitStack() as clients:
                self._sqs = await clients.enter_async_context(session.create_client("sqs", config=aws_client_config(s)))
                self._deleters = {url: _Deleter(self._sqs, url) for url in s.queues}
                await self._check_queues()
                if s.workers > 1:
                    self.processor = WorkerPool(s, self.stopping, self.metrics.broker_errors.inc, self.metrics.worker_restarts.inc)
                else:
                    s3 = await clients.enter_async_context(session.create_client("s3", config=aws_client_config(s)))
                    self.processor = Processor(s, s3, self.stopping, self.metrics.broker_errors.inc)
                try:
                    if await self.processor.connect():
                        await self._work()
                finally:
                    await self.processor.close()
        except (NoRegionError, NoCredentialsError) as exc:
            raise StartupError(f"{exc} (set AWS_REGION and credentials the standard AWS way)") from None
        finally:
            await self.http.stop()
            self._loop_alive = False
        log.info("stopped")
        return 0

    async def _work(self) -> None:
        """Receive and process until SIGTERM, then drain."""
        receivers = [asyncio.create_task(self._receive(url)) for url in self.settings.queues]
        heartbeat = asyncio.create_task(self._heartbeat())
        await self.stopping.wait()
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        await self._drain()
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)

    async def _check_queues(self) -> None:
        """Every queue exists and can be read; warn when it has no redrive policy."""
        for url in self.settings.queues:
            try:
                attrs = (await self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
            except (ClientError, BotoCoreError) as exc:
                raise StartupError(f"queue {url}: {describe_aws_error(exc)}") from None
            self._receiving_ok[url] = True  # readable now; a failed receive turns it back
            if "RedrivePolicy" not in attrs:
                log.warning(
                    "no_redrive_policy", queue=queue_name(url),
                    detail="a message that cannot be processed will be received again and again; give the queue a dead-letter queue",
                )

    async def _drain(self) -> None:
        """SIGTERM: let messages in work finish within the grace period; leave the rest to SQS."""
        tasks = [w.task for w in self.in_work.values() if w.task is not None]
        if not tasks:
            return
        log.info("draining", messages=len(tasks), grace_seconds=self.settings.grace_seconds)
        done, pending = await asyncio.wait(tasks, timeout=self.settings.grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("drain_incomplete", left_to_queue=len(pending))

    # --- receiving -----------------------------------------------------------------------------
    async def _receive(self, url: str) -> None:
        s = self.settings
        name = queue_name(url)
        delay = 0.5
        batch = min(s.max_messages, (s.concurrency + 1) // 2)
        while not self.stopping.is_set():
            async with self._room:  # receive only while fewer than `concurrency` messages are being read ...
                # ... and room for a batch: one receive per freed message would cost a call per message
                await self._room.wait_for(lambda: self._room_for() >= batch or not self.in_work)
            free = min(s.max_messages, self._room_for())
            try:
                answer = await self._sqs.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=free,
                    WaitTimeSeconds=s.wait_seconds,
                    VisibilityTimeout=s.visibility_timeout_seconds,
                    MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
                )
            except (ClientError, BotoCoreError) as exc:
                reason = aws_reason(exc)
                self._receiving_ok[url] = False
                self.metrics.receive_errors.labels(reason).inc()
                log.error("receive_failed", queue=name, reason=reason, retry_in_seconds=round(delay, 1), error=describe_aws_error(exc))
                await sleep_unless(self.stopping, delay)
                delay = min(delay * 2, s.retry_max_seconds)
                continue
            delay = 0.5
            self._receiving_ok[url] = True
            messages = answer.get("Messages", [])
            now = time.monotonic()
            for msg in messages:
                sent = msg.get("Attributes", {}).get("SentTimestamp")
                work = InWork(url, msg["ReceiptHandle"], msg.get("MessageId", "?"), int(sent) / 1000 if sent else time.time(), now, now)
                self.in_work[work.receipt] = work
                self._reading += 1
                self.metrics.in_flight.inc()
                work.task = asyncio.create_task(self._handle(work, msg.get("Body", "")))

    async def _heartbeat(self) -> None:
        """Renew the visibility of messages in work a third of the timeout before it would lapse."""
        timeout = self.settings.visibility_timeout_seconds
        period = timeout / 3
        while True:
            await asyncio.sleep(min(period, 5.0))
            now = time.monotonic()
            due: dict[str, list[InWork]] = {}
            for work in list(self.in_work.values()):
                if now - work.renewed >= period:
                    due.setdefault(work.queue, []).append(work)
            for url, works in due.items():
                for i in range(0, len(works), 10):
                    batch = works[i : i + 10]
                    entries = [{"Id": str(n), "ReceiptHandle": w.receipt, "VisibilityTimeout": timeout} for n, w in enumerate(batch)]
                    try:
                        answer = await self._sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)
                    except (ClientError, BotoCoreError) as exc:
                        log.warning("visibility_renewal_failed", queue=queue_name(url), error=describe_aws_error(exc))
                        continue
                    failed = {f["Id"] for f in answer.get("Failed", [])}
                    for n, work in enumerate(batch):
                        if str(n) not in failed:
                            work.renewed = now
                            self.metrics.visibility_extensions.inc()

    # --- one message ---------------------------------------------------------------------------
    async def _handle(self, work: InWork, text: str) -> None:
        name = queue_name(work.queue)
        assert self.processor is not None
        tally = Tally()
        with structlog.contextvars.bound_contextvars(queue=name, message_id=work.message_id):
            try:
                result = await self.processor.process(text, tally, lambda: self._read_all(work))
                await self._deleters[work.queue].delete(work.receipt)
                self.metrics.messages.labels(name, result).inc()
                log.debug("message_done", result=result)
            except asyncio.CancelledError:
                self._failed(name, SHUTDOWN, "grace period over; left to the queue")
                raise
            except MessageFailed as exc:
                self._failed(name, exc.reason, str(exc))
                if exc.reason in PERMANENT:
                    await self._release(work)
            except (ClientError, BotoCoreError) as exc:  # the delete itself
                self._failed(name, aws_reason(exc), f"deleting the message: {describe_aws_error(exc)}")
            finally:
                self._count(tally)
                self.in_work.pop(work.receipt, None)
                await self._read_all(work)
                self.metrics.in_flight.dec()
                async with self._room:
                    self._room.notify_all()

    def _count(self, tally: Tally) -> None:
        m = self.metrics
        m.bytes.inc(tally.object_bytes)
        m.json_bytes.inc(tally.json_bytes)
        m.objects.inc(tally.objects)
        m.records.labels("s3").inc(tally.s3_records)
        m.records.labels("eventbridge").inc(tally.eventbridge_records)

    def _failed(self, queue: str, reason: str, message: str) -> None:
        self.metrics.failures.labels(reason).inc()
        self.metrics.messages.labels(queue, "failed").inc()
        log.warning("message_failed", reason=reason, error=message)

    async def _release(self, work: InWork) -> None:
        """Make a message that can never succeed visible again now, so the redrive policy takes it soon."""
        try:
            await self._sqs.change_message_visibility(QueueUrl=work.queue, ReceiptHandle=work.receipt, VisibilityTimeout=0)
        except (ClientError, BotoCoreError) as exc:
            log.warning("release_failed", error=describe_aws_error(exc))

    def _room_for(self) -> int:
        """Messages that may be received now: fewer than `concurrency` being read, and as many more at most
        only awaiting their acks and deletion (their records are in the producer's buffers already)."""
        s = self.settings
        return min(s.concurrency - self._reading, 2 * s.concurrency - len(self.in_work))

    async def _read_all(self, work: InWork) -> None:
        """The message's records are all produced: it no longer counts against `concurrency`."""
        if work.reading:
            work.reading = False
            self._reading -= 1
            async with self._room:
                self._room.notify_all()

class _Deleter:
    """Deletes the messages of one queue in ``DeleteMessageBatch`` calls: the messages done while a call is
    on its way go in the next one (up to 10 each, at most ``DELETE_CALLS`` calls at once), so a busy queue
    costs a tenth of the calls. Each ``delete`` still answers for its own message: it raises the
    ``ClientError`` of its entry (or of the call) as ``DeleteMessage`` would."""

    def __init__(self, sqs: Any, url: str) -> None:
        self.sqs = sqs
        self.url = url
        self.waiting: list[tuple[str, asyncio.Future[None]]] = []
        self.calls = 0
        self.batched = True  # until DeleteMessageBatch is refused as a permission of its own
        self.tasks: set[asyncio.Task[None]] = set()  # the calls under way (the loop keeps weak references only)

    async def delete(self, receipt: str) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((receipt, done))
        if self.calls < DELETE_CALLS:
            self.calls += 1
            task = asyncio.create_task(self._flush())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        await done

    async def _flush(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:10], self.waiting[10:]
                if not self.batched:
                    await asyncio.gather(*(self._single(receipt, done) for receipt, done in batch))
                    continue
                entries = [{"Id": str(n), "ReceiptHandle": receipt} for n, (receipt, _) in enumerate(batch)]
                try:
                    answer = await self.sqs.delete_message_batch(QueueUrl=self.url, Entries=entries)
                except (ClientError, BotoCoreError) as exc:
                    if aws_reason(exc) == ACCESS_DENIED:
                        # AWS authorises DeleteMessageBatch by sqs:DeleteMessage; an SQS-compatible service
                        # (or moto's IAM) that asks for its own action gets one DeleteMessage per message
                        log.info("delete_batch_denied", queue=queue_name(self.url), detail="deleting one message per call")
                        self.batched = False
                        await asyncio.gather(*(self._single(receipt, done) for receipt, done in batch))
                        continue
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                failed = {f["Id"]: f for f in answer.get("Failed", [])}
                for n, (_, done) in enumerate(batch):
                    if done.done():  # its handler was cancelled (shutdown)
                        continue
                    entry = failed.get(str(n))
                    if entry is None:
                        done.set_result(None)
                    else:
                        error = {"Code": entry.get("Code", "?"), "Message": entry.get("Message", "")}
                        done.set_exception(ClientError({"Error": error}, "DeleteMessageBatch"))
        finally:
            self.calls -= 1

    async def _single(self, receipt: str, done: asyncio.Future[None]) -> None:
        try:
            await self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)
        except (ClientError, BotoCoreError) as exc:
            if not done.done():
                done.set_exception(exc)
            return
        if not done.done():
            done.set_result(None)


def install_signal_handlers(service: IngestService, loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGTERM, service.stop)
    loop.add_signal_handler(signal.SIGINT, service.stop)


async def serve(settings: IngestSettings) -> int:
    service = IngestService(settings)
    install_signal_handlers(service, asyncio.get_running_loop())
    return await service.run()
