"""The evidence identity_mismatch and plaintext_hop read from Envoy access logs, decoded from real
ALS bytes: Istio's peer metadata (filter state ``downstream_peer``/``upstream_peer``, a Struct in
an Any), older Istio's FlatBuffers form (skipped and counted), ``x-forwarded-client-cert`` logged
as a request header, and the cipher suite; all read lazily and kept by ``detach``."""

from __future__ import annotations

from infra import als
from meshaudit import metrics
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from meshaudit.config import MeshConfig
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.decode import parse_xfcc

NAMER = Namer(MeshConfig())
UNSUPPORTED = metrics.REJECTED.labels("envoy_als", "unsupported_peer_metadata")


def _decode(msg: als_pb2.StreamAccessLogsMessage) -> list[Hop]:
    return als.decode(msg, NAMER)


def test_downstream_and_upstream_peer_filter_state_name_the_workloads() -> None:
    e = als.inbound_http("frontend", path="/reviews/1")
    als.peer_metadata(
        e,
        workload="frontend-canary",
        namespace="default",
        service="frontend",
        identity="spiffe://cluster.local/ns/default/sa/frontend-canary",
        name="frontend-canary-7d9f5c6b8-abcde",
        type="deployment",
    )
    als.peer_metadata(e, "upstream_peer", workload="reviews-v1", namespace="default", service="reviews")
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    p = h.downstream_peer
    assert p is not None
    assert (p.service, p.namespace, p.workload, p.principal) == (
        "frontend",
        "default",
        "frontend-canary",
        "spiffe://cluster.local/ns/default/sa/frontend-canary",
    )
    assert p.key == "frontend.default"
    up = h.upstream_peer
    assert up is not None and (up.service, up.workload) == ("reviews", "reviews-v1")
    t = als.tcp_entry(cluster="inbound|5432||", peer=als.spiffe("api"))
    als.peer_metadata(t, workload="api", namespace="prod")  # no service: named after the workload
    [th] = _decode(als.tcp_message([t], als.identifier("db")))
    assert th.downstream_peer is not None and th.downstream_peer.key == "api.prod"
    assert th.upstream_peer is None and th.xfcc_uri is None


def test_entries_without_peer_metadata_read_none_and_count_nothing() -> None:
    before = UNSUPPORTED._value.get()
    [h] = _decode(als.http_message([als.inbound_http("frontend")], als.identifier("reviews")))
    assert h.downstream_peer is None and h.upstream_peer is None
    assert h.xfcc_uri is None and h.xfcc_by is None
    assert UNSUPPORTED._value.get() == before


def test_older_istio_flatbuffers_peer_metadata_is_skipped_and_counted_once_per_entry() -> None:
    before = UNSUPPORTED._value.get()
    e = als.wasm_peer_metadata(als.inbound_http("frontend"))
    als.wasm_peer_metadata(e, "wasm.upstream_peer")
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert h.downstream_peer is None and h.upstream_peer is None
    h.detach()  # reads every field again: still once
    assert UNSUPPORTED._value.get() == before + 1
    # a downstream_peer that is not a Struct: skipped, counted
    bad = als.inbound_http("frontend")
    als.wasm_peer_metadata(bad, "downstream_peer")
    [h2] = _decode(als.http_message([bad], als.identifier("reviews")))
    assert h2.downstream_peer is None
    assert UNSUPPORTED._value.get() == before + 2


def test_forwarded_client_cert_logged_as_a_request_header() -> None:
    e = als.inbound_http(None, path="/reviews/1")
    e.request.request_headers["x-forwarded-client-cert"] = (
        'By=spiffe://cluster.local/ns/default/sa/reviews;Hash=1f2e;Subject="CN=a,O=b";'
        "URI=spiffe://cluster.local/ns/default/sa/frontend"
    )
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert h.xfcc_uri == "spiffe://cluster.local/ns/default/sa/frontend"
    assert h.xfcc_by == "spiffe://cluster.local/ns/default/sa/reviews"


def test_xfcc_parsing_takes_the_nearest_element() -> None:
    assert parse_xfcc("By=a;URI=b,By=c;Hash=1;URI=d;URI=e") == ("c", "d")
    assert parse_xfcc('Subject="x,y";URI=u') == (None, "u")
    assert parse_xfcc("") == (None, None)
    assert parse_xfcc("no pairs here") == (None, None)


def test_cipher_suite_and_version_read_from_the_entry() -> None:
    e = als.weaken_tls(als.inbound_http("frontend"), als.TLSProperties.TLSv1_2, 0xC013)
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert (h.tls_version, h.tls_cipher) == ("TLSv1.2", 0xC013)
    [plain] = _decode(als.http_message([als.inbound_http(None)], als.identifier("reviews")))
    assert plain.tls_cipher is None


def test_detached_hops_keep_the_evidence() -> None:
    e = als.inbound_http("frontend")
    als.peer_metadata(e, workload="frontend", namespace="default", service="frontend")
    e.request.request_headers["x-forwarded-client-cert"] = "By=spiffe://b;URI=spiffe://u"
    msg = als.http_message([e], als.identifier("reviews"))
    [h] = _decode(msg)
    h.detach()
    del msg
    assert h.downstream_peer is not None and h.downstream_peer.key == "frontend.default"
    assert (h.xfcc_by, h.xfcc_uri, h.tls_cipher) == ("spiffe://b", "spiffe://u", 0x1301)


def test_user_agent_and_source_address_for_policy_exceptions() -> None:
    e = als.inbound_http(None, path="/healthz", remote="10.128.0.7:51234")
    e.request.user_agent = "kube-probe/1.29"
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert (h.user_agent, h.source_address) == ("kube-probe/1.29", "10.128.0.7:51234")
    [t] = _decode(als.tcp_message([als.tcp_entry(cluster="inbound|5432||", tls=False)], als.identifier("db")))
    assert t.user_agent is None and t.source_address is not None
