"""`detector ingest` throughput against reading and decompressing the same S3 objects with aiobotocore alone.

    python -m benchmarks.bench_ingest [--records 60000] [--seeds 1,2] [--concurrency 16]

Starts a moto server (S3, SQS) and the embedded broker (tansu). For each seed and each shape (many small
log files, few large ones) it writes the seeded realistic records (``eventgen``, ~1.5 KB each) as gzipped
CloudTrail log files into a bucket, then measures, in the same run:

- the baseline: aiobotocore ``GetObject`` of every object, streamed and gunzipped (``zlib``), with the same
  number of objects in flight as ``ingest``'s ``concurrency``; nothing parsed, nothing produced;
- ``ingest``: ``IngestService`` (the code of ``detector ingest``) reading one S3 notification per object
  from an SQS queue, streaming and splitting each object, producing every record to the broker and
  deleting the message once all its records are acknowledged; timed from the notifications' send to the
  last message deleted.

Prints records/s and MB/s (decompressed) of both, the ratio ingest/baseline per run and, last, the worst
ratio (target >= 0.7). moto serves S3 from a Python process, so both sides pay the same object transfer.
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

from ._common import header
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


async def baseline(bucket: str, keys: list[str], concurrency: int, chunk: int) -> tuple[float, int]:
    """Seconds to stream and gunzip every object, and the decompressed bytes."""
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

        started = time.perf_counter()
        await asyncio.gather(*(one(k) for k in keys))
        return time.perf_counter() - started, total


async def ingest(server: Any, bootstrap: str, bucket: str, keys: list[str], records: int, concurrency: int) -> float:
    from ingest_support import ingest_settings, make_queue, queue_counts, sample, start_ingest, stop_ingest

    url, _ = make_queue(server, visibility=300)
    topic = f"bench-ingest-{os.urandom(4).hex()}"
    service, task = await start_ingest(ingest_settings(bootstrap, topic, url, concurrency=concurrency, wait_seconds=1))
    sqs = server.client("sqs")
    notes = [
        json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": k}}}]})
        for k in keys
    ]
    started = time.perf_counter()
    for i in range(0, len(notes), 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": b} for j, b in enumerate(notes[i : i + 10])])
    while sample(service, "detector_ingest_records_total", source="s3") < records or sample(
        service, "detector_ingest_messages_total", queue=url.rsplit("/", 1)[1], result="deleted"
    ) < len(keys):
        await asyncio.sleep(0.02)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - started
    await stop_ingest(service, task)
    assert queue_counts(server, url) == (0, 0)
    return elapsed


async def main(args: argparse.Namespace) -> None:
    from aws_helpers import MotoServer
    from ingest_support import aws_env

    header("detector ingest vs aiobotocore GetObject + gunzip (same objects, same run)")
    print(f"records per run: {args.records}; concurrency {args.concurrency}; shapes {SHAPES}")
    server = MotoServer()
    ratios: list[tuple[float, str]] = []
    try:
        with EmbeddedBroker() as broker, aws_env(server.url):
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
                    base_s, raw = min([await baseline(bucket, keys, args.concurrency, 1 << 20) for _ in range(2)])
                    ing_s = await ingest(server, broker.bootstrap, bucket, keys, args.records, args.concurrency)
                    ratio = base_s / ing_s
                    ratios.append((ratio, f"seed {seed} {shape}"))
                    print(
                        f"seed {seed} {shape:11s}: {len(files)} objects, {stored / 1e6:.1f} MB gz, {raw / 1e6:.1f} MB json | "
                        f"baseline {args.records / base_s:,.0f} rec/s ({raw / 1e6 / base_s:.1f} MB/s) | "
                        f"ingest {args.records / ing_s:,.0f} rec/s ({raw / 1e6 / ing_s:.1f} MB/s) | ratio {ratio:.2f}x"
                    )
    finally:
        server.stop()
    worst, where = min(ratios)
    print(f"worst ratio ingest/baseline: {worst:.2f}x ({where}; target >= 0.7)")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=16)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
