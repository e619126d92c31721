"""The committed generated code matches proto/ (run `make proto` after editing a .proto)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = gen
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = REPO / "daemon" / "meshaudit" / "_proto"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    have = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(have), "files differ: run `make proto`"
    stale = [str(k) for k in fresh if fresh[k] != have[k]]
    assert not stale, f"stale generated code, run `make proto`: {stale}"


def _fields(d: Any) -> dict[str, tuple[int, int, Any]]:
    return {f.name: (f.number, f.type, f.message_type) for f in d.fields}


def test_otlp_view_is_wire_compatible_with_opentelemetry_proto() -> None:
    """Every field of our OTLP view has the number and wire type of opentelemetry-proto's field
    of the same name; `map<string, AnyValue>` stands for `repeated KeyValue` (same encoding)."""
    from google.protobuf.descriptor import FieldDescriptor as F
    from meshaudit._proto.meshaudit.otlpview.v1 import view_pb2
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    # Same wire type: enum and int32 are both varints.
    wire = {F.TYPE_ENUM: F.TYPE_INT32}
    checked: list[str] = []

    seen: set[str] = set()

    def check(ours: Any, theirs: Any) -> None:
        if ours.full_name in seen:  # AnyValue holds ArrayValue holds AnyValue
            return
        seen.add(ours.full_name)
        mine, real = _fields(ours), _fields(theirs)
        for name, (num, typ, msg) in mine.items():
            assert name in real, f"{ours.full_name}.{name} is not in {theirs.full_name}"
            rnum, rtyp, rmsg = real[name]
            assert num == rnum, f"{ours.full_name}.{name}: field {num}, OTLP has {rnum}"
            assert wire.get(rtyp, rtyp) == typ, f"{ours.full_name}.{name}: type {typ}, OTLP has {rtyp}"
            checked.append(f"{ours.name}.{name}")
            if msg is None:
                continue
            if msg.GetOptions().map_entry:  # map<string, AnyValue> <-> repeated KeyValue
                assert rmsg.full_name == "opentelemetry.proto.common.v1.KeyValue"
                check(msg, rmsg)  # key = 1, value = 2
            else:
                check(msg, rmsg)

    check(view_pb2.ExportTraceServiceRequest.DESCRIPTOR, trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR)
    check(view_pb2.ExportLogsServiceRequest.DESCRIPTOR, logs_service_pb2.ExportLogsServiceRequest.DESCRIPTOR)
    assert "Span.attributes" in checked and "LogRecord.trace_id" in checked and "AnyValue.int_value" in checked
    assert "ArrayValue.values" in checked
