"""Kafka's default partitioner: the receiver puts each hop where Kafka's own clients would."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from meshaudit.wire.partition import murmur2, partition

# The Java client's own test vectors (org.apache.kafka.common.utils.UtilsTest.testMurmur2), signed.
JAVA = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize(("key", "want"), sorted(JAVA.items()))
def test_murmur2_is_the_java_clients(key: str, want: int) -> None:
    assert murmur2(key.encode()) == want & 0xFFFFFFFF


def test_same_hash_and_partition_as_aiokafka_on_random_keys() -> None:
    rng = random.Random(15)
    for n in range(0, 140):
        for _ in range(20):
            key = rng.randbytes(n)
            assert murmur2(key) == aiokafka_murmur2(key)
            parts = rng.randint(1, 64)
            assert partition(key, parts) == DefaultPartitioner()(key, list(range(parts)), [])
