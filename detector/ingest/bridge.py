"""The ``detector ingest`` process: SQS in, Kafka out (SPEC §14 "In"). A thin adapter around :mod:`.bodies`.

One receiver per queue long-polls SQS while fewer than ``concurrency`` messages are in work. Each message
is handled by its own task: its body parsed; an EventBridge event produced as is; every S3 object it
names streamed (``object_chunk_bytes`` at a time) through :class:`~.bodies.ObjectSplitter`, each record
produced as it comes. The message is deleted only once every produced record is acknowledged. While it
is in work a heartbeat renews its visibility timeout. A failed message is not deleted: a bad body
(not JSON, unknown shape, an object that is not a log file) is released at once so the queue's redrive
policy moves it to the dead-letter queue after ``maxReceiveCount`` receives; a transient failure (AWS or
Kafka) stays invisible until its visibility timeout, a natural backoff.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiobotocore.session import get_session
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from ..service.http import HttpServer
from ..service.kafka_config import kafka_common_kwargs
from ..service.partitioning import KeyPartitions
from .bodies import BAD_GZIP, INVALID_JSON, NOT_CLOUDTRAIL, UNKNOWN_SHAPE, Body, BodyError, ObjectSplitter, S3Object, parse_body, raw_record_key
from .metrics import (
    ACCESS_DENIED,
    AWS_ERROR,
    EXPIRED_CREDENTIALS,
    KAFKA_ERROR,
    MISSING_OBJECT,
    SHUTDOWN,
    THROTTLED,
    IngestMetrics,
)
from .settings import IngestSettings

log = structlog.get_logger("detector.ingest")

PERMANENT = frozenset({INVALID_JSON, UNKNOWN_SHAPE, BAD_GZIP, NOT_CLOUDTRAIL, MISSING_OBJECT})
_EXPIRED = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId", "UnrecognizedClientException", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_THROTTLED = frozenset({"Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException", "SlowDown", "TooManyRequestsException", "RequestLimitExceeded"})
_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "403", "KMS.AccessDeniedException", "KMS.DisabledException", "AllAccessDisabled"})
# Bytes produced but not yet acknowledged, per message, before waiting for the acks: bounds the memory an
# oversized object can take in the producer's buffers.
PENDING_BYTES = 4 * 1024 * 1024
DELETE_CALLS = 4  # DeleteMessageBatch calls in flight per queue
PRODUCER_BATCH_BYTES = 1024 * 1024  # aiokafka's 16 KB default costs a round trip per ten records


class StartupError(Exception):
    """A queue that cannot be used, no region, no credentials: the process cannot start."""


class MessageFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def aws_reason(exc: BaseException) -> str:
    """The failure reason of an AWS error (a metrics label)."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _EXPIRED:
            return EXPIRED_CREDENTIALS
        if code in _THROTTLED:
            return THROTTLED
        if code in _MISSING:
            return MISSING_OBJECT
        if code in _DENIED:
            return ACCESS_DENIED
    if isinstance(exc, NoCredentialsError):
        return EXPIRED_CREDENTIALS
    return AWS_ERROR


