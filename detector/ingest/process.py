"""From one SQS message to acknowledged records on the topic: the half of ``detector ingest`` that costs CPU.

:class:`Processor` reads what a message body asks for (SPEC §14 "In"): an EventBridge event produced as is;
every S3 object it names streamed (``object_chunk_bytes`` at a time) through
:class:`~.bodies.ObjectSplitter`, each record produced as it comes, keyed by instance ID (SPEC §10). It
returns once every record is acknowledged, or raises :class:`MessageFailed` with a reason (a metrics
label). What it counted (bytes, records, objects) goes into the message's :class:`Tally`, which the
receiving side adds to the metrics when the message ends.

The receiving side (:mod:`.bridge`: SQS, visibility, deletion, HTTP) runs one ``Processor`` in its own
process, or, with ``workers`` > 1, one per worker process (:mod:`.workers`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..service.kafka_config import kafka_common_kwargs
from ..service.partitioning import KeyPartitions
from .bodies import BAD_GZIP, INVALID_JSON, NOT_CLOUDTRAIL, UNKNOWN_SHAPE, Body, BodyError, ObjectSplitter, S3Object, parse_body, raw_record_key
from .metrics import ACCESS_DENIED, AWS_ERROR, EXPIRED_CREDENTIALS, KAFKA_ERROR, MISSING_OBJECT, THROTTLED
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
PRODUCER_BATCH_BYTES = 1024 * 1024  # aiokafka's 16 KB default costs a round trip per ten records


def aws_client_config(s: IngestSettings) -> Config:
    """botocore's configuration of every AWS client of ingest (standard retry mode, a pool for `concurrency`)."""
    return Config(
        retries={"mode": "standard", "max_attempts": s.aws_max_attempts},
        connect_timeout=10,
        read_timeout=max(30, s.wait_seconds + 10),
        max_pool_connections=max(10, s.concurrency * 2),
    )


class StartupError(Exception):
    """A queue that cannot be used, a missing topic, no region, no credentials: the process cannot start."""


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


@dataclass
class Tally:
    """What one message's processing counted, for the metrics (added when the message ends)."""

    object_bytes: int = 0  # of S3 objects, as stored
    json_bytes: int = 0  # of log-file JSON, decompressed
    objects: int = 0  # S3 objects read to their end and acknowledged
    s3_records: int = 0  # records of those objects produced and acknowledged
    eventbridge_records: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Processor:
    """Produces what SQS messages carry, through one Kafka producer and one S3 client.

    ``connect`` starts the producer (retrying an unreachable broker with backoff until ``stopping`` is set;
    ``on_broker_error`` is told of each failed attempt) and checks the topic; ``process`` handles one
    message, any number at once; ``close`` flushes and stops the producer within the grace period.
    """

    def __init__(self, settings: IngestSettings, s3: Any, stopping: asyncio.Event, on_broker_error: Callable[[], None]) -> None:
        self.settings = settings
        self.s3 = s3
        self.stopping = stopping
        self.on_broker_error = on_broker_error
        self.producer: AIOKafkaProducer | None = None
        self.batches: _Batches | None = None
        self._partitions: KeyPartitions | None = None

    @property
    def connected(self) -> bool:
        return self.producer is not None

    async def connect(self) -> bool:
        """Start the producer; False when stopped first. Raises :class:`StartupError` for a missing topic."""
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
                self.on_broker_error()
                await producer.stop()
                log.warning("broker_unreachable", attempt=attempt, retry_in_seconds=round(delay, 1), error=f"{type(exc).__name__}: {exc}")
                await sleep_unless(self.stopping, delay)
                delay = min(delay * 2, s.retry_max_seconds)
                continue
            if s.topic not in topics:  # produce would fail every message, which would only cycle back to its queue
                await producer.stop()  # never `connected` (so never ready) with a topic it cannot produce to
                raise StartupError(
                    f"topic {s.topic!r} (the `topic` setting, DETECTOR_TOPIC) does not exist on {s.kafka_bootstrap}: "
                    "create it (with the partitions detector run's input needs) or set `topic` to an existing one"
                )
            self.producer = producer
            self.batches = _Batches(producer, s.topic)
            log.info("connected", attempt=attempt)
            return True
        return False

    async def close(self) -> None:
        if self.producer is None:
            return
        try:  # flushing waits for the broker: bounded, for a SIGTERM during an outage
            await asyncio.wait_for(self.producer.stop(), timeout=max(self.settings.grace_seconds, 1.0))
        except asyncio.TimeoutError:
            log.warning("producer_stop_timeout", detail="unacknowledged records dropped; their messages stay in the queue")

    async def process(self, text: str, tally: Tally, read: Callable[[], Awaitable[None]]) -> str:
        """Produce everything the message carries and wait for the acks: ``deleted`` or ``ignored``; raises
        :class:`MessageFailed`. ``read`` is awaited once every record is produced, before the last acks."""
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
            await read()
            await acks.wait()
            tally.eventbridge_records += 1
            return "deleted"
        for n, obj in enumerate(body.objects, 1):
            await self._read_object(obj, acks, tally, read if n == len(body.objects) else None)
        return "deleted"

    async def _read_object(self, obj: S3Object, acks: _Acks, tally: Tally, read: Callable[[], Awaitable[None]] | None) -> None:
        """Stream, split and produce one object, then wait for its acks (``read``: given for the message's
        last object, awaited before that wait)."""
        splitter = ObjectSplitter(max_record=self.settings.max_message_bytes)
        where = f"s3://{obj.bucket}/{obj.key}"
        produced = 0
        try:
            answer = await self.s3.get_object(Bucket=obj.bucket, Key=obj.key)
            async with answer["Body"] as stream:
                while chunk := await stream.read(self.settings.object_chunk_bytes):
                    tally.object_bytes += len(chunk)
                    for records in splitter.feed(chunk):
                        produced += await acks.send_records(records)
            for records in splitter.close():
                produced += await acks.send_records(records)
            if read is not None:
                await read()
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
            tally.json_bytes += splitter.bytes_out
        tally.objects += 1
        tally.s3_records += produced
        log.debug("object_done", object=where, records=produced, bytes=splitter.bytes_in)

    async def partition_of(self) -> tuple[KeyPartitions, int]:
        """The partition of a key in the topic (memoised, Kafka's default partitioner), and a partition
        for one message's unkeyed records (sticky, chosen at random)."""
        assert self.producer is not None
        count = len(await self.producer.partitions_for(self.settings.topic))
        if self._partitions is None or self._partitions.partitions != count:
            self._partitions = KeyPartitions(count)
        return self._partitions, random.randrange(count)



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

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.batches = processor.batches
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
                self.partition_of, self.unkeyed = await self.processor.partition_of()
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


async def sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``event`` is set meanwhile (a stop)."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
