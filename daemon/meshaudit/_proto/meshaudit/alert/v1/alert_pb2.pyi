from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Party(_message.Message):
    __slots__ = ("service", "namespace", "workload", "principal", "address")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    service: str
    namespace: str
    workload: str
    principal: str
    address: str
    def __init__(self, service: _Optional[str] = ..., namespace: _Optional[str] = ..., workload: _Optional[str] = ..., principal: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("trace_id", "request_id", "method", "path", "observer")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    request_id: str
    method: str
    path: str
    observer: str
    def __init__(self, trace_id: _Optional[str] = ..., request_id: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., observer: _Optional[str] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("count", "first_seen", "last_seen", "window_secs", "examples", "detail", "blocked", "observers")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    OBSERVERS_FIELD_NUMBER: _ClassVar[int]
    count: int
    first_seen: str
    last_seen: str
    window_secs: int
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    detail: str
    blocked: bool
    observers: int
    def __init__(self, count: _Optional[int] = ..., first_seen: _Optional[str] = ..., last_seen: _Optional[str] = ..., window_secs: _Optional[int] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., detail: _Optional[str] = ..., blocked: _Optional[bool] = ..., observers: _Optional[int] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("schema", "id", "rule", "severity", "summary", "source", "destination", "evidence", "emitted_at")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    schema: str
    id: str
    rule: str
    severity: str
    summary: str
    source: Party
    destination: Party
    evidence: Evidence
    emitted_at: str
    def __init__(self, schema: _Optional[str] = ..., id: _Optional[str] = ..., rule: _Optional[str] = ..., severity: _Optional[str] = ..., summary: _Optional[str] = ..., source: _Optional[_Union[Party, _Mapping]] = ..., destination: _Optional[_Union[Party, _Mapping]] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ..., emitted_at: _Optional[str] = ...) -> None: ...
