"""Service throughput, Kafka in and findings out, against a bare aiokafka consumer of the same topic.

    python -m benchmarks.bench_service_throughput [--events 100000] [--partitions 3] [--uvloop] [--reorder-window-ms N]

Starts the embedded broker (tansu), produces a seeded realistic stream (``eventgen``) to an input topic,
then measures, each from its first message to its last:

- the baseline: a plain ``AIOKafkaConsumer`` loop reading and committing the topic, parsing nothing;
- the service: ``DetectorService(Settings(...)).run()`` until every input is consumed, every
  instance-credential record is applied and every finding of the stream is published (acknowledged).

Prints both rates and, last, the ratio service/baseline (target >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from detector.core.engine import issuance_parts, session_parts
from detector.core.records import decode
from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService
from detector.service.settings import Settings

from ._common import header, run_async
from ._service import bare_consume, create_topic, names, produce, samples, unique
from .eventgen import iter_events


async def service_run(
    bootstrap: str, prefix_names: dict[str, str], expected_applied: int, events: int, reorder_window_ms: int | None
) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            kafka_bootstrap=bootstrap, http_port=0, log_level="warning", finding_update_seconds=60,
            grace_seconds=10, **prefix_names,
            **({} if reorder_window_ms is None else {"reorder_window_ms": reorder_window_ms}),
        )  # fmt: skip
        del tmp
        service = DetectorService(settings)
        task = asyncio.create_task(service.run())
        first = None
        try:
            while True:
                await asyncio.sleep(0.02)
                if task.done():
                    raise SystemExit(f"service stopped: {task.result()}")
                s = samples(service.metrics)
                consumed = s.get("detector_events_total", 0.0)
                if first is None and consumed > 0:
                    first = time.perf_counter()
                if consumed >= events and service.engine.counters.records >= expected_applied:
                    opened = s.get("detector_findings_total", 0.0)
                    if s.get("detector_finding_updates_total", 0.0) >= opened:
                        break
            assert first is not None
            return time.perf_counter() - first, s
        finally:
            service.stop()
            await task


async def main_async(args: argparse.Namespace) -> None:
    header("service throughput (Kafka in, findings out)")
    values = list(iter_events(args.events, args.seed))
    expected_applied = 0
    for value in values:
        for record in decode(value).records:
            if session_parts(record) or issuance_parts(record):
                expected_applied += 1
    with EmbeddedBroker() as broker:
        prefix = names(unique("bench"))
        topic = prefix["input_topics"]
        await create_topic(broker.bootstrap, topic, args.partitions)
        started = time.perf_counter()
        await produce(broker.bootstrap, topic, values)
        print(f"input: {len(values)} events on {args.partitions} partitions, produced in "
              f"{time.perf_counter() - started:.1f} s; {expected_applied} records to apply")  # fmt: skip
        base = await bare_consume(broker.bootstrap, topic, len(values))
        print(f"baseline (bare aiokafka consumer, no parsing): {base:.2f} s, {len(values) / base:,.0f} events/s")
        svc, s = await service_run(broker.bootstrap, prefix, expected_applied, len(values), args.reorder_window_ms)
        print(f"service (route, detect, findings acknowledged): {svc:.2f} s, {len(values) / svc:,.0f} events/s; "
              f"{s.get('detector_findings_total', 0):.0f} findings, "
              f"{s.get('detector_events_malformed_total', 0):.0f} malformed")  # fmt: skip
    print(f"ratio (service events/s / baseline events/s): {base / svc:.2f}x (target >= 0.8x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--reorder-window-ms", type=int, default=None,
        help="the detect stage's longest hold (default: the service's); the end of a finite stream waits it out",
    )  # fmt: skip
    run_async(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    main()
