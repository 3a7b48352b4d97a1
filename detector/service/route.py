"""The route stage: input topics -> ``sessions_topic``, keyed by instance ID (SPEC §10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from ..core.engine import MalformedRecord, route_keys
from ..core.ordering import event_time_key, merge_runs
from ..core.records import decode_fast, encode_routed
from .partitioning import KeyPartitions
from .stage import EMPTY_VALUE, ROUTED_INSTANCE, Stage, source_headers

if TYPE_CHECKING:
    from .app import DetectorService


class RouteStage(Stage):
    """Input topics → ``sessions_topic`` keyed by instance ID; malformed input → dead letters."""

    name = "route"

    def __init__(self, service: DetectorService) -> None:
        super().__init__(service, service.settings.group_id)
        self.records_read = 0
        self.records_routed = 0
        # the sessions topic's partition of each key, as the default partitioner computes it (start-up sets
        # the topic's real count)
        self.partition_of = KeyPartitions(service.settings.state_partitions)

    def subscribe(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        kind, value = self.service.settings.input_subscription
        if kind == "pattern":
            consumer.subscribe(pattern=value, listener=listener)
        else:
            consumer.subscribe(topics=value, listener=listener)

    def process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Route one batch, its partitions merged by eventTime (see :mod:`detector.core.ordering`)."""
        m = self.service.metrics
        sessions_topic = self.service.settings.sessions_topic_name
        outbox = self.outbox
        partition_of = self.partition_of
        read = routed = kept = 0  # routed: copies on the sessions topic; kept: records they came from
        runs = []
        for tp, messages in batch.items():
            m.events.labels(tp.topic).inc(len(messages))
            run = []
            for msg in messages:
                decoded = decode_fast(msg.value) if msg.value is not None else None
                first = decoded.records[0] if decoded is not None and decoded.records else None
                run.append((event_time_key(first), (msg, decoded)))
            runs.append(run)
            self.processed[tp] = messages[-1].offset + 1
        for msg, decoded in merge_runs(runs):
            if decoded is None:
                m.malformed.labels(EMPTY_VALUE).inc()
                self.dead_letter(msg, EMPTY_VALUE, "message has no value", list(msg.headers or ()) + source_headers(msg))
                continue
            headers: list[tuple[str, bytes]] | None = None
            problem: MalformedRecord | None = None
            read += decoded.ignored  # records that cannot matter: counted, never routed
            for record in decoded.records:
                read += 1
                try:
                    keys = route_keys(record)
                except MalformedRecord as exc:
                    m.malformed.labels(exc.reason).inc()
                    problem = problem or exc
                    continue
                if not keys:
                    continue
                if headers is None:
                    headers = source_headers(msg)
                value = encode_routed(record)
                if len(keys) == 1:
                    key = keys[0].encode()
                    outbox.append((sessions_topic, value, key, headers, partition_of(key)))
                else:  # one copy per instance, each applied only for its instance (Engine.apply's ``only``)
                    for name in keys:
                        key = name.encode()
                        outbox.append((sessions_topic, value, key, [*headers, (ROUTED_INSTANCE, key)], partition_of(key)))
                routed += len(keys)
                kept += 1
            if decoded.malformed:
                for reason in decoded.malformed:
                    m.malformed.labels(reason).inc()
                kinds = ", ".join(sorted(set(decoded.malformed)))
                self.dead_letter(
                    msg,
                    decoded.malformed[0],
                    f"{len(decoded.malformed)} malformed element(s): {kinds}",
                    list(msg.headers or ()) + source_headers(msg),
                )
            elif problem is not None:
                self.dead_letter(msg, problem.reason, str(problem), list(msg.headers or ()) + source_headers(msg))
        self.records_read += read
        self.records_routed += routed
        m.repartitioned.inc(routed)
        m.records_dropped.inc(read - kept)

