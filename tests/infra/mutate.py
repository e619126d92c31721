"""Hostile variants of a valid encoding, drawn by hypothesis: for decoders that must answer every
input with their own error or well-typed values."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def mutated(valid: bytes, data: Any) -> bytes:
    """``valid`` with 1 to 8 bytes flipped, runs cut out or bytes inserted (``data``: hypothesis's
    ``st.data()``)."""
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 40))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    return bytes(raw)
