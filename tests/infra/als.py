"""Build real Envoy ALS protobuf messages (our wire-compatible subset) the way an Istio sidecar
sends them, and stream them to a server with a real grpc.aio client."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2
from meshaudit._proto.envoy.data.accesslog.v3 import accesslog_pb2
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.decode import FLAG_NAMES, StreamContext, decode_http, decode_tcp

TLSProperties = accesslog_pb2.TLSProperties
# Envoy's short response-flag names -> ResponseFlags fields ("URX" -> upstream_retry_limit_exceeded).
FLAG_FIELDS = {short: name for name, short in FLAG_NAMES.items()}
METHODS = {"GET": 1, "HEAD": 2, "POST": 3, "PUT": 4, "DELETE": 5, "OPTIONS": 7, "PATCH": 9}


def _set_flags(c: Any, flags: Sequence[str]) -> None:
    for f in flags:
        if f == "UAEX":
            c.response_flags.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
        else:
            setattr(c.response_flags, FLAG_FIELDS[f], True)


def node_id(svc: str, ns: str = "default", ip: str = "10.0.0.1") -> str:
    return f"sidecar~{ip}~{svc}-v1-5d8f7c9b6-x2kq4.{ns}~{ns}.svc.cluster.local"


def identifier(svc: str, ns: str = "default", ip: str = "10.0.0.1", log_name: str = "als") -> Any:
    ident = als_pb2.StreamAccessLogsMessage.Identifier(log_name=log_name)
    ident.node.id = node_id(svc, ns, ip)
    ident.node.cluster = f"{svc}.{ns}"
    return ident


def spiffe(svc: str, ns: str = "default") -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{svc}"


def _common(
    c: Any,
    *,
    cluster: str,
    peer: str | None,
    local: str | None,
    remote: str,
    upstream_local: str | None,
    start: float | None,
    tls: bool,
) -> None:
    t = start if start is not None else time.time()
    c.start_time.seconds = int(t)
    c.start_time.nanos = int((t % 1) * 1e9)
    c.upstream_cluster = cluster
    ip, port = remote.rsplit(":", 1)
    c.downstream_remote_address.socket_address.address = ip
    c.downstream_remote_address.socket_address.port_value = int(port)
    if upstream_local:
        uip, uport = upstream_local.rsplit(":", 1)
        c.upstream_local_address.socket_address.address = uip
        c.upstream_local_address.socket_address.port_value = int(uport)
    if tls:
        c.tls_properties.tls_version = TLSProperties.TLSv1_3
        c.tls_properties.tls_cipher_suite.value = 0x1301
        if peer:
            c.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=peer)
        if local:
            c.tls_properties.local_certificate_properties.subject_alt_name.add(uri=local)


def http_entry(
    *,
    cluster: str,
    method: str = "GET",
    path: str = "/",
    authority: str = "svc",
    status: int = 200,
    request_id: str | None = None,
    peer: str | None = None,
    local: str | None = None,
    tls: bool = True,
    remote: str = "10.0.0.9:40000",
    upstream_local: str | None = None,
    traceparent: str | None = None,
    start: float | None = None,
    route_name: str = "default",
    attempts: int | None = None,
    details: str = "",
    flags: Sequence[str] = (),
    duration_ms: float | None = None,
) -> Any:
    """``attempts``: ``upstream_request_attempt_count`` (unset if None); ``details``: response code
    details (``via_upstream``, ``rbac_access_denied_matched_policy[...]``); ``flags``: Envoy's short
    response flags (``NR``, ``URX``, ``UAEX``, ...); ``duration_ms``: Envoy's ``duration``."""
    e = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    _common(
        e.common_properties,
        cluster=cluster,
        peer=peer,
        local=local,
        remote=remote,
        upstream_local=upstream_local,
        start=start,
        tls=tls,
    )
    e.common_properties.route_name = route_name
    if duration_ms is not None:
        e.common_properties.duration.FromNanoseconds(int(duration_ms * 1e6))
    if attempts is not None:
        e.common_properties.upstream_request_attempt_count = attempts
    _set_flags(e.common_properties, flags)
    r = e.request
    r.request_method = METHODS[method]  # type: ignore[assignment]  # enum fields take ints
    r.path = path
    r.authority = authority
    r.request_id = request_id or str(uuid.uuid4())
    if traceparent:
        r.request_headers["traceparent"] = traceparent
    e.response.response_code.value = status
    if details:
        e.response.response_code_details = details
    return e


