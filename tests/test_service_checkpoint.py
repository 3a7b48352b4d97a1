"""Checkpoints (issue 11): outputs are queued at once, and every ``checkpoint_interval_ms`` the stage awaits
their acknowledgements, writes the changelog of each session changed since the last checkpoint once, then
commits the offsets the checkpoint covers."""

from __future__ import annotations

from collections import Counter
import asyncio
from pathlib import Path
from typing import Any

import pytest
from kafka_support import (  # noqa: F401 - fixtures
    broker,
    committed_offsets,
    create_topics,
    end_offsets,
    finding_key,
    latest_findings,
    librdkafka_produce,
    proxied_broker,
    read_topic,
    require_real,
    service_settings,
    unique,
    wait_until,
)
from test_service import EXPECTED, WORLD, settings_for, start, stop, wait_consumed, world_records_total
from test_state import _record, total_records

from detector.core import changelog
from detector.demo import world_messages
from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService
from detector.service.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.kafka

VICTIM = "i-0aaaaaaaaaaaaaaa1"
OWN = "3.225.16.109"


def _offsets_by_key(messages: list[Any]) -> Counter[tuple[bytes, int | None]]:
    return Counter((m.key, changelog.source_offset(m.headers)) for m in messages)


async def test_changelog_gets_one_record_per_changed_session_per_checkpoint(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A session touched by five fetches within one checkpoint interval is written to the changelog once,
    tagged with the last offset the checkpoint covers; nothing is committed or written before it."""
    registry = tmp_path / "registry.json"
    registry.write_text('{"accounts": {}}')
    prefix = unique("ckpt")
    # one record per fetch; an interval no test run reaches, so only the checkpoints the test asks for happen
    s = settings_for(
        broker.bootstrap, prefix, registry=registry, state_partitions=1, max_poll_records=1, reorder_window_ms=0,
        checkpoint_interval_ms=60_000,
    )
    await create_topics(broker.bootstrap, {s.input_topics: 1})
    service, task = await start(s)
    try:
        first = [_record(VICTIM, OWN, f"2026-11-01T10:0{i}:00Z", f"a{i}") for i in range(5)]
        librdkafka_produce(broker.bootstrap, s.input_topics, first)
        await wait_until(lambda: service.progress()["applied"] >= 5, timeout=30)
        assert service.detect.committed == {} or set(service.detect.committed.values()) == {0}
        assert service.metrics.changelog_records._value.get() == 0  # five fetches, no checkpoint yet
        await service.route.checkpoint()
        await service.detect.checkpoint()
        written = await read_topic(broker.bootstrap, s.changelog_topic_name)
        assert written and _offsets_by_key(written) == Counter({(m.key, 4): 1 for m in written})
        assert await committed_offsets(broker.bootstrap, s.detect_group_id, s.sessions_topic_name, 1) == {0: 5}

        second = [_record(VICTIM, OWN, f"2026-11-01T10:1{i}:00Z", f"b{i}") for i in range(5)]
        librdkafka_produce(broker.bootstrap, s.input_topics, second)
        await wait_until(lambda: service.progress()["applied"] >= 10, timeout=30)
    finally:
        assert await stop(service, task) == 0  # shutdown checkpoints
    written = await read_topic(broker.bootstrap, s.changelog_topic_name)
    counts = _offsets_by_key(written)
    keys = {key for key, _ in counts}
    assert counts == Counter({**{(key, 4): 1 for key in keys}, **{(key, 9): 1 for key in keys}}), counts
    assert await committed_offsets(broker.bootstrap, s.detect_group_id, s.sessions_topic_name, 1) == {0: 10}
    assert await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 1) == {0: 10}


class _ProducerThroughProxy(DetectorService):
    """A service whose producer alone reaches the broker through a proxy the test can cut; its consumers,
    and so its commits, go direct."""

    producer_bootstrap = ""

    def _producer_kwargs(self) -> dict[str, Any]:
        return super()._producer_kwargs() | {"bootstrap_servers": self.producer_bootstrap}


async def test_offsets_wait_for_the_acknowledgement_of_their_outputs(broker: EmbeddedBroker) -> None:
    """While the producer cannot deliver, the stages keep consuming and checkpointing but commit nothing;
    once it can, the retried checkpoint delivers every output and commits, and no finding is lost."""
    require_real(broker, "a listener advertised at the proxy, with the consumers' own going direct")
    async with proxied_broker(broker) as backend:
        prefix = unique("acks")
        s = settings_for(backend.direct, prefix, checkpoint_interval_ms=100)
        await create_topics(backend.direct, {s.input_topics: 3})
        service = _ProducerThroughProxy(s)
        service.producer_bootstrap = backend.bootstrap
        task = asyncio.create_task(service.run())
        try:
            await wait_until(service.ready, timeout=30)
            messages = world_messages(WORLD)
            await asyncio.to_thread(librdkafka_produce, backend.direct, s.input_topics, messages[:20])
            await wait_until(lambda: service.progress()["read"] >= total_records(messages[:20]), timeout=30)
            await wait_until(lambda: _all_committed(backend.direct, s.group_id, s.input_topics, 3), timeout=30)
            before = await committed_offsets(backend.direct, s.group_id, s.input_topics, 3)
            checkpoints = service.route.checkpoints
            await backend.proxy.cut()
            # a few records that are all routed (instance credentials, no finding): the outputs of what is
            # fetched are queued at once, then a checkpoint waits for them (and holds up the next fetches)
            quiet = [_record(VICTIM, OWN, f"2026-11-01T10:0{i}:00Z", f"q{i}") for i in range(10)]
            await asyncio.to_thread(librdkafka_produce, backend.direct, s.input_topics, quiet)
            await wait_until(lambda: service.progress()["read"] > total_records(messages[:20]), timeout=30)
            # absence over many checkpoint intervals: nothing a checkpoint could commit is acknowledged
            await asyncio.sleep(1.5)
            assert not task.done()
            assert await committed_offsets(backend.direct, s.group_id, s.input_topics, 3) == before
            assert service.route.checkpoints <= checkpoints + 1  # at most the one waiting for the broker
            await asyncio.to_thread(librdkafka_produce, backend.direct, s.input_topics, messages[20:])
            await backend.proxy.start()
            await wait_consumed(service, world_records_total() + len(quiet), timeout=120)
            await wait_until(lambda: _all_committed(backend.direct, s.group_id, s.input_topics, 3), timeout=60)
            parts = s.state_partitions
            await wait_until(lambda: _all_committed(backend.direct, s.detect_group_id, s.sessions_topic_name, parts), timeout=60)
            assert await stop(service, task) == 0
        finally:
            if not task.done():
                service.stop()
                await asyncio.wait_for(task, timeout=30)
        latest = latest_findings(await read_topic(backend.direct, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == EXPECTED


async def _all_committed(bootstrap: str, group: str, topic: str, partitions: int) -> bool:
    done = await committed_offsets(bootstrap, group, topic, partitions)
    return {p: done[p] or 0 for p in done} == await end_offsets(bootstrap, topic, partitions)


@pytest.mark.parametrize("value", [0, 5, 60_001, "soon"])
def test_checkpoint_interval_is_validated_naming_the_setting(value: Any) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(None, {"checkpoint_interval_ms": value})
    assert "checkpoint_interval_ms" in str(info.value)


def test_checkpoint_interval_default() -> None:
    assert Settings().checkpoint_interval_ms == 200
    assert service_settings("localhost:9092", "x", checkpoint_interval_ms=50).checkpoint_interval_ms == 50


async def test_idle_interval_elapses_then_commits(broker: EmbeddedBroker) -> None:
    """With the default interval the offsets are committed without a shutdown, within about the interval."""
    prefix = unique("ckptidle")
    s = settings_for(broker.bootstrap, prefix, checkpoint_interval_ms=100)
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    service, task = await start(s)
    try:
        librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD))
        await wait_consumed(service, world_records_total())
        await wait_until(lambda: _all_committed(broker.bootstrap, s.group_id, s.input_topics, 3), timeout=10)
        await wait_until(lambda: _all_committed(broker.bootstrap, s.detect_group_id, s.sessions_topic_name, 6), timeout=10)
    finally:
        assert await stop(service, task) == 0


async def test_a_transaction_on_revoke_commits_every_partition_whose_outputs_it_carries(broker: EmbeddedBroker) -> None:
    """Exactly once: the transaction of a revoke carries the outputs of every assigned partition, so it must
    commit the offsets of every one of them, not only of the partitions revoked (under a cooperative
    assignor the others stay; their outputs committed without their offsets would be produced again after
    a crash)."""
    require_real(broker, "transactions")
    prefix = unique("txrevoke")
    s = settings_for(
        broker.bootstrap, prefix, enable_idempotence=True, transactional_id=f"{prefix}-0", producer_acks="all",
        checkpoint_interval_ms=60_000,  # no checkpoint but the one the test asks for
    )
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    service, task = await start(s)
    try:
        messages = world_messages(WORLD)
        await asyncio.to_thread(librdkafka_produce, broker.bootstrap, s.input_topics, messages)
        await wait_until(lambda: service.progress()["read"] >= world_records_total(), timeout=60)
        route = service.route
        assert len(route.assigned) == 3 and await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 3) == {0: None, 1: None, 2: None}
        one = min(route.assigned, key=lambda tp: tp.partition)
        await route.checkpoint(flush_all=True, partitions={one})  # what on_revoked does with a revoked subset

        async def committed() -> dict[int, int | None]:
            return await committed_offsets(broker.bootstrap, s.group_id, s.input_topics, 3)

        # the coordinator makes transactional offsets visible once the commit markers are written
        await wait_until(lambda: committed_partition(committed, one.partition), timeout=15)
        done = await committed()
        assert all(done[p] for p in range(3)), done
        assert await stop(service, task) == 0
    finally:
        if not task.done():
            service.stop()
            await asyncio.wait_for(task, timeout=30)


async def committed_partition(committed: Any, partition: int) -> bool:
    return bool((await committed())[partition])
