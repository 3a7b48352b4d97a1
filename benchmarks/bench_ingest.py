"""`detector ingest` throughput against reading and decompressing the same S3 objects with aiobotocore alone.

    python -m benchmarks.bench_ingest [--records 60000] [--seeds 1,2] [--concurrency 16] [--partitions 3]

Starts a moto server (S3, SQS) and the embedded broker (tansu). For each seed and each shape (many small
log files, few large ones) it writes the seeded realistic records (``eventgen``, ~1.5 KB each) as gzipped
CloudTrail log files into a bucket, then measures, in the same run:

- the baseline: aiobotocore ``GetObject`` of every object, streamed and gunzipped (``zlib``), with the same
  number of objects in flight as ``ingest``'s ``concurrency``; nothing parsed, nothing produced;
- ``ingest``: ``IngestService`` (the code of ``detector ingest``) draining a backlog of one S3 notification
  per object from an SQS queue: streaming and splitting each object, producing every record to the broker
  (a topic of ``--partitions`` partitions, 3 like docker-compose.yml's ``cloudtrail``) and deleting the
  message once all its records are acknowledged; timed from the service being ready (connected to the
  broker and the queue, so receiving) to the last message deleted.

Prints records/s and MB/s (decompressed) of both, the ratio ingest/baseline per run and, last, the worst
ratio (target >= 0.7). moto serves S3 from a Python process, so both sides pay the same object transfer.
Also per run: the CPU seconds of the ingest process, the broker and moto while ingest drains the queue, and
the time to produce the same records (split and keyed beforehand) with nothing else running: the broker's
and the Kafka client's share alone, which bounds the ratio this machine allows (``at best``).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
from aiobotocore.session import get_session

from detector.embedded import EmbeddedBroker

from ._common import header, load
from .eventgen import iter_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SHAPES = {"small-files": 300, "large-files": 6000}  # records per log file


def log_files(records: int, per_file: int, seed: int) -> list[bytes]:
    files, batch = [], []
    for line in iter_events(records, seed, malformed_rate=0.0):
        event = orjson.loads(line)
        batch.append(event["detail"])
        if len(batch) == per_file:
            files.append(gzip.compress(orjson.dumps({"Records": batch}), compresslevel=6, mtime=0))
            batch = []
    if batch:
        files.append(gzip.compress(orjson.dumps({"Records": batch}), compresslevel=6, mtime=0))
    return files


async def baseline(bucket: str, keys: list[str], concurrency: int, chunk: int) -> tuple[float, int, float]:
    """Seconds to stream and gunzip every object, the decompressed bytes, and this process's CPU seconds."""
    total = 0
    sem = asyncio.Semaphore(concurrency)
    async with get_session().create_client("s3") as s3:

        async def one(key: str) -> None:
            nonlocal total
            async with sem:
                answer = await s3.get_object(Bucket=bucket, Key=key)
                inflate = zlib.decompressobj(wbits=31)
                async with answer["Body"] as stream:
                    while data := await stream.read(chunk):
                        total += len(inflate.decompress(data))
                total += len(inflate.flush())

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(k) for k in keys))
        return time.perf_counter() - started, total, time.process_time() - cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def moto_receive_cost(server: Any, depths: tuple[int, ...] = (10, 100, 200)) -> dict[int, float]:
    """moto's CPU seconds for one ReceiveMessage of 10 messages from a queue holding ``depth`` messages: the
    share of the SQS work that is AWS's against real SQS but this machine's here (it grows with the depth,
    and the bench drains a backlog of one message per object)."""
    from ingest_support import make_queue

    sqs, cost = server.client("sqs"), {}
    for depth in depths:
        url, _ = make_queue(server, visibility=300)
        for i in range(0, depth, 10):
            sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": "{}" * 200} for j in range(10)])
        before = cpu_seconds(server.proc.pid)
        for _ in range(5):
            sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=300)
        cost[depth] = (cpu_seconds(server.proc.pid) - before) / 5
    return cost


async def produce_only(bootstrap: str, files: list[bytes], partitions: int) -> float:
    """Seconds to produce the same records, split and keyed beforehand (not timed), to a new topic as ingest
    does (one producer, aiokafka batches per partition, every batch acknowledged): what the broker and the
    Kafka client alone cost on this machine, a floor under ingest's time."""
    from aiokafka import AIOKafkaProducer
    from ingest_support import new_topic

    from detector.ingest.bodies import ObjectSplitter, raw_record_key
    from detector.ingest.process import PRODUCER_BATCH_BYTES
    from detector.service.partitioning import KeyPartitions

    records: list[tuple[bytes | None, bytes]] = []
    for body in files:
        splitter = ObjectSplitter()
        for run in [*splitter.feed(body), *splitter.close()]:
            for raw in run:
                key = raw_record_key(raw)
                records.append((key.encode() if key else None, raw))
    topic = await new_topic(bootstrap, "bench-produce", partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=PRODUCER_BATCH_BYTES)
    await producer.start()
    try:
        partition_of, sent, open_ = KeyPartitions(partitions), [], {}
        started = time.perf_counter()
        for key, value in records:
            partition = partition_of(key) if key else 0
            batch = open_.get(partition) or open_.setdefault(partition, producer.create_batch())
            if batch.append(key=key, value=value, timestamp=None) is None:
                sent.append(await producer.send_batch(batch, topic, partition=partition))
                batch = open_[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in open_.items():
            sent.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*sent)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def ingest(
    server: Any, bootstrap: str, bucket: str, keys: list[str], records: int, concurrency: int, partitions: int, pids: dict[str, int],
    workers: int = 1,
) -> tuple[float, dict[str, float]]:
    """Seconds to drain the backlog, and the CPU seconds of this process, of ingest's workers and of ``pids``
    meanwhile."""
    from ingest_support import ingest_settings, make_queue, new_topic, queue_counts, sample, start_ingest, stop_ingest

    url, _ = make_queue(server, visibility=300)
    topic = await new_topic(bootstrap, "bench-ingest", partitions)  # ingest refuses to start on a missing topic
    sqs = server.client("sqs")
    notes = [
        json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": k}}}]})
        for k in keys
    ]
    for i in range(0, len(notes), 10):  # a backlog: the notifications wait in the queue before ingest starts
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": b} for j, b in enumerate(notes[i : i + 10])])
    settings = ingest_settings(bootstrap, topic, url, concurrency=concurrency, wait_seconds=1, workers=workers)
    service, task = await start_ingest(settings, wait_ready=False)
    while not service.ready():  # connected to the broker and the queue: it receives from now on
        await asyncio.sleep(0.002)
        if task.done():
            task.result()
    if workers > 1:
        pids = pids | {f"worker {w.number}": w.process.pid for w in service.processor.workers}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()} | {"ingest process": time.process_time()}
    started = time.perf_counter()
    while sample(service, "detector_ingest_records_total", source="s3") < records or sample(
        service, "detector_ingest_messages_total", queue=url.rsplit("/", 1)[1], result="deleted"
    ) < len(keys):
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - started
    cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()} | {"ingest process": time.process_time() - cpu["ingest process"]}
    await stop_ingest(service, task)
    assert queue_counts(server, url) == (0, 0)
    return elapsed, cpu


