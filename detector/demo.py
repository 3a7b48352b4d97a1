"""The embedded default: the bundled sample world, and a readable table of findings."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class World:
    root: Path
    inputs: list[str]
    registry: Path
    expected: Path  # SPEC part one's answer (IMDSv1 findings off)
    expected_part2: Path  # with part two's defaults (SPEC §13's IMDSv1 findings added)


def sample_world() -> World:
    root = Path(str(resources.files("detector") / "data" / "sample-world"))
    names = (root / "files.txt").read_text().split()
    return World(root, [str(root / n) for n in names], root / "registry.json", root / "expected.json", root / "expected-part2.json")


_COLUMNS = ("severity", "type", "account", "instance", "remote account", "count", "last seen", "id")


def table_row(finding: dict[str, Any]) -> tuple[str, ...]:
    action = finding["service"]["action"]["awsApiCallAction"]
    remote = action.get("remoteAccountDetails", {})
    sev = finding["severity"]
    return (
        f"{'HIGH' if sev >= 7 else 'MEDIUM'} ({sev})",
        finding["type"].rsplit(".", 1)[-1],
        finding["accountId"],
        finding["resource"]["instanceDetails"]["instanceId"],
        remote.get("accountId", "unknown" if remote else "-"),
        str(finding["service"]["count"]),
        finding["service"]["eventLastSeen"],
        finding["id"],
    )


_WIDTHS = (10, 10, 12, 19, 14, 5, 20, 32)


def format_row(values: tuple[str, ...]) -> str:
    return "  ".join(v.ljust(w) for v, w in zip(values, _WIDTHS, strict=True)).rstrip()


def format_table(rows: list[tuple[str, ...]]) -> str:
    lines = [format_row(_COLUMNS), format_row(tuple("-" * w for w in _WIDTHS))]
    return "\n".join(lines + [format_row(r) for r in rows])


def print_table(findings: list[dict[str, Any]], out: TextIO) -> None:
    out.write(format_table([table_row(f) for f in findings]) + "\n")


def world_messages(world: World) -> list[bytes]:
    """The sample world as Kafka message values, in order: one per JSON Lines line, one per log file."""
    import gzip

    values: list[bytes] = []
    for name in world.inputs:
        data = Path(name).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if name.endswith((".jsonl", ".jsonl.gz")):
            values.extend(line for line in data.splitlines() if line.strip())
        else:
            values.append(data)
    return values


async def produce_values(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce unkeyed, as an EventBridge-to-Kafka bridge does."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    try:
        await producer.start()
        futures = [await producer.send(topic, value) for value in values]
        for fut in futures:
            await fut
    finally:
        await producer.stop()


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from .service.app import describe_settled

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            await describe_settled(admin, [t.name for t in new])  # usable once this returns
    finally:
        await admin.close()


def dead_letter_line(reasons: dict[str, int], topic: str) -> str:
    """The demo's one line about malformed input: how many dead letters, by reason."""
    total = sum(reasons.values())
    if not total:
        return f"dead letters: none (topic {topic})"
    by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
    return f"dead letters: {total} malformed input(s) on topic {topic} ({by_reason})"


async def run_demo(out: TextIO, timeout: float = 60.0) -> int:
    """Broker, service and a findings subscriber on one loop; the sample world streamed through."""
    import asyncio
    import time

    import orjson
    from aiokafka import AIOKafkaConsumer

    from .embedded import EmbeddedBroker
    from .service.app import DetectorService
    from .service.settings import Settings

    world = sample_world()
    expected = len(orjson.loads(world.expected_part2.read_bytes()))
    with EmbeddedBroker() as broker:
        out.write(f"local broker on {broker.bootstrap}; streaming the sample world ({world.root.name})\n\n")
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            registry=world.registry,
            http_port=0,
            finding_update_seconds=1.0,
            log_level="warning",
        )
        await create_topics(broker.bootstrap, {"cloudtrail": 3, settings.findings_topic: 3, settings.dlq_topic: 1})
        service = DetectorService(settings)
        runner = asyncio.create_task(service.run())
        subscriber = AIOKafkaConsumer(
            settings.findings_topic, settings.dlq_topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
        )
        await subscriber.start()
        latest: dict[str, dict[str, Any]] = {}
        dead: dict[str, int] = {}  # dead letters by reason: one summary line, not a line each
        try:
            await produce_values(broker.bootstrap, "cloudtrail", world_messages(world))
            out.write(format_table([]) + "\n")
            deadline = time.monotonic() + timeout
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                batch = await subscriber.getmany(timeout_ms=250)
                for messages in batch.values():
                    for msg in messages:
                        if msg.topic == settings.dlq_topic:
                            reason = dict(msg.headers or ()).get("detector.error.reason", b"unknown").decode()
                            dead[reason] = dead.get(reason, 0) + 1
                            continue
                        finding = orjson.loads(msg.value)
                        if finding["id"] not in latest:
                            out.write(format_row(table_row(finding)) + "\n")
                            out.flush()
                        latest[finding["id"]] = finding
                        quiet_since = time.monotonic()
                if len(latest) >= expected and time.monotonic() - quiet_since > 2.5:
                    break
        finally:
            service.stop()
            await runner
            await subscriber.stop()
        out.write("\n" + dead_letter_line(dead, settings.dlq_topic) + "\n")
        out.write(f"\nfinal state of {len(latest)} finding(s) on topic {settings.findings_topic}:\n")
        print_table(sorted(latest.values(), key=lambda f: f["service"]["eventFirstSeen"]), out)
    return 0 if len(latest) >= expected else 1
