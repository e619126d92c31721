"""Protobuf's wire format written by hand, for tests that need encodings protobuf's own
serializer never makes (merged fields, unknown fields, wrong wire types)."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """``n`` (at least 0) as a base-128 varint."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def delimited(body: bytes) -> bytes:
    """``body`` after its length: a length-delimited field's value."""
    return varint(len(body)) + body


def field(num: int, body: bytes) -> bytes:
    """A length-delimited field (string, bytes, a submessage) numbered ``num``."""
    return varint(num << 3 | 2) + delimited(body)
