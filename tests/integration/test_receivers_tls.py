"""TLS and mutual TLS on the receivers, with real clients (grpcio with ssl_channel_credentials,
Python's ssl over HTTP/1.1) and certificates made in the test: who is refused and how that is
counted, certificate rotation on disk, and log_source_mismatch from authenticated senders."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from infra import als
from infra.certs import CA, Pem, serial_of
from infra.daemon import Daemon, running
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from .conftest import CONFIG

pytestmark = pytest.mark.integration

COLLECTOR = "spiffe://cluster.local/ns/observability/sa/otel-collector"


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = CA(root / "ca")
        self.other = CA(root / "other", "other root CA")
        self.server = self.ca.server()
        self.frontend = self.ca.workload("frontend")
        self.collector = self.ca.workload("otel-collector", "observability")
        self.stranger = self.other.workload("frontend")  # the right name from the wrong CA
        self.expired = self.ca.workload("frontend", expired=True)


def tls_config(pki: Pki, client_auth: str = "require", **receivers: Any) -> dict[str, Any]:
    policy = {**CONFIG["policy"], "sources": [{"identities": [COLLECTOR], "namespaces": ["shop"], "reason": "fwd"}]}
    return {
        **CONFIG,
        "policy": policy,
        "receivers": {
            "tls": {
                "cert_file": str(pki.server.cert),
                "key_file": str(pki.server.key),
                "client_ca_file": str(pki.ca.cert_path),
                "client_auth": client_auth,
            },
            **receivers,
        },
    }


def grpc_creds(pki: Pki, client: Pem | None, ca: bytes | None = None) -> grpc.ChannelCredentials:
    root = ca or pki.ca.pem
    if client is None:
        return grpc.ssl_channel_credentials(root)
    return grpc.ssl_channel_credentials(root, client.key_bytes, client.cert_bytes)


def https_context(ca: Path, client: Pem | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def trace_export(service: str, namespace: str | None = None, k8s_namespace: str | None = None) -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for key, value in (
        ("service.name", service),
        ("service.namespace", namespace),
        ("k8s.namespace.name", k8s_namespace),
    ):
        if value:
            kv = rs.resource.attributes.add()
            kv.key, kv.value.string_value = key, value
    sp = rs.scope_spans.add().spans.add()
    sp.trace_id, sp.span_id, sp.kind = os.urandom(16), os.urandom(8), 2
    sp.start_time_unix_nano = time.time_ns()
    body: bytes = req.SerializeToString()
    return body


def post_traces(daemon: Daemon, ctx: ssl.SSLContext | None, body: bytes) -> int:
    """POST /v1/traces; the status, or -1 when the connection fails (a refused handshake)."""
    host, port = daemon.http.rsplit(":", 1)
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
    else:
        conn = http.client.HTTPSConnection("localhost", int(port), timeout=5, context=ctx)
    try:
        conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return -1
    finally:
        conn.close()


def server_serial(daemon: Daemon, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # read whatever it serves
    port = int(daemon.http.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(ssl.DER_cert_to_PEM_cert(der).encode())


def rejected(daemon: Daemon, receiver: str, reason: str) -> float:
    return daemon.metric("meshaudit_rejected_total", receiver=receiver, reason=reason)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running(tmp_path_factory.mktemp("mtls"), tls_config(pki)) as d:
        yield d


def outbound(n: int) -> list[Any]:
    return [als.outbound_http("reviews", path="/reviews/1") for _ in range(n)]


async def test_an_authenticated_stream_is_evaluated_and_its_sender_logged(mtls: Daemon, pki: Pki) -> None:
    before = mtls.metric("meshaudit_received_total", receiver="envoy_als")
    msg = als.http_message(outbound(3), als.identifier("frontend"))
    assert await als.stream(
        f"localhost:{mtls.grpc.rsplit(':')[1]}", [msg], credentials=grpc_creds(pki, pki.frontend)
    ) == (grpc.StatusCode.OK)
    assert mtls.wait_metric("meshaudit_received_total", before + 3, receiver="envoy_als") == before + 3
    assert "sender=spiffe://cluster.local/ns/default/sa/frontend" in mtls.stderr()
    assert not [a for a in mtls.alerts() if a["rule"] == "log_source_mismatch"]


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired"])
async def test_grpc_refuses_clients_without_a_valid_certificate(mtls: Daemon, pki: Pki, who: str) -> None:
    client = {"no certificate": None, "another CA": pki.stranger, "expired": pki.expired}[who]
    before = mtls.metric("meshaudit_received_total", receiver="envoy_als")
    msg = als.http_message(outbound(2), als.identifier("frontend"))
    code = await als.stream(
        f"localhost:{mtls.grpc.rsplit(':')[1]}", [msg], timeout=3, credentials=grpc_creds(pki, client)
    )
    assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed: gRPC core refused it
    await asyncio.sleep(0.3)
    assert mtls.metric("meshaudit_received_total", receiver="envoy_als") == before
    # Refused by gRPC core before the daemon saw the connection: not counted (README, Security).
    assert mtls.metric("meshaudit_rejected_total", receiver="envoy_als") == 0


def test_otlp_http_refusals_are_counted_by_reason(mtls: Daemon, pki: Pki) -> None:
    body = trace_export("frontend", "default")
    cases = [
        (None, "no_client_certificate"),
        (pki.stranger, "untrusted_certificate"),
        (pki.expired, "expired_certificate"),
    ]
    for client, reason in cases:
        before = rejected(mtls, "otlp_http", reason)
        assert post_traces(mtls, https_context(pki.ca.cert_path, client), body) == -1, reason
        assert mtls.wait_metric("meshaudit_rejected_total", before + 1, receiver="otlp_http", reason=reason) == (
            before + 1
        ), reason
    # Plain HTTP on the TLS port: refused in the handshake too.
    before = rejected(mtls, "otlp_http", "tls_handshake_failed")
    assert post_traces(mtls, None, body) == -1
    assert mtls.wait_metric(
        "meshaudit_rejected_total", before + 1, receiver="otlp_http", reason="tls_handshake_failed"
    ) == (before + 1)
    # And the right certificate gets through: the span is received.
    spans = mtls.metric("meshaudit_received_total", receiver="otlp_http", kind="span")
    assert post_traces(mtls, https_context(pki.ca.cert_path, pki.frontend), body) == 200
    assert mtls.metric("meshaudit_received_total", receiver="otlp_http", kind="span") == spans + 1
    assert "Refused a TLS handshake on OTLP/HTTP" in mtls.stderr()


async def test_frontend_claiming_reviews_node_raises_log_source_mismatch(mtls: Daemon, pki: Pki) -> None:
    evaluated = mtls.metric("meshaudit_hops_evaluated_total")
    msg = als.http_message(outbound(4), als.identifier("reviews"))
    target = f"localhost:{mtls.grpc.rsplit(':')[1]}"
    assert await als.stream(target, [msg], credentials=grpc_creds(pki, pki.frontend)) == grpc.StatusCode.OK
    got = mtls.wait_alerts(lambda a: any(x["rule"] == "log_source_mismatch" for x in a), timeout=5)
    found = [a for a in got if a["rule"] == "log_source_mismatch"]
    assert len(found) == 1, got
    a = found[0]
    assert a["severity"] == "critical"
    assert a["source"]["principal"] == "spiffe://cluster.local/ns/default/sa/frontend"
    assert (a["destination"]["service"], a["destination"]["namespace"]) == ("reviews", "default")
    detail = a["evidence"]["detail"]
    assert als.node_id("reviews") in detail and "client certificate" in detail
    assert "4 entries evaluated" in detail
    # Without enforce_sources the entries are still evaluated.
    assert mtls.wait_metric("meshaudit_hops_evaluated_total", evaluated + 4) == evaluated + 4


def test_an_export_for_a_namespace_sources_allows_is_accepted_and_others_alert(mtls: Daemon, pki: Pki) -> None:
    ctx = https_context(pki.ca.cert_path, pki.collector)
    assert post_traces(mtls, ctx, trace_export("cart", "shop")) == 200
    assert post_traces(mtls, ctx, trace_export("ledger", k8s_namespace="payments")) == 200
    got = mtls.wait_alerts(lambda a: any(x["destination"].get("namespace") == "payments" for x in a), timeout=5)
    claims = [a for a in got if a["rule"] == "log_source_mismatch" and a["source"]["principal"] == COLLECTOR]
    assert [(a["destination"]["service"], a["destination"]["namespace"]) for a in claims] == [("ledger", "payments")]
    assert "k8s.namespace.name payments" in claims[0]["evidence"]["detail"]


async def test_enforce_sources_rejects_the_stream_and_counts_it(pki: Pki, tmp_path: Path) -> None:
    with running(tmp_path, tls_config(pki, enforce_sources=True)) as d:
        target = f"localhost:{d.grpc.rsplit(':')[1]}"
        # Plaintext inbound entries: evaluated, they would raise plaintext_hop.
        entries = [als.inbound_http(None, path="/reviews/1", remote="10.9.9.9:5555") for _ in range(5)]
        code = await als.stream(
            target, [als.http_message(entries, als.identifier("reviews"))], credentials=grpc_creds(pki, pki.frontend)
        )
        assert code == grpc.StatusCode.OK
        got = d.wait_alerts(lambda a: any(x["rule"] == "log_source_mismatch" for x in a), timeout=5)
        assert [a["rule"] for a in got] == ["log_source_mismatch"]
        assert "5 entries rejected (enforce_sources)" in got[0]["evidence"]["detail"]
        assert d.wait_metric("meshaudit_rejected_total", 5, receiver="envoy_als", reason="source_mismatch") == 5
        await asyncio.sleep(1.0)  # longer than plaintext_hop's attribution wait: nothing else comes
        assert [a["rule"] for a in d.alerts()] == ["log_source_mismatch"]
        assert d.metric("meshaudit_hops_evaluated_total") == 0
        # OTLP/HTTP: an export naming another workload is refused with 403, counted per span.
        ctx = https_context(pki.ca.cert_path, pki.frontend)
        assert post_traces(d, ctx, trace_export("reviews", "default")) == 403
        assert d.wait_metric("meshaudit_rejected_total", 1, receiver="otlp_http", reason="source_mismatch") == 1
        assert post_traces(d, ctx, trace_export("frontend", "default")) == 200


async def test_client_auth_request_refuses_a_missing_certificate_in_the_application(pki: Pki, tmp_path: Path) -> None:
    with running(tmp_path, tls_config(pki, client_auth="request")) as d:
        body = trace_export("frontend", "default")
        assert post_traces(d, https_context(pki.ca.cert_path, None), body) == 401
        assert d.wait_metric("meshaudit_rejected_total", 1, receiver="otlp_http", reason="no_client_certificate") == 1
        assert post_traces(d, https_context(pki.ca.cert_path, pki.frontend), body) == 200
        # A certificate from another CA is still refused in the handshake (and counted).
        assert post_traces(d, https_context(pki.ca.cert_path, pki.stranger), body) == -1
        assert d.wait_metric("meshaudit_rejected_total", 1, receiver="otlp_http", reason="untrusted_certificate") == 1


async def test_rotated_certificates_are_used_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    files = {name: live / name for name in ("tls.crt", "tls.key", "ca.crt")}
    files["tls.crt"].write_bytes(pki.server.cert_bytes)
    files["tls.key"].write_bytes(pki.server.key_bytes)
    files["ca.crt"].write_bytes(pki.ca.pem)
    cfg = tls_config(pki)
    cfg["receivers"]["tls"].update(
        cert_file=str(files["tls.crt"]), key_file=str(files["tls.key"]), client_ca_file=str(files["ca.crt"])
    )
    with running(tmp_path, cfg) as d:
        target = f"localhost:{d.grpc.rsplit(':')[1]}"
        old_serial = serial_of(pki.server.cert_bytes)
        assert server_serial(d, pki.ca.cert_path) == old_serial
        # A client of a new CA is refused before the rotation ...
        new_ca = CA(tmp_path / "new", "new root CA")
        newcomer = new_ca.workload("frontend")
        msg = als.http_message(outbound(1), als.identifier("frontend"))
        both = pki.ca.pem + new_ca.pem
        assert await als.stream(target, [msg], timeout=3, credentials=grpc_creds(pki, newcomer, both)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        # ... then the files change as cert-manager rotates them: a new server certificate from the
        # new CA, and a client CA bundle that trusts both.
        new_server = new_ca.server("server-2")
        for path, data in (
            (files["ca.crt"], both),
            (files["tls.key"], new_server.key_bytes),
            (files["tls.crt"], new_server.cert_bytes),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # a new inode, as a Secret's ..data swap
        assert server_serial(d, new_ca.cert_path) == serial_of(new_server.cert_bytes)
        before = d.metric("meshaudit_received_total", receiver="envoy_als")
        assert await als.stream(target, [msg], credentials=grpc_creds(pki, newcomer, both)) == grpc.StatusCode.OK
        assert await als.stream(target, [msg], credentials=grpc_creds(pki, pki.frontend, both)) == grpc.StatusCode.OK
        assert d.wait_metric("meshaudit_received_total", before + 2, receiver="envoy_als") == before + 2
        ctx = https_context(new_ca.cert_path, newcomer)
        assert post_traces(d, ctx, trace_export("frontend", "default")) == 200
        assert "TLS certificates reloaded for the gRPC receiver" in d.stderr()


async def test_behind_a_sidecar_the_sender_is_the_forwarded_client_cert_from_loopback(tmp_path: Path) -> None:
    # The daemon's own sidecar terminates mTLS and appends its element to x-forwarded-client-cert.
    with running(tmp_path, {**CONFIG, "receivers": {"trust_forwarded_client_cert": True}}) as d:
        xfcc = "By=spiffe://cluster.local/ns/meshaudit/sa/meshaudit;URI=spiffe://cluster.local/ns/default/sa/frontend"
        msg = als.http_message(outbound(2), als.identifier("reviews"))
        assert await als.stream(d.grpc, [msg], metadata=(("x-forwarded-client-cert", xfcc),)) == grpc.StatusCode.OK
        got = d.wait_alerts(lambda a: any(x["rule"] == "log_source_mismatch" for x in a), timeout=5)
        [a] = [x for x in got if x["rule"] == "log_source_mismatch"]
        assert a["source"]["principal"] == "spiffe://cluster.local/ns/default/sa/frontend"
        assert "x-forwarded-client-cert from the daemon's sidecar" in a["evidence"]["detail"]
        # Without the header the stream has no sender: nothing to check, and it is evaluated.
        before = d.metric("meshaudit_received_total", receiver="envoy_als")
        assert await als.stream(d.grpc, [msg]) == grpc.StatusCode.OK
        assert d.wait_metric("meshaudit_received_total", before + 2, receiver="envoy_als") == before + 2
        assert len([x for x in d.alerts() if x["rule"] == "log_source_mismatch"]) == 1
