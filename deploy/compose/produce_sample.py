"""Stream the sample world packaged with the detector into a Kafka topic (compose's `replay-sample`).

    python produce_sample.py --bootstrap kafka:9092 --topic cloudtrail

Runs in the detector image (`python`, the detector package and aiokafka are there). The messages are the
ones `detector demo` streams: one per EventBridge/record JSON Lines line, one per CloudTrail log file,
unkeyed as an EventBridge-to-Kafka bridge produces them. The detector's findings for them are the sample
world's `expected.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from aiokafka.errors import KafkaError

from detector.demo import produce_values, sample_world, world_messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("DETECTOR_KAFKA_BOOTSTRAP", "localhost:9092"), help="host:port of a broker")
    parser.add_argument("--topic", default="cloudtrail", help="input topic of the detector")
    parser.add_argument("--retry-seconds", type=float, default=60.0, help="keep retrying an unreachable broker this long")
    args = parser.parse_args(argv)

    world = sample_world()
    values = world_messages(world)
    deadline = time.monotonic() + args.retry_seconds
    while True:
        try:
            asyncio.run(produce_values(args.bootstrap, args.topic, values))
            break
        except (KafkaError, OSError) as exc:
            if time.monotonic() >= deadline:
                print(f"produce_sample: error: {args.bootstrap}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            print(f"produce_sample: broker not reachable yet ({type(exc).__name__}); retrying", file=sys.stderr)
            time.sleep(2.0)
    print(f"produce_sample: sent {len(values)} messages of sample world {world.root.name} to {args.topic} on {args.bootstrap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
