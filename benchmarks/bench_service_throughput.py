"""Service throughput, Kafka in and findings out, against a bare aiokafka consumer of the same topic.

    python -m benchmarks.bench_service_throughput [--events 100000] [--partitions 3] [--seed N ...] [--shape NAME ...]
                                                  [--uvloop] [--reorder-window-ms N]

Starts the embedded broker once; for every (seed, shape) — by default seeds 7 and 11 over ``default``,
``fleet-5000`` and ``fleet-500`` (``eventgen``) — produces the stream to a fresh input topic, unkeyed and
round-robin over ``--partitions`` partitions as a bridge writes them, counts what ``detector replay``
makes of the same stream, then measures, each from its first message to its last:

- the baseline: a plain ``AIOKafkaConsumer`` loop reading and committing the topic, parsing nothing;
- the service: ``DetectorService(Settings(...)).run()`` until every input is consumed, every
  instance-credential record the replay counts is applied (``detector_instance_events_total``) and every
  finding opened is published (acknowledged). Its rate from the service's construction (connecting,
  creating topics, joining the group) is printed too.

Prints one line per case with the ratio service/baseline (issue 11: target >= 0.4x, goal 0.8x), every
case again, and the worst case last.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService
from detector.service.settings import Settings

from ._common import Worst, add_case_arguments, cases, detector_replay, header, run_async
from ._service import bare_consume, create_topic, names, produce, quiet_logs, samples, unique
from .eventgen import iter_events, write_stream

STALL_SECONDS = 60.0


async def service_run(
    bootstrap: str, prefix_names: dict[str, str], expected_instance: int, events: int, reorder_window_ms: int | None
) -> tuple[float, float, dict[str, float]]:
    """(seconds from the first message consumed to done, seconds from construction to done, metrics)."""
    settings = Settings(
        kafka_bootstrap=bootstrap, http_port=0, log_level="warning", finding_update_seconds=60,
        grace_seconds=10, **prefix_names,
        **({} if reorder_window_ms is None else {"reorder_window_ms": reorder_window_ms}),
    )  # fmt: skip
    constructed = time.perf_counter()
    service = DetectorService(settings)
    task = asyncio.create_task(service.run())
    first = None
    progress, moved = None, time.perf_counter()
    try:
        while True:
            await asyncio.sleep(0.02)
            if task.done():
                raise SystemExit(f"service stopped: {task.result()}")
            s = samples(service.metrics)
            consumed = s.get("detector_events_total", 0.0)
            if first is None and consumed > 0:
                first = time.perf_counter()
            applied = s.get("detector_instance_events_total", 0.0)
            opened = s.get("detector_findings_total", 0.0)
            published = s.get("detector_finding_updates_total", 0.0)
            if consumed >= events and applied >= expected_instance and published >= opened:
                break
            now = (consumed, applied, opened, published)
            if now != progress:
                progress, moved = now, time.perf_counter()
            elif time.perf_counter() - moved > STALL_SECONDS:
                raise SystemExit(
                    f"service made no progress for {STALL_SECONDS:.0f} s: consumed {consumed:.0f}/{events}, "
                    f"instance records {applied:.0f}/{expected_instance}, findings {opened:.0f}, published {published:.0f}"
                )
        assert first is not None
        done = time.perf_counter()
        return done - first, done - constructed, s
    finally:
        service.stop()
        await task


async def main_async(args: argparse.Namespace) -> None:
    header("service throughput (Kafka in, findings out)")
    quiet_logs()
    worst = Worst("service / bare consumer (events/s)")
    with EmbeddedBroker() as broker:
        for seed, shape in cases(args):
            values = list(iter_events(args.events, seed, shape=shape))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "events.jsonl"
                write_stream(path, iter(values))
                _, summary = detector_replay(path)
            prefix = names(unique("bench"))
            topic = prefix["input_topics"]
            await create_topic(broker.bootstrap, topic, args.partitions)
            await produce(broker.bootstrap, topic, values, args.partitions)
            n = len(values)
            base = await bare_consume(broker.bootstrap, topic, n)
            svc, whole, s = await service_run(
                broker.bootstrap, prefix, summary["instance_records"], n, args.reorder_window_ms
            )
            detail = (
                f"{n:,} events round-robin on {args.partitions} partitions; bare consumer {n / base:,.0f}/s; "
                f"service {n / svc:,.0f}/s ({n / whole:,.0f}/s from construction); "
                f"{s.get('detector_findings_total', 0):.0f} findings (replay: {summary['findings']}), "
                f"{s.get('detector_events_malformed_total', 0):.0f} malformed"
            )
            worst.add(seed, shape, base / svc, detail, target=">= 0.4x (goal 0.8x)")
    worst.report()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--reorder-window-ms", type=int, default=None,
        help="the detect stage's longest hold (default: the service's); the end of a finite stream waits it out",
    )  # fmt: skip
    add_case_arguments(parser, seeds=(7, 11), shapes=("default", "fleet-5000", "fleet-500"))
    run_async(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    main()
