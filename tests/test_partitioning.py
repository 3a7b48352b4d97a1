"""The route stage's remembered partitions equal Kafka's default partitioner's (co-partitioning holds)."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from detector.service.partitioning import KeyPartitions, default_partition


def _keys(rng: random.Random, n: int) -> list[bytes]:
    keys = [b"", b"i", b"i-0", b"i-01234567", b"i-0123456789abcdef0"]
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            keys.append(f"i-{rng.getrandbits(68):017x}".encode())
        elif kind < 0.8:
            keys.append(
                f"arn:aws:sts::{rng.randrange(10**12):012d}:assumed-role/role-{rng.randrange(999)}/i-{rng.getrandbits(68):017x}".encode()
            )
        else:  # arbitrary bytes of every length mod 4, high bits set
            keys.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 67))))
    return keys


@pytest.mark.parametrize("partitions", [1, 2, 3, 6, 7, 12, 50, 64])
def test_equal_to_aiokafka_default_partitioner(partitions: int) -> None:
    rng = random.Random(partitions)
    default = DefaultPartitioner()
    all_partitions = list(range(partitions))
    memo = KeyPartitions(partitions, capacity=500)  # small: the clearing path runs too
    for key in _keys(rng, 3000):
        expected = default(key, all_partitions, all_partitions)
        assert default_partition(key, partitions) == expected
        assert memo(key) == expected
        assert memo(key) == expected  # remembered
        assert len(memo) <= 500


def test_known_java_values() -> None:
    # Kafka's Java client: Utils.toPositive(Utils.murmur2("21".getBytes())) % 3 etc. (kafka-python's tests)
    assert default_partition(b"", 2**31 - 1) == 275646681 % (2**31 - 1)
    assert default_partition(b"21", 1000) == (-973932308 & 0x7FFFFFFF) % 1000


def test_bad_count_rejected() -> None:
    with pytest.raises(ValueError):
        KeyPartitions(0)
