"""Exactly once on Apache Kafka (issue 10, item 1): ``transactional_id`` set, three SIGKILLs mid-stream.

Each stage puts its outputs (routed records, changelog, findings, dead letters) and its input offsets in
one Kafka transaction; a process killed mid-transaction leaves it open until its successor, with the same
transactional id, fences it off and the broker aborts it. A ``read_committed`` reader must then see every
finding's final state with the exact count, and nothing an aborted transaction wrote.

Slow for a reason (about 40 s): each kill leaves a dead member in both consumer groups, which the broker
drops only when its session times out (10 s), before the successor gets the partitions.

The input is keyed by instance, one record per message, as ``detector ingest`` produces it: with log files
spread unkeyed over three partitions, a successor consuming a backlog may apply one instance's records in
another order than the file's, and SPEC §5 decides in arrival order (a use applied before the
``StartInstances`` and issuance that precede it in the file counts as use after stop), so the expected
counts would hold only by luck. That, not exactly once, failed this test now and then.
"""

from __future__ import annotations

import os
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka_support import (  # noqa: F401 - fixtures
    DetectorProcess,
    broker,
    create_topics,
    expected_key,
    finding_key,
    latest_findings,
    librdkafka_produce,
    read_topic,
    require_real,
    service_settings,
    unique,
    wait_until,
)
from worldgen import make_world

from detector.ingest.bodies import event_key, record_key

pytestmark = pytest.mark.kafka