def tcp_entry(
    *,
    cluster: str,
    peer: str | None = None,
    tls: bool = True,
    remote: str = "10.0.0.9:40000",
    upstream_local: str | None = None,
    start: float | None = None,
    termination: str = "",
    flags: Sequence[str] = (),
) -> Any:
    """``termination``: connection termination details (``rbac_access_denied_matched_policy[...]``)."""
    e = accesslog_pb2.TCPAccessLogEntry()
    _common(
        e.common_properties,
        cluster=cluster,
        peer=peer,
        local=None,
        remote=remote,
        upstream_local=upstream_local,
        start=start,
        tls=tls,
    )
    e.common_properties.connection_termination_details = termination
    _set_flags(e.common_properties, flags)
    e.connection_properties.received_bytes = 100
    e.connection_properties.sent_bytes = 200
    return e


def http_message(entries: Sequence[Any], ident: Any | None = None) -> Any:
    msg = als_pb2.StreamAccessLogsMessage()
    if ident is not None:
        msg.identifier.CopyFrom(ident)
    msg.http_logs.log_entry.extend(entries)
    return msg


def tcp_message(entries: Sequence[Any], ident: Any | None = None) -> Any:
    msg = als_pb2.StreamAccessLogsMessage()
    if ident is not None:
        msg.identifier.CopyFrom(ident)
    msg.tcp_logs.log_entry.extend(entries)
    return msg


async def stream(
    target: str,
    messages: Iterable[Any],
    timeout: float = 10.0,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> grpc.StatusCode:
    """Send ``messages`` on one StreamAccessLogs stream and close it; returns the status code.
    Each call opens its own connection, as each Envoy does (with ``workers: N`` the kernel
    spreads connections over the workers). ``credentials``: TLS (None: plaintext)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.aio.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(target, options=options)
    )
    async with channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)

        async def gen() -> Any:
            for m in messages:
                yield m

        try:
            await stub.StreamAccessLogs(gen(), timeout=timeout, metadata=metadata or None)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def held_stream(target: str, first: Sequence[Any]) -> AsyncIterator[None]:
    """A StreamAccessLogs stream that sends ``first`` and then nothing, held open until the block
    ends, as an Envoy whose traffic (or logging) stopped keeps its stream; then closed."""
    done = asyncio.Event()

    async def messages() -> AsyncIterator[Any]:
        for m in first:
            yield m
        await done.wait()

    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(messages())
        try:
            yield
        finally:
            done.set()
            await asyncio.wait_for(call, 10)


def inbound_http(src: str | None, **kw: Any) -> Any:
    """A server sidecar's entry for a request it received: mTLS from ``src``, plaintext if None.
    The server is named by the stream's identifier."""
    return http_entry(cluster="inbound|9080||", peer=spiffe(src) if src else None, tls=src is not None, **kw)


def outbound_http(dst: str, ns: str = "default", **kw: Any) -> Any:
    """An entry from a client sidecar for a request it sent to ``dst``."""
    return http_entry(cluster=f"outbound|9080||{dst}.{ns}.svc.cluster.local", tls=False, **kw)


def peer_metadata(entry: Any, key: str = "downstream_peer", **fields: str) -> Any:
    """Log Istio's peer metadata on ``entry`` as Istio >= 1.24 does: filter state ``key`` holding a
    google.protobuf.Struct (``workload``, ``namespace``, ``service``, ``identity``, ...) in an Any."""
    s = struct_pb2.Struct()
    s.update(fields)
    a = any_pb2.Any()
    a.Pack(s)  # type_url type.googleapis.com/google.protobuf.Struct
    entry.common_properties.filter_state_objects[key].CopyFrom(a)
    return entry


def wasm_peer_metadata(entry: Any, key: str = "wasm.downstream_peer") -> Any:
    """Older Istio's form: FlatBuffers bytes in a BytesValue, which meshaudit skips (and counts)."""
    a = any_pb2.Any()
    a.Pack(wrappers_pb2.BytesValue(value=b"\x20\x00\x00\x00flatbuffer"))
    entry.common_properties.filter_state_objects[key].CopyFrom(a)
    return entry


def weaken_tls(entry: Any, version: int, cipher: int) -> Any:
    """Set the downstream TLS version (``TLSProperties.TLSv1_2``, ...) and cipher suite code."""
    t = entry.common_properties.tls_properties
    t.tls_version = version
    t.tls_cipher_suite.value = cipher
    return entry


def decode(msg: Any, namer: Namer) -> list[Hop]:
    """A message through the wire (serialized, parsed) and the ALS decoder, as the receiver does."""
    data = msg.SerializeToString()
    wire = als_pb2.StreamAccessLogsMessage.FromString(data)
    node = wire.identifier.node
    ctx = StreamContext(namer, node.id, node.cluster, wire.identifier.log_name)
    out: list[Hop] = []
    if wire.WhichOneof("log_entries") == "http_logs":
        decode_http(wire.http_logs.log_entry, ctx, namer, out, data)
    else:
        decode_tcp(wire.tcp_logs.log_entry, ctx, namer, out, data)
    return out