def describe_aws_error(exc: BaseException) -> str:
    """A one-line explanation an operator can act on (no credentials material in it)."""
    reason = aws_reason(exc)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        text = f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
        if attempts:
            text += f" (after {attempts} retries)"
    else:
        text = f"{type(exc).__name__}: {exc}"
    hint = {
        EXPIRED_CREDENTIALS: "AWS credentials are missing, expired or invalid: renew them (the standard chain is re-read)",
        THROTTLED: "AWS is throttling the calls: lower concurrency or raise the account's quota",
        ACCESS_DENIED: "the ingest role lacks a permission (see deploy/aws/ingest-iam.yaml)",
    }.get(reason)
    return f"{text}; {hint}" if hint else text


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
        self.stopping = asyncio.Event()
        self.http = HttpServer(self, settings.http_host, settings.http_port)
        self.producer: AIOKafkaProducer | None = None
        self.in_work: dict[str, InWork] = {}  # by receipt handle
        # Receivers wait on it for room; each queue's receiver asks for what is free when it polls, so with
        # several queues up to (queues - 1) x max_messages more than `concurrency` may be in work at once.
        self._room = asyncio.Condition()
        self._reading = 0  # messages in work not yet only awaiting their acks and deletion
        self._receiving_ok: dict[str, bool] = {u: False for u in settings.queues}
        self._loop_alive = False
        self._sqs: Any = None
        self._s3: Any = None
        self._partitions: KeyPartitions | None = None
        self._deleters: dict[str, _Deleter] = {}
        self.batches: _Batches | None = None

    # --- probes --------------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self._loop_alive

    def ready(self) -> bool:
        ok = self.producer is not None and all(self._receiving_ok.values()) and not self.stopping.is_set()
        self.metrics.ready.set(1 if ok else 0)
        return ok

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
        aws_config = Config(
            retries={"mode": "standard", "max_attempts": s.aws_max_attempts},
            connect_timeout=10,
            read_timeout=max(30, s.wait_seconds + 10),
            max_pool_connections=max(10, s.concurrency * 2),
        )
        session = get_session()
        try:
            async with session.create_client("sqs", config=aws_config) as sqs, session.create_client("s3", config=aws_config) as s3:
                self._sqs, self._s3 = sqs, s3
                self._deleters = {url: _Deleter(sqs, url) for url in s.queues}
                await self._check_queues()
                if not await self._connect():
                    return 0
                receivers = [asyncio.create_task(self._receive(url)) for url in s.queues]
                heartbeat = asyncio.create_task(self._heartbeat())
                await self.stopping.wait()
                for task in receivers:
                    task.cancel()
                await asyncio.gather(*receivers, return_exceptions=True)
                await self._drain()
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
        except (NoRegionError, NoCredentialsError) as exc:
            raise StartupError(f"{exc} (set AWS_REGION and credentials the standard AWS way)") from None
        finally:
            if self.producer is not None:
                try:  # flushing waits for the broker: bounded, for a SIGTERM during an outage
                    await asyncio.wait_for(self.producer.stop(), timeout=max(self.settings.grace_seconds, 1.0))
                except asyncio.TimeoutError:
                    log.warning("producer_stop_timeout", detail="unacknowledged records dropped; their messages stay in the queue")
            await self.http.stop()
            self._loop_alive = False
        log.info("stopped")
        return 0

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

    async def _connect(self) -> bool:
        s = self.settings
        delay, attempt = 0.5, 0
        while not self.stopping.is_set():
            attempt += 1
            producer = AIOKafkaProducer(
                **kafka_common_kwargs(s), acks="all", linger_ms=5, max_request_size=s.max_message_bytes,
                max_batch_size=PRODUCER_BATCH_BYTES,
            )
            try:
                await producer.start()
                topics = (await producer.client.fetch_all_metadata()).topics()
            except (KafkaError, OSError) as exc:
                self.metrics.broker_errors.inc()
                await producer.stop()
                log.warning("broker_unreachable", attempt=attempt, retry_in_seconds=round(delay, 1), error=f"{type(exc).__name__}: {exc}")
                await self._sleep(delay)
                delay = min(delay * 2, s.retry_max_seconds)
                continue
            self.producer = producer
            self.batches = _Batches(producer, s.topic)
            if s.topic not in topics:  # produce would fail every message, which would only cycle back to its queue
                raise StartupError(
                    f"topic {s.topic!r} (the `topic` setting, DETECTOR_TOPIC) does not exist on {s.kafka_bootstrap}: "
                    "create it (with the partitions detector run's input needs) or set `topic` to an existing one"
                )
            log.info("connected", attempt=attempt)
            return True
        return False

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

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
                await self._sleep(delay)
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
        with structlog.contextvars.bound_contextvars(queue=name, message_id=work.message_id):
            try:
                result = await self._process(text, work)
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
                self.in_work.pop(work.receipt, None)
                await self._read_all(work)
                self.metrics.in_flight.dec()
                async with self._room:
                    self._room.notify_all()

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

    async def _process(self, text: str, work: InWork) -> str:
        """Produce everything the message carries and wait for the acks; ``deleted`` or ``ignored``."""
        try:
            body: Body = parse_body(text)
        except BodyError as exc:
            raise MessageFailed(exc.reason, str(exc)) from None
        if body.ignored is not None:
            log.info("message_ignored", why=body.ignored)
            return "ignored"
        acks = _Acks(self)
        if body.event is not None:
            await acks.send(body.event, body.key)
            await self._read_all(work)
            await acks.wait()
            self.metrics.records.labels("eventbridge").inc()
            return "deleted"
        for n, obj in enumerate(body.objects, 1):
            await self._read_object(obj, acks, work if n == len(body.objects) else None)
        return "deleted"

    async def _read_object(self, obj: S3Object, acks: _Acks, last_of: InWork | None = None) -> None:
        """Stream, split and produce one object, then wait for its acks (``last_of``: the message whose last
        object it is, released from `concurrency` before that wait)."""
        splitter = ObjectSplitter(max_record=self.settings.max_message_bytes)
        where = f"s3://{obj.bucket}/{obj.key}"
        produced = 0
        try:
            answer = await self._s3.get_object(Bucket=obj.bucket, Key=obj.key)
            async with answer["Body"] as stream:
                while chunk := await stream.read(self.settings.object_chunk_bytes):
                    self.metrics.bytes.inc(len(chunk))
                    for records in splitter.feed(chunk):
                        produced += await acks.send_records(records)
            for records in splitter.close():
                produced += await acks.send_records(records)
            if last_of is not None:
                await self._read_all(last_of)
            await acks.wait()
        except MessageFailed:
            await acks.wait_quietly()
            raise
        except BodyError as exc:
            await acks.wait_quietly()
            raise MessageFailed(exc.reason, f"{where}: {exc}") from None
        except (ClientError, BotoCoreError, OSError, asyncio.TimeoutError) as exc:
            await acks.wait_quietly()
            raise MessageFailed(aws_reason(exc), f"{where}: {describe_aws_error(exc)}") from None
        except Exception as exc:  # aiohttp payload errors mid-stream
            if type(exc).__module__.startswith("aiohttp"):
                await acks.wait_quietly()
                raise MessageFailed(AWS_ERROR, f"{where}: {type(exc).__name__}: {exc}") from None
            raise
        finally:
            self.metrics.json_bytes.inc(splitter.bytes_out)
        self.metrics.objects.inc()
        self.metrics.records.labels("s3").inc(produced)
        log.debug("object_done", object=where, records=produced, bytes=splitter.bytes_in)

    async def partition_of(self) -> tuple[KeyPartitions, int]:
        """The partition of a key in the topic (memoised, Kafka's default partitioner), and a partition
        for one message's unkeyed records (sticky, chosen at random)."""
        assert self.producer is not None
        count = len(await self.producer.partitions_for(self.settings.topic))
        if self._partitions is None or self._partitions.partitions != count:
            self._partitions = KeyPartitions(count)
        return self._partitions, random.randrange(count)


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


