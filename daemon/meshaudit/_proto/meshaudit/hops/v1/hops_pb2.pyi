from meshaudit._proto.envoy.data.accesslog.v3 import accesslog_pb2 as _accesslog_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Parties(_message.Message):
    __slots__ = ("service", "namespace", "workload", "principal", "address")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    service: _containers.RepeatedScalarFieldContainer[int]
    namespace: _containers.RepeatedScalarFieldContainer[int]
    workload: _containers.RepeatedScalarFieldContainer[int]
    principal: _containers.RepeatedScalarFieldContainer[int]
    address: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, service: _Optional[_Iterable[int]] = ..., namespace: _Optional[_Iterable[int]] = ..., workload: _Optional[_Iterable[int]] = ..., principal: _Optional[_Iterable[int]] = ..., address: _Optional[_Iterable[int]] = ...) -> None: ...

class Claimed(_message.Message):
    __slots__ = ("namespace", "service_account", "service", "text")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service_account: str
    service: str
    text: str
    def __init__(self, namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., service: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("principal", "via", "claimed", "why", "receiver", "entries", "rejected", "when")
    class Via(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VIA_UNSPECIFIED: _ClassVar[Claim.Via]
        MTLS: _ClassVar[Claim.Via]
        XFCC: _ClassVar[Claim.Via]
    VIA_UNSPECIFIED: Claim.Via
    MTLS: Claim.Via
    XFCC: Claim.Via
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    principal: str
    via: Claim.Via
    claimed: Claimed
    why: str
    receiver: str
    entries: int
    rejected: bool
    when: float
    def __init__(self, principal: _Optional[str] = ..., via: _Optional[_Union[Claim.Via, str]] = ..., claimed: _Optional[_Union[Claimed, _Mapping]] = ..., why: _Optional[str] = ..., receiver: _Optional[str] = ..., entries: _Optional[int] = ..., rejected: _Optional[bool] = ..., when: _Optional[float] = ...) -> None: ...

class HopBatch(_message.Message):
    __slots__ = ("count", "strings", "hex_ids", "hex_id_sizes", "parties", "evidence", "origin", "observer", "observer_service", "direction", "src", "dst", "start", "tls_version", "tls_cipher", "peer_principal", "local_principal", "method", "authority", "path", "status", "response_flags", "response_code_details", "route_name", "upstream_cluster", "attempts", "trace_id", "span_id", "parent_span_id", "request_id", "span_kind", "conn", "connection_termination_details", "downstream_peer", "upstream_peer", "xfcc_uri", "xfcc_by", "user_agent", "source_address", "duration_ms", "entry", "http_entries", "tcp_entries", "claims")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    HEX_IDS_FIELD_NUMBER: _ClassVar[int]
    HEX_ID_SIZES_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_SERVICE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TLS_VERSION_FIELD_NUMBER: _ClassVar[int]
    TLS_CIPHER_FIELD_NUMBER: _ClassVar[int]
    PEER_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODE_DETAILS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_NAME_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_KIND_FIELD_NUMBER: _ClassVar[int]
    CONN_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_TERMINATION_DETAILS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_PEER_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_PEER_FIELD_NUMBER: _ClassVar[int]
    XFCC_URI_FIELD_NUMBER: _ClassVar[int]
    XFCC_BY_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    HTTP_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TCP_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    count: int
    strings: _containers.RepeatedScalarFieldContainer[str]
    hex_ids: bytes
    hex_id_sizes: _containers.RepeatedScalarFieldContainer[int]
    parties: Parties
    evidence: int
    origin: _containers.RepeatedScalarFieldContainer[int]
    observer: _containers.RepeatedScalarFieldContainer[int]
    observer_service: _containers.RepeatedScalarFieldContainer[int]
    direction: _containers.RepeatedScalarFieldContainer[int]
    src: _containers.RepeatedScalarFieldContainer[int]
    dst: _containers.RepeatedScalarFieldContainer[int]
    start: _containers.RepeatedScalarFieldContainer[float]
    tls_version: _containers.RepeatedScalarFieldContainer[int]
    tls_cipher: _containers.RepeatedScalarFieldContainer[int]
    peer_principal: _containers.RepeatedScalarFieldContainer[int]
    local_principal: _containers.RepeatedScalarFieldContainer[int]
    method: _containers.RepeatedScalarFieldContainer[int]
    authority: _containers.RepeatedScalarFieldContainer[int]
    path: _containers.RepeatedScalarFieldContainer[int]
    status: _containers.RepeatedScalarFieldContainer[int]
    response_flags: _containers.RepeatedScalarFieldContainer[int]
    response_code_details: _containers.RepeatedScalarFieldContainer[int]
    route_name: _containers.RepeatedScalarFieldContainer[int]
    upstream_cluster: _containers.RepeatedScalarFieldContainer[int]
    attempts: _containers.RepeatedScalarFieldContainer[int]
    trace_id: _containers.RepeatedScalarFieldContainer[int]
    span_id: _containers.RepeatedScalarFieldContainer[int]
    parent_span_id: _containers.RepeatedScalarFieldContainer[int]
    request_id: _containers.RepeatedScalarFieldContainer[int]
    span_kind: _containers.RepeatedScalarFieldContainer[int]
    conn: _containers.RepeatedScalarFieldContainer[int]
    connection_termination_details: _containers.RepeatedScalarFieldContainer[int]
    downstream_peer: _containers.RepeatedScalarFieldContainer[int]
    upstream_peer: _containers.RepeatedScalarFieldContainer[int]
    xfcc_uri: _containers.RepeatedScalarFieldContainer[int]
    xfcc_by: _containers.RepeatedScalarFieldContainer[int]
    user_agent: _containers.RepeatedScalarFieldContainer[int]
    source_address: _containers.RepeatedScalarFieldContainer[int]
    duration_ms: _containers.RepeatedScalarFieldContainer[float]
    entry: _containers.RepeatedScalarFieldContainer[int]
    http_entries: _containers.RepeatedCompositeFieldContainer[_accesslog_pb2.HTTPAccessLogEntry]
    tcp_entries: _containers.RepeatedCompositeFieldContainer[_accesslog_pb2.TCPAccessLogEntry]
    claims: _containers.RepeatedCompositeFieldContainer[Claim]
    def __init__(self, count: _Optional[int] = ..., strings: _Optional[_Iterable[str]] = ..., hex_ids: _Optional[bytes] = ..., hex_id_sizes: _Optional[_Iterable[int]] = ..., parties: _Optional[_Union[Parties, _Mapping]] = ..., evidence: _Optional[int] = ..., origin: _Optional[_Iterable[int]] = ..., observer: _Optional[_Iterable[int]] = ..., observer_service: _Optional[_Iterable[int]] = ..., direction: _Optional[_Iterable[int]] = ..., src: _Optional[_Iterable[int]] = ..., dst: _Optional[_Iterable[int]] = ..., start: _Optional[_Iterable[float]] = ..., tls_version: _Optional[_Iterable[int]] = ..., tls_cipher: _Optional[_Iterable[int]] = ..., peer_principal: _Optional[_Iterable[int]] = ..., local_principal: _Optional[_Iterable[int]] = ..., method: _Optional[_Iterable[int]] = ..., authority: _Optional[_Iterable[int]] = ..., path: _Optional[_Iterable[int]] = ..., status: _Optional[_Iterable[int]] = ..., response_flags: _Optional[_Iterable[int]] = ..., response_code_details: _Optional[_Iterable[int]] = ..., route_name: _Optional[_Iterable[int]] = ..., upstream_cluster: _Optional[_Iterable[int]] = ..., attempts: _Optional[_Iterable[int]] = ..., trace_id: _Optional[_Iterable[int]] = ..., span_id: _Optional[_Iterable[int]] = ..., parent_span_id: _Optional[_Iterable[int]] = ..., request_id: _Optional[_Iterable[int]] = ..., span_kind: _Optional[_Iterable[int]] = ..., conn: _Optional[_Iterable[int]] = ..., connection_termination_details: _Optional[_Iterable[int]] = ..., downstream_peer: _Optional[_Iterable[int]] = ..., upstream_peer: _Optional[_Iterable[int]] = ..., xfcc_uri: _Optional[_Iterable[int]] = ..., xfcc_by: _Optional[_Iterable[int]] = ..., user_agent: _Optional[_Iterable[int]] = ..., source_address: _Optional[_Iterable[int]] = ..., duration_ms: _Optional[_Iterable[float]] = ..., entry: _Optional[_Iterable[int]] = ..., http_entries: _Optional[_Iterable[_Union[_accesslog_pb2.HTTPAccessLogEntry, _Mapping]]] = ..., tcp_entries: _Optional[_Iterable[_Union[_accesslog_pb2.TCPAccessLogEntry, _Mapping]]] = ..., claims: _Optional[_Iterable[_Union[Claim, _Mapping]]] = ...) -> None: ...