async def test_three_sigkills_with_transactions_exact_counts_and_no_aborted_state(broker: Any, tmp_path: Path) -> None:
    require_real(broker, "transactions")
    world = make_world(seed=2024, n_accounts=3, instances_per_account=5)
    registry = tmp_path / "registry.json"
    registry.write_bytes(orjson.dumps(world.registry))
    prefix = unique("eos")
    s = service_settings(
        broker.bootstrap, prefix, registry=registry, finding_update_seconds=0.2, state_partitions=4,
        enable_idempotence=True, transactional_id=f"{prefix}-instance-0", producer_acks="all",
    )  # fmt: skip
    env = {"DETECTOR_ENABLE_IDEMPOTENCE": "true", "DETECTOR_TRANSACTIONAL_ID": str(s.transactional_id), "DETECTOR_PRODUCER_ACKS": "all"}
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    messages = world.messages()
    chunks = [_keyed(messages[i * len(messages) // 4 : (i + 1) * len(messages) // 4]) for i in range(4)]
    log = tmp_path / "detector.log"
    want = sorted(expected_key(e) for e in world.expected)

    async def committed_view() -> list[tuple[Any, ...]]:
        seen = await read_topic(broker.bootstrap, s.findings_topic, isolation_level="read_committed")
        return sorted(finding_key(f) for f in latest_findings(seen).values())

    proc = DetectorProcess(s, log, env)
    watch = _OpenTransactions(broker.bootstrap, [(t, s.state_partitions) for t in (s.sessions_topic_name, s.changelog_topic_name)])
    await watch.start()
    try:
        for i, chunk in enumerate(chunks):
            await wait_until(proc.ready, timeout=60)
            before = (await proc.metrics()).get("detector_events_total", 0)
            librdkafka_produce(broker.bootstrap, s.input_topics, *chunk)
            if i < 3:  # killed mid-stream, as soon as it has started on this chunk

                async def progressed(p: DetectorProcess = proc, b: float = before) -> bool:
                    return (await p.metrics()).get("detector_events_total", 0) > b

                await wait_until(progressed, timeout=60, interval=0.02)
                await _kill_inside_a_transaction(proc, watch)
                proc = DetectorProcess(s, log, env)
        # the final state, through committed transactions only
        try:
            await wait_until(lambda: _equal(committed_view(), want), timeout=150, interval=0.5)
        except AssertionError:
            got = await committed_view()
            missing = [f for f in want if f not in got]
            extra = [f for f in got if f not in want]
            raise AssertionError(f"final findings differ: missing {missing[:5]}, extra {extra[:5]}") from None
        assert proc.terminate() == 0
    finally:
        proc.ensure_stopped()
        await watch.stop()
    assert await committed_view() == want  # exact counts, nothing extra, after an orderly stop too

    output = log.read_text()
    assert output.count("state_restored") >= 3 * s.state_partitions, "each successor restored the state"
    aborted = 0
    for topic in (s.findings_topic, s.changelog_topic_name, s.sessions_topic_name):
        committed = await read_topic(broker.bootstrap, topic, isolation_level="read_committed")
        everything = await read_topic(broker.bootstrap, topic)
        shown = {(m.partition, m.offset) for m in committed}
        written = {(m.partition, m.offset) for m in everything}
        assert shown <= written, topic
        aborted += len(written - shown)
    # the kills hit open transactions (each was frozen with records of an open transaction in the log):
    # those records are there, and a read_committed reader never saw them (the exact counts above, the
    # order below)
    assert aborted > 0, "no record of an aborted transaction in the log"
    # per finding, the committed states only ever grow: no replay after a kill published an older count
    counts: dict[str, list[int]] = defaultdict(list)
    for msg in sorted(
        await read_topic(broker.bootstrap, s.findings_topic, isolation_level="read_committed"),
        key=lambda m: (m.partition, m.offset),
    ):
        finding = orjson.loads(msg.value)
        counts[finding["id"]].append(finding["service"]["count"])
    for finding_id, seq in counts.items():
        assert seq == sorted(seq), f"finding {finding_id} went back in a committed state: {seq}"


def _keyed(messages: list[bytes]) -> tuple[list[bytes], list[bytes | None]]:
    """The messages as `detector ingest` produces them: a log file's records one by one, each keyed by its
    instance (SPEC §10); an event keyed by its own; anything unreadable as it is, unkeyed."""
    values: list[bytes] = []
    keys: list[bytes | None] = []

    def add(value: bytes, key: str | None) -> None:
        values.append(value)
        keys.append(key.encode() if key else None)

    for message in messages:
        try:
            parsed = orjson.loads(message)
        except orjson.JSONDecodeError:
            add(message, None)
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("Records"), list):
            for record in parsed["Records"]:
                add(orjson.dumps(record), record_key(record) if isinstance(record, dict) else None)
        else:
            add(message, event_key(parsed) if isinstance(parsed, dict) else None)
    return values, keys


async def _equal(view: Any, want: list[tuple[Any, ...]]) -> bool:
    return await view == want


class _OpenTransactions:
    """Whether a transaction has written records it has not committed yet: on some partition of the
    watched topics the high watermark (what a read_uncommitted reader may read up to) is past the last
    stable offset (what a read_committed reader may read up to)."""

    def __init__(self, bootstrap: str, topics: list[tuple[str, int]]) -> None:
        self.partitions = [TopicPartition(t, p) for t, n in topics for p in range(n)]
        self.committed = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
        self.uncommitted = AIOKafkaConsumer(bootstrap_servers=bootstrap)

    async def start(self) -> None:
        await self.committed.start()
        await self.uncommitted.start()

    async def stop(self) -> None:
        await self.committed.stop()
        await self.uncommitted.stop()

    async def open(self) -> bool:
        stable = await self.committed.end_offsets(self.partitions)
        high = await self.uncommitted.end_offsets(self.partitions)
        return any(high[tp] > stable[tp] for tp in self.partitions)


async def _kill_inside_a_transaction(proc: DetectorProcess, watch: _OpenTransactions, timeout: float = 60) -> None:
    """SIGKILL ``proc`` while one of its transactions is open: freeze it (SIGSTOP), look, and kill it if a
    transaction of its has written records it has not committed, else let it run a little and look again."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.kill(proc.proc.pid, signal.SIGSTOP)
        if await watch.open():
            proc.kill()
            return
        os.kill(proc.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.005)
    raise AssertionError(f"no open transaction of the service seen within {timeout}s")