class _Batches:
    """The open producer batches of the service, one per partition, shared by every message in work.

    aiokafka queues one batch per partition until the broker takes it (``send_batch`` waits for that), and
    each produce request carries one batch per partition: batches of one message each (a small log file
    gives a few hundred records over the partitions) would cost a request per small batch. Shared, they
    fill up to PRODUCER_BATCH_BYTES whatever the size of the files. Each open batch has a future that
    tells every message with records in it when it is acknowledged (or why not). Batches of a partition
    are sent one at a time in the order they were closed, so records keep their order in a partition.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.open: dict[int, tuple[Any, asyncio.Future[Any]]] = {}  # partition -> (BatchBuilder, its delivery)
        self.sending: dict[int, asyncio.Lock] = {}

    def append(self, partition: int, key: bytes | None, value: bytes) -> asyncio.Future[Any] | None:
        """Add a record to the open batch of ``partition``: that batch's future, or None when it is full."""
        entry = self.open.get(partition)
        if entry is None:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.add_done_callback(_retrieved)
            entry = self.open[partition] = (self.producer.create_batch(), done)
        if entry[0].append(key=key, value=value, timestamp=None) is None:
            return None
        return entry[1]

    async def send(self, partition: int) -> None:
        """Send the open batch of ``partition``, if any; raises the KafkaError of queueing it."""
        entry = self.open.pop(partition, None)
        if entry is None:
            return
        batch, done = entry
        async with self.sending.setdefault(partition, asyncio.Lock()):
            try:
                delivery = await self.producer.send_batch(batch, self.topic, partition=partition)
            except BaseException as exc:
                if not done.done():
                    done.set_exception(exc if isinstance(exc, Exception) else KafkaError("not sent"))
                raise
        delivery.add_done_callback(lambda sent: _settle_future(done, sent))


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a failure every message already gave up on is not an "exception never retrieved"


