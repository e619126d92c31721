"""The committed generated code matches proto/ (run `make proto` after editing a .proto)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
