"""Kafka's default partitioner for a keyed record: ``murmur2(key) & 0x7fffffff`` modulo the
topic's partition count (the Java client's ``Utils.murmur2``, aiokafka's ``DefaultPartitioner``).
A receiver groups hops by ``partition(correlation_key(hop), n)`` and produces each group as one
record to that partition, so a record is where Kafka's own client would have put each of its
hops, and a consumer or another producer keyed the same way agrees with it.

The same function as ``aiokafka.partitioner.murmur2`` (tests/unit/test_wire_partition.py checks
it on random keys), reading the key's 4-byte words in one call rather than byte by byte:
about 1.3 us for a 32-character trace id where aiokafka's takes about 4 us.
"""

from __future__ import annotations

import struct
from typing import Final

_SEED: Final = 0x9747B28C
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 of ``data`` as Kafka computes it, as an unsigned 32-bit value (as aiokafka's;
    Java's is the same bits, signed)."""
    length = len(data)
    h = _SEED ^ length
    n4 = length >> 2
    m = _M
    for word in struct.unpack_from(f"<{n4}I", data):
        k = (word * m) & _MASK
        k ^= k >> 24
        h = ((h * m) & _MASK) ^ ((k * m) & _MASK)
    rest = length & 3
    if rest:
        tail = n4 << 2
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * m) & _MASK
    h ^= h >> 13
    h = (h * m) & _MASK
    h ^= h >> 15
    return h


def partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` among ``partitions``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