async def main(args: argparse.Namespace) -> None:
    from aws_helpers import MotoServer
    from ingest_support import aws_env

    from detector.service.logging import configure_logging

    # as `detector ingest` logs by default (the debug lines cost per message), on standard error (workers too)
    configure_logging("info", stream=sys.stderr)
    header("detector ingest vs aiobotocore GetObject + gunzip (same objects, same run)")
    print(
        f"records per run: {args.records}; concurrency {args.concurrency}; topic partitions {args.partitions}; shapes {SHAPES}\n"
        "one ingest process (the baseline is one process too); the broker (tansu) and moto run in processes of their own"
    )
    server = MotoServer()
    ratios: dict[int, list[tuple[float, str]]] = {w: [] for w in args.workers}
    try:
        with EmbeddedBroker() as broker, aws_env(server.url):
            receive = moto_receive_cost(server)
            print("moto's CPU for one ReceiveMessage of 10, by queue depth: " + ", ".join(f"{d}: {c * 1e3:.0f} ms" for d, c in receive.items()))
            s3 = server.client("s3")
            for seed in args.seeds:
                for shape, per_file in SHAPES.items():
                    bucket = f"bench-{seed}-{shape}-{os.urandom(3).hex()}"
                    s3.create_bucket(Bucket=bucket)
                    files = log_files(args.records, per_file, seed)
                    keys = [f"AWSLogs/111122223333/CloudTrail/us-east-1/2026/11/30/f{n:05d}.json.gz" for n in range(len(files))]
                    for key, body in zip(keys, files):
                        s3.put_object(Bucket=bucket, Key=key, Body=body)
                    stored = sum(len(f) for f in files)
                    pids = {"broker": broker.process.pid, "moto": server.proc.pid}
                    moto_cpu = cpu_seconds(server.proc.pid)
                    base_s, raw, base_cpu = min([await baseline(bucket, keys, args.concurrency, 1 << 20) for _ in range(2)])
                    moto_cpu = (cpu_seconds(server.proc.pid) - moto_cpu) / 2
                    prod_s = await produce_only(broker.bootstrap, files, args.partitions)
                    print(
                        f"seed {seed} {shape:11s}: {len(files)} objects, {stored / 1e6:.1f} MB gz, {raw / 1e6:.1f} MB json | "
                        f"baseline {args.records / base_s:,.0f} rec/s ({raw / 1e6 / base_s:.1f} MB/s; CPU {base_cpu * 1e6 / args.records:.1f} us/record, "
                        f"moto {moto_cpu:.2f} s) | "
                        f"producing the same records alone (one producer): {args.records / prod_s:,.0f} rec/s, "
                        f"{base_s / prod_s:.2f}x of the baseline"
                    )
                    for workers in args.workers:
                        ing_s, cpu = await ingest(
                            server, broker.bootstrap, bucket, keys, args.records, args.concurrency, args.partitions, pids, workers
                        )
                        ratio = base_s / ing_s
                        ratios[workers].append((ratio, f"seed {seed} {shape}"))
                        own = sum(sec for name, sec in cpu.items() if name.startswith(("ingest", "worker")))
                        print(
                            f"    workers {workers}: ingest {args.records / ing_s:,.0f} rec/s ({raw / 1e6 / ing_s:.1f} MB/s) in {ing_s:.2f} s | "
                            f"ratio {ratio:.2f}x | CPU {own * 1e6 / args.records:.1f} us/record ({own / base_cpu:.1f}x the baseline's) | "
                            "CPU s meanwhile: " + ", ".join(f"{name} {sec:.2f}" for name, sec in sorted(cpu.items()))
                        )
    finally:
        server.stop()
    for workers, measured in ratios.items():
        worst, where = min(measured)
        print(f"workers {workers}: worst ratio ingest/baseline {worst:.2f}x ({where}; target >= 0.7)")
    print(f"load average at the end: {load()}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
        help="ingest's `workers` settings to measure, comma-separated (default 1,2: this machine's cores)",
    )
    parser.add_argument("--partitions", type=int, default=3, help="of the topic (docker-compose.yml creates cloudtrail with 3)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
