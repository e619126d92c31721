"""Senders' claims on the wire (meshaudit.wire.hops ``encode_claims`` / ``decode_claims``): the
claims the receivers make come back with every field log_source_mismatch reads, an evaluator's
engine raises the same alert on them (the same id), a batch carries hops or claims, and hostile
bytes are a clear error."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from infra.mutate import mutated
from meshaudit._proto.meshaudit.hops.v1 import hops_pb2
from meshaudit.config import Config, Policy
from meshaudit.engine.setup import build_engine
from meshaudit.engine.sources import Claim, Claimed, claimed_by_node, claimed_by_resource
from meshaudit.model import INBOUND, SPAN, Hop, identity
from meshaudit.wire import hops as wire
from meshaudit.wire.hops import WireError, decode, decode_claims, encode, encode_claims

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
COLLECTOR = "spiffe://cluster.local/ns/observability/sa/otel-collector"
REVIEWS_NODE = "sidecar~10.0.0.2~reviews-v1-5d8f7c9b6-x2kq4.default~default.svc.cluster.local"
T0 = 1_767_225_600.25
WHY = "the workload is not the sender's service account and no sources entry allows it"


def claims() -> list[Claim]:
    """What the receivers make: an ALS stream's node (with a service account), OTLP resources
    (with and without a namespace, one claiming nothing but text), by mTLS and by XFCC, evaluated
    and rejected."""
    return [
        Claim(
            FRONTEND, "mtls", claimed_by_node(REVIEWS_NODE, "reviews.default", {"SERVICE_ACCOUNT": "reviews"}),
            WHY, "envoy_als", 4, False, T0,
        ),
        Claim(
            COLLECTOR, "xfcc", claimed_by_resource("ledger", None, "payments"),
            "namespace payments is not the sender's (observability) and no sources entry allows it",
            "otlp_http", 1, True, T0 + 0.5,
        ),
        Claim(FRONTEND, "mtls", claimed_by_resource("ratings.default", None, None), WHY, "otlp_grpc", 0, False, T0 + 1),
        Claim(FRONTEND, "mtls", Claimed("", "", "", ""), "", "otlp_grpc", 2**32 - 1, True, 0.0),
    ]  # fmt: skip


def fields(c: Claim) -> tuple[Any, ...]:
    said = c.claimed
    return (
        *(getattr(c, name) for name in Claim.__slots__ if name != "claimed"),
        said.namespace, said.service_account, said.service, said.text,
    )  # fmt: skip


def test_claims_come_back_with_every_field() -> None:
    originals = claims()
    got = decode_claims(encode_claims(originals))
    assert [fields(c) for c in got] == [fields(c) for c in originals]
    # An absent field stays absent and an empty one empty: the alert's destination differs.
    assert (got[2].claimed.namespace, got[2].claimed.service_account) == ("default", None)
    assert got[3].claimed.key == ("", "", "")
    assert type(got[0].when) is float and type(got[0].entries) is int


def test_a_batch_carries_hops_or_claims() -> None:
    data = encode_claims(claims())
    assert decode(data) == []  # a claims batch has no hops: the evaluator then reads its claims
    h = Hop(SPAN, "span:a", identity("a"), INBOUND, identity(), identity("a"), T0)
    assert decode_claims(encode([h])) == []
    assert decode_claims(encode_claims([])) == [] == decode(encode_claims([]))
    mixed = hops_pb2.HopBatch.FromString(encode([h]))
    mixed.MergeFromString(data)
    with pytest.raises(WireError, match="a batch carries hops or claims"):
        decode(mixed.SerializeToString())
    with pytest.raises(WireError, match="a batch carries hops or claims"):
        decode_claims(mixed.SerializeToString())


def _alerts(batch: list[Claim]) -> list[dict[str, Any]]:
    """What an evaluator's engine (windows named by data time) raises on ``batch``, but for the
    emission time."""
    e = build_engine(Config.model_validate({"engine": {"suppress_secs": 60}}), Policy())
    e.agg.align()
    out = e.claims(batch, T0 + 2) + e.tick(T0 + 120)
    return [{k: v for k, v in a.to_json().items() if k != "emitted_at"} for a in out]


def test_the_engine_raises_the_same_alerts_with_the_same_ids_on_decoded_claims() -> None:
    originals = claims()
    want = _alerts(originals)
    assert {(a["source"]["principal"], a["destination"]["service"]) for a in want} >= {
        (FRONTEND, "reviews"),
        (COLLECTOR, "ledger"),
        (FRONTEND, "ratings"),
    }
    assert _alerts(decode_claims(encode_claims(originals))) == want


def test_a_batch_is_bounded_on_the_way_out() -> None:
    with pytest.raises(ValueError, match="at most"):
        encode_claims(claims()[:1] * (wire.MAX_CLAIMS + 1))
    c = claims()[0]
    c.via = "carrier-pigeon"
    with pytest.raises(ValueError, match="mtls or xfcc"):
        encode_claims([c])


# --- hostile input ----------------------------------------------------------------------------
def _claims_batch(**fields: Any) -> bytes:
    """A valid claims batch whose first claim has ``fields`` instead."""
    b = hops_pb2.HopBatch.FromString(encode_claims(claims()))
    for name, value in fields.items():
        if name == "count":
            b.count = value
        else:
            setattr(b.claims[0], name, value)
    return bytes(b.SerializeToString())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"via": 0}, "unknown means"),
        ({"via": 7}, "unknown means"),
        ({"principal": ""}, "without its sender's principal"),
        ({"receiver": "smtp"}, "unknown receiver"),
        ({"when": math.nan}, "not one"),
        ({"when": math.inf}, "not one"),
        ({"when": -1.0}, "not one"),
        ({"when": 1e300}, "not one"),
        ({"count": 3}, "a batch carries hops or claims"),
    ],
)
def test_invalid_claims_are_a_clear_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_claims(_claims_batch(**fields))


def test_bytes_that_are_no_batch_too_many_claims_and_oversized_input_are_refused() -> None:
    with pytest.raises(WireError, match="not a hop batch"):
        decode_claims(b"\xff\xff\xff")
    with pytest.raises(WireError, match="bytes; at most"):
        decode_claims(b"\x00" * (wire.MAX_BATCH_BYTES + 1))
    one = encode_claims(claims()[:1])
    with pytest.raises(WireError, match=f"1025 claims; at most {wire.MAX_CLAIMS}"):
        decode_claims(one * (wire.MAX_CLAIMS + 1))  # repeated fields concatenate


def _check_decoded(data: bytes) -> None:
    """Either a clear WireError, or claims whose every field has its type."""
    try:
        got = decode_claims(data)
    except WireError:
        return
    for c in got:
        assert isinstance(c.principal, str) and c.principal
        assert c.via in ("mtls", "xfcc") and c.receiver in wire.RECEIVERS
        assert isinstance(c.why, str) and isinstance(c.entries, int) and isinstance(c.rejected, bool)
        assert isinstance(c.when, float) and math.isfinite(c.when)
        said = c.claimed
        assert all(v is None or isinstance(v, str) for v in said.key) and isinstance(said.text, str)


VALID = encode_claims(claims())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_a_wire_error_or_well_typed_claims(data: bytes) -> None:
    _check_decoded(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_batches_are_a_wire_error_or_well_typed_claims(data: Any) -> None:
    _check_decoded(mutated(VALID, data))