def _settle_future(done: asyncio.Future[Any], sent: asyncio.Future[Any]) -> None:
    if done.done():
        return
    if sent.cancelled():
        done.set_exception(KafkaError("delivery cancelled"))
    elif sent.exception() is not None:
        done.set_exception(sent.exception())  # type: ignore[arg-type]
    else:
        done.set_result(sent.result())


class _Acks:
    """What one message produced and the acknowledgements still awaited.

    Records go into the service's shared open batches (:class:`_Batches`), partitioned like Kafka's default
    partitioner (:class:`KeyPartitions`), and to one partition per message for unkeyed records (sticky).
    ``wait`` sends the open batches holding this message's records and raises MessageFailed unless every
    one is acknowledged. Past PENDING_BYTES unacknowledged the oldest batches are awaited until half of
    that is left, so an oversized object never piles up unacknowledged while the reading goes on beside
    the newest batches in flight.
    """

    def __init__(self, service: IngestService) -> None:
        self.service = service
        self.batches = service.batches
        self.mine: dict[asyncio.Future[Any], int] = {}  # batches holding this message's records -> its bytes, oldest first
        self.pending_bytes = 0  # appended and not yet acknowledged
        self.partition_of: KeyPartitions | None = None
        self.unkeyed = 0

    async def send(self, value: bytes, key: str | None) -> None:
        await self._append([(value, key)])

    async def send_records(self, records: list[bytes]) -> int:
        """Append the records of a log file, keyed by :func:`raw_record_key`; how many."""
        await self._append([(raw, raw_record_key(raw)) for raw in records])
        return len(records)

    async def _append(self, items: list[tuple[bytes, str | None]]) -> None:
        assert self.batches is not None
        try:
            if self.partition_of is None:
                self.partition_of, self.unkeyed = await self.service.partition_of()
            partition_of, batches, mine = self.partition_of, self.batches, self.mine
            for value, key in items:
                key_bytes = key.encode() if key is not None else None
                partition = self.unkeyed if key_bytes is None else partition_of(key_bytes)
                done = batches.append(partition, key_bytes, value)
                if done is None:  # full: send it, start another
                    await batches.send(partition)
                    done = batches.append(partition, key_bytes, value)
                    if done is None:
                        raise MessageFailed(KAFKA_ERROR, f"a record of {len(value)} bytes does not fit in a producer batch")
                mine[done] = mine.get(done, 0) + len(value)
                self.pending_bytes += len(value)
        except KafkaError as exc:
            raise MessageFailed(KAFKA_ERROR, f"producing: {type(exc).__name__}: {exc}") from None
        if self.pending_bytes >= PENDING_BYTES:
            await self._settle(PENDING_BYTES // 2)

    async def _send_mine(self) -> None:
        assert self.batches is not None
        for partition, (_, done) in list(self.batches.open.items()):
            if done in self.mine:
                await self.batches.send(partition)

    async def _settle(self, left: int) -> None:
        """Send the open batches holding records of this message, then await the oldest until at most
        ``left`` bytes are unacknowledged."""
        try:
            await self._send_mine()
        except KafkaError as exc:
            await self.wait_quietly()
            raise MessageFailed(KAFKA_ERROR, f"producing: {type(exc).__name__}: {exc}") from None
        awaited = []
        for done, size in list(self.mine.items()):
            if left and self.pending_bytes <= left:  # (wait, left 0, awaits every batch)
                break
            del self.mine[done]
            self.pending_bytes -= size
            awaited.append(done)
        results = await asyncio.gather(*awaited, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.wait_quietly()
            raise MessageFailed(KAFKA_ERROR, f"{len(errors)} batch(es) not acknowledged: {type(errors[0]).__name__}: {errors[0]}")

    async def wait(self) -> None:
        await self._settle(0)

    async def wait_quietly(self) -> None:
        """A failed message: its records already in batches go with them (a redelivery produces them again,
        and the detector counts a repeated eventID once); wait for them without judging."""
        try:
            await self._send_mine()
        except KafkaError:
            pass
        pending = list(self.mine)
        self.mine.clear()
        self.pending_bytes = 0
        await asyncio.gather(*pending, return_exceptions=True)


def install_signal_handlers(service: IngestService, loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGTERM, service.stop)
    loop.add_signal_handler(signal.SIGINT, service.stop)


async def serve(settings: IngestSettings) -> int:
    service = IngestService(settings)
    install_signal_handlers(service, asyncio.get_running_loop())
    return await service.run()
