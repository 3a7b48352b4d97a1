"""The partition of a routed key, computed once and remembered.

aiokafka's default partitioner hashes every key it is given with a pure-Python murmur2 — about a tenth
of the service's CPU when each routed record was sent without a partition (issue 11). The route stage
knows the sessions topic's partition count (checked at start-up against the changelog's), and its keys
(instance IDs) repeat, so it computes each key's partition once, with the same function, and passes it
explicitly: the result is the one Kafka's default partitioner (Java's and aiokafka's) gives, so other
producers keying by instance ID still land on the same partition.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def default_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partition of ``key`` among ``partitions`` (``toPositive(murmur2(key)) % n``)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class KeyPartitions:
    """``key -> partition`` for one topic of ``partitions`` partitions, memoised in a bounded dict
    (cleared when it reaches ``capacity`` keys, so memory stays bounded however many keys pass)."""

    __slots__ = ("partitions", "capacity", "_memo")

    def __init__(self, partitions: int, capacity: int = 65_536) -> None:
        if partitions < 1:
            raise ValueError(f"a topic has at least one partition, not {partitions}")
        self.partitions = partitions
        self.capacity = capacity
        self._memo: dict[bytes, int] = {}

    def __call__(self, key: bytes) -> int:
        partition = self._memo.get(key)
        if partition is None:
            if len(self._memo) >= self.capacity:
                self._memo.clear()
            partition = self._memo[key] = default_partition(key, self.partitions)
        return partition

    def __len__(self) -> int:
        return len(self._memo)
