"""Producing outputs: findings' bodies, record batches per partition, acknowledged delivery with retries
and dead-lettering of what the broker refuses for good."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ..core.ocsf import to_ocsf

if TYPE_CHECKING:
    from .app import DetectorService

log = structlog.get_logger("detector.service")


Output = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]  # topic, value, key, headers, partition
Queued = tuple[list[Output], Any]  # outputs queued together and their delivery future (or the error queueing them)


def eventbridge_envelope(finding: dict[str, Any]) -> dict[str, Any]:
    """Wrap a finding as EventBridge delivers GuardDuty's (``detail-type: GuardDuty Finding``)."""
    return {
        "version": "0",
        "id": str(uuid4()),
        "detail-type": "GuardDuty Finding",
        "source": "ec2-credential-detector",
        "account": finding["accountId"],
        "time": finding["updatedAt"][:19] + "Z",
        "region": finding["region"],
        "resources": [],
        "detail": finding,
    }


def finding_body(finding: dict[str, Any], new: bool, finding_format: str, envelope: bool) -> dict[str, Any]:
    """What goes on the findings topic for one finding state (``finding_format``; the envelope wraps only
    the GuardDuty-shaped format, the settings reject it with ``ocsf``). ``new``: the first state published
    of a group opened since (an OCSF Create); the later ones are Updates."""
    if finding_format == "ocsf":
        return to_ocsf(finding, new=new)
    return eventbridge_envelope(finding) if envelope else finding


async def send_outputs(
    producer: AIOKafkaProducer, outputs: list[Output], batched: bool, max_bytes: int
) -> list[Queued]:
    """Queue ``outputs`` on ``producer``; return each group of outputs with its delivery future, or with the
    :class:`KafkaError` raised queueing it.

    ``batched``: the outputs with a partition (routed and changelog records) go as one record batch per
    run that fills aiokafka's batch size (``create_batch``/``send_batch``): no per-record future, and a
    batch is delivered or fails as a whole. Partition order is kept. The others, a value over ``max_bytes``
    (which the producer refuses as before, so it becomes a dead letter), and all of them when not
    ``batched``, go one by one (``send``).
    """
    sent: list[Queued] = []
    groups: dict[tuple[str, int], list[Output]] = {}
    for item in outputs:
        topic, value, key, headers, partition = item
        if batched and partition is not None and (value is None or len(value) <= max_bytes):
            groups.setdefault((topic, partition), []).append(item)
            continue
        try:
            sent.append(([item], await producer.send(topic, value=value, key=key, headers=headers, partition=partition)))
        except KafkaError as exc:
            sent.append(([item], exc))
    for (topic, partition), items in groups.items():
        batch, members = producer.create_batch(), []
        for item in items:
            if batch.append(key=item[2], value=item[1], timestamp=None, headers=item[3]) is None:
                # full (an empty batch takes any one record): send it, start the next with this record
                sent.append((members, await _send_batch(producer, batch, topic, partition)))
                batch, members = producer.create_batch(), []
                batch.append(key=item[2], value=item[1], timestamp=None, headers=item[3])
            members.append(item)
        sent.append((members, await _send_batch(producer, batch, topic, partition)))
    return sent


async def _send_batch(producer: AIOKafkaProducer, batch: Any, topic: str, partition: int) -> Any:
    try:
        return await producer.send_batch(batch, topic, partition=partition)
    except KafkaError as exc:
        return exc



async def produce_all(service: DetectorService, outputs: list[Output], queued: list[Queued] | None = None) -> None:
    """Produce every output and wait for the acks, retrying failures with backoff.

    ``queued``: outputs already on the producer (:func:`send_outputs`' result): their acknowledgements are
    awaited, and their failures retried, with those of ``outputs``.

    Gives up only when stopping and the grace period is over (the caller's commit then fails to
    happen, so the inputs are consumed again after a restart).
    """
    if not outputs and not queued:
        return
    assert service.producer is not None
    todo = outputs
    first = queued or []
    delay = 0.2
    deadline: float | None = None
    batched = True  # the first round in batches; a retry one by one, so each failure is told apart
    while todo or first:
        failed = []
        alone: set[int] = set()  # failures of a record sent on its own (a batch's are retried one by one)
        sent_now = await send_outputs(service.producer, todo, batched, service.settings.max_message_bytes) if todo else []
        round_, first = first + sent_now, []
        for items, sent in round_:
            error = sent if isinstance(sent, KafkaError) else None
            if error is None:
                try:
                    await sent
                    continue
                except KafkaError as exc:
                    error = exc
            if len(items) == 1:
                alone.add(len(failed))
            failed.extend((item, error) for item in items)
        batched = False
        if not failed:
            return
        fatal = {n for n in alone if not getattr(failed[n][1], "retriable", True)}
        if fatal:
            failed = [pair for n, pair in enumerate(failed) if n not in fatal] + [
                (undeliverable(service, *failed[n]), failed[n][1]) for n in sorted(fatal)
            ]
        todo = [item for item, _ in failed]
        log.warning("produce_failed", pending=len(todo), error=f"{type(failed[0][1]).__name__}: {failed[0][1]}")
        if service.stopping.is_set():
            deadline = deadline or time.monotonic() + service.settings.grace_seconds
            if time.monotonic() > deadline:
                raise KafkaError("could not deliver outputs before the grace period ended")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)

def undeliverable(service: DetectorService, item: Output, exc: BaseException) -> Output:
    """An output the broker refuses for good (e.g. too large) becomes a dead letter, truncated if need be.

    Never loops forever on a message that can never be delivered, and never drops one silently.
    """
    topic, value, key, headers, _ = item
    if any(name == "detector.undeliverable" for name, _ in headers):
        raise KafkaError(f"dead letter refused by the broker: {type(exc).__name__}: {exc}")
    body = value or b""
    marks = [("detector.undeliverable", f"{type(exc).__name__} producing to {topic}".encode())]
    limit = service.settings.max_message_bytes // 2
    if len(body) > limit:
        marks.append(("detector.truncated", str(len(body)).encode()))
        body = body[:limit]
    if topic != service.settings.dlq_topic:
        marks.append(("detector.error.reason", b"undeliverable"))
        service.metrics.dead_letters.inc()
    log.error("output_undeliverable", topic=topic, bytes=len(value or b""), error=f"{type(exc).__name__}: {exc}")
    return (service.settings.dlq_topic, body, key, headers + marks, None)
