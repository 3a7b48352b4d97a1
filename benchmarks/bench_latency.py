"""Event-to-finding latency of the service at a steady input rate (default 5,000 events/s).

    python -m benchmarks.bench_latency [--rate 5000] [--seconds 20] [--attack-share 0.01] [--uvloop] [--reorder-window-ms N]

Starts the embedded broker and ``DetectorService(Settings(...))`` in this process; a child process
produces the seeded realistic stream (``eventgen``) at ``--rate`` events/s, paced every 10 ms, where
about ``--attack-share`` of the events are a stolen instance credential used from outside AWS, each on a
fresh instance (so each opens a new finding, published at once). For each, latency is the time from
handing the event to the producer to the service's ``on_finding`` callback, which runs once the finding
is acknowledged by the broker. Every event carries the wall clock as its ``eventTime``, as a live stream
does (the detect stage's hold releases records by eventTime). Prints p50/p90/p99/max, p99 last
(target <= 250 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService
from detector.service.settings import Settings

from ._common import REPO, header, run_async
from ._service import create_topic, names, samples, unique

PRODUCER = """
import asyncio, json, re, sys, time
from aiokafka import AIOKafkaProducer
from benchmarks.eventgen import World, instance_event, iter_events, _envelope
import orjson, random

TIMES = re.compile(rb'"(eventTime|time)":"[^"]*"')

def stamped(value):
    # a live stream: every event's eventTime is the wall clock (UTC, whole seconds) when it is produced
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
    return TIMES.sub(lambda m: b'"' + m.group(1) + b'":"' + now + b'"', value)

async def main(bootstrap, topic, rate, seconds, share, out):
    world = World(seed=13, instances=0)
    background = iter_events(int(rate * seconds) + 1000, seed=17, attack_rate=0.0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    sent = {}
    rng = random.Random(3)
    tick = 0.01
    per_tick = rate * tick
    start = time.perf_counter()
    n = 0
    i = 0
    while time.perf_counter() - start < seconds:
        due = int((time.perf_counter() - start) / tick + 1) * per_tick
        futures = []
        while n < due:
            if rng.random() < share:
                inst = world._instance(10_000 + i); i += 1
                value = orjson.dumps(_envelope(world.rng, instance_event(world, inst, "outside")))
                sent[inst.instance_id] = time.time()
            else:
                value = next(background)
            futures.append(await producer.send(topic, stamped(value)))
            n += 1
        await asyncio.sleep(max(0.0, start + (int((time.perf_counter() - start) / tick) + 1) * tick - time.perf_counter()))
    await asyncio.gather(*futures)
    await producer.stop()
    with open(out, "w") as f:
        json.dump({"sent": sent, "events": n, "seconds": time.perf_counter() - start}, f)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]))
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def main_async(args: argparse.Namespace) -> None:
    header(f"event-to-finding latency at {args.rate:,.0f} events/s")
    received: dict[str, float] = {}

    def on_finding(finding: dict[str, Any]) -> None:
        instance = finding["resource"]["instanceDetails"]["instanceId"]
        received.setdefault(instance, time.time())

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        prefix = names(unique("latency"))
        await create_topic(broker.bootstrap, prefix["input_topics"], args.partitions)
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, http_port=0, log_level="warning", finding_update_seconds=60,
            grace_seconds=10, **prefix,
            **({} if args.reorder_window_ms is None else {"reorder_window_ms": args.reorder_window_ms}),
        )  # fmt: skip
        print(f"reorder_window_ms: {settings.reorder_window_ms}")
        service = DetectorService(settings, on_finding=on_finding)
        task = asyncio.create_task(service.run())
        while samples(service.metrics).get("detector_ready", 0) < 1:
            await asyncio.sleep(0.1)
            if task.done():
                raise SystemExit("service stopped")
        out = Path(tmp) / "sent.json"
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PRODUCER, broker.bootstrap, prefix["input_topics"], str(args.rate),
            str(args.seconds), str(args.attack_share), str(out), cwd=REPO,
        )  # fmt: skip
        await producer.wait()
        produced = json.loads(out.read_text())
        deadline = time.monotonic() + 30
        while len(received) < len(produced["sent"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        service.stop()
        await task
    sent = produced["sent"]
    latencies = [received[i] - t for i, t in sent.items() if i in received]
    missing = len(sent) - len(latencies)
    print(f"produced {produced['events']:,} events in {produced['seconds']:.1f} s "
          f"({produced['events'] / produced['seconds']:,.0f}/s); {len(sent)} attacks, {missing} findings missing")  # fmt: skip
    if not latencies:
        raise SystemExit("no finding arrived")
    ms = [x * 1000 for x in latencies]
    print(f"latency ms: p50 {percentile(ms, 50):.0f}, p90 {percentile(ms, 90):.0f}, max {max(ms):.0f}")
    print(f"p99 event-to-finding latency: {percentile(ms, 99):.0f} ms (target <= 250 ms)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--attack-share", type=float, default=0.01)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument(
        "--reorder-window-ms", type=int, default=None,
        help="the detect stage's hold for out-of-order records (default: the service's default); "
        "0 suits a bridge keyed by session",
    )  # fmt: skip
    run_async(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    main()
