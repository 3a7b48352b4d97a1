"""The service's output path (``send_outputs``): partitioned outputs go as record batches, in order, with
their keys and headers; the rest one by one; a value over the size limit is refused as before."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from kafka_support import broker, create_topics, read_topic, require_real, unique  # noqa: F401 - fixtures

from detector.service.app import send_outputs
from detector.service.partitioning import KeyPartitions


async def test_batched_outputs_arrive_in_partition_order_with_keys_and_headers(broker: Any) -> None:  # noqa: F811
    topic, other = unique("out"), unique("out-other")
    await create_topics(broker.bootstrap, {topic: 3, other: 2})
    partition_of = KeyPartitions(3)
    outputs = []
    for n in range(3000):  # ~1.2 MB: several batches per partition
        key = f"i-{n % 37:017x}".encode()
        outputs.append((topic, b"v%05d" % n + b"x" * 400, key, [("n", str(n).encode())], partition_of(key)))
        if n % 500 == 0:
            outputs.append((other, b"unpartitioned %d" % n, key, [], None))
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_batch_size=64 * 1024)
    await producer.start()
    try:
        sent = await send_outputs(producer, outputs, True, 1024 * 1024)
        for items, future in sent:
            assert not isinstance(future, BaseException)
            await future
        batches = [items for items, _ in sent if items[0][0] == topic]
        assert len(batches) < 100 and sum(map(len, batches)) == 3000  # batched, nothing lost
    finally:
        await producer.stop()
    got = await read_topic(broker.bootstrap, topic)
    assert len(got) == 3000
    by_partition: dict[int, list[int]] = {}
    for msg in got:
        n = int(dict(msg.headers)["n"])
        assert msg.key == f"i-{n % 37:017x}".encode() and msg.value.startswith(b"v%05d" % n)
        assert msg.partition == partition_of(msg.key)
        by_partition.setdefault(msg.partition, []).append(n)
    assert all(ns == sorted(ns) for ns in by_partition.values())  # each partition in the order given
    assert len(await read_topic(broker.bootstrap, other)) == 6


async def test_value_over_the_limit_is_sent_alone_and_refused(broker: Any) -> None:  # noqa: F811
    topic = unique("out-big")
    await create_topics(broker.bootstrap, {topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=64 * 1024)
    await producer.start()
    try:
        outputs = [(topic, b"small", b"k", [], 0), (topic, b"x" * (100 * 1024), b"k", [], 0), (topic, b"small2", b"k", [], 0)]
        sent = await send_outputs(producer, outputs, True, 64 * 1024)
        refused = [items for items, fut in sent if isinstance(fut, MessageSizeTooLargeError)]
        assert refused == [[outputs[1]]]
        for items, fut in sent:
            if items != [outputs[1]]:
                await fut
    finally:
        await producer.stop()
    assert sorted(m.value for m in await read_topic(broker.bootstrap, topic)) == [b"small", b"small2"]


async def test_batches_belong_to_the_transaction(broker: Any) -> None:  # noqa: F811
    """With a transactional producer a batch is part of the open transaction: an aborted one is never
    seen by a ``read_committed`` reader, a committed one is."""
    require_real(broker, "transactions")
    topic = unique("out-tx")
    await create_topics(broker.bootstrap, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=unique("tx"), enable_idempotence=True)
    await producer.start()
    try:
        for outcome in (b"aborted", b"committed"):
            await producer.begin_transaction()
            outputs = [(topic, outcome + b"%d" % n, b"k%d" % n, [], n % 2) for n in range(50)]
            for _, future in await send_outputs(producer, outputs, True, 1024 * 1024):
                assert not isinstance(future, BaseException)
                await future
            if outcome == b"aborted":
                await producer.abort_transaction()
            else:
                await producer.commit_transaction()
    finally:
        await producer.stop()
    committed = await read_topic(broker.bootstrap, topic, isolation_level="read_committed")
    assert sorted(m.value for m in committed) == sorted(b"committed%d" % n for n in range(50))
    assert len(await read_topic(broker.bootstrap, topic)) == 100  # the aborted ones were written
