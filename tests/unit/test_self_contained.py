"""The repository documents itself: every Markdown file a file of ours points at is in the
repository, and nothing points outside it (a user's clone has nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("daemon", "bench", "proto", "config", "deploy", "tests", ".ci")
FILES = ("Makefile", "pyproject.toml", "README.md", "BENCHMARKS.md", "Dockerfile")
SKIP_PARTS = {"_proto", "__pycache__", "node_modules", "results"}
MD_REF = re.compile(r"(?<![\w/.-])((?:\.\./)*[\w./-]*[A-Za-z0-9_-]\.md)\b")


def _ours() -> list[Path]:
    out = [REPO / f for f in FILES if (REPO / f).exists()]
    for root in ROOTS:
        for p in (REPO / root).rglob("*"):
            if p.is_file() and not SKIP_PARTS & set(p.parts) and p.suffix not in (".pyc", ".json", ".png"):
                out.append(p)
    return out


def test_every_markdown_file_referred_to_is_in_the_repository() -> None:
    missing = []
    for f in _ours():
        text = f.read_text(errors="replace")
        for m in MD_REF.finditer(text):
            ref = m.group(1)
            if ref.startswith("var/"):  # what a run writes (make demo's report): gitignored output, not a document
                continue
            here = (f.parent / ref).resolve()
            anywhere = [p for p in REPO.glob(f"**/{Path(ref).name}") if "var" not in p.relative_to(REPO).parts[:1]]
            if not here.exists() and not (REPO / ref).exists() and not anywhere:
                missing.append(f"{f.relative_to(REPO)}: {ref}")
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|\bshared/(?:ARCHITECTURE|REAL-COMPONENTS|STYLE|schemas)")
    # The one exception: a test that reads CRD schemas from the directory the setting
    # MESHAUDIT_CRD_SCHEMAS names, by default shared/schemas/crds beside the repository, and
    # skips those checks when it is absent.
    crd_schemas = re.compile(r"\bshared/schemas/crds\b")
    hits = []
    for f in _ours():
        text = f.read_text(errors="replace")
        if f.parent.name == "unit" and "MESHAUDIT_CRD_SCHEMAS" in text:
            text = crd_schemas.sub("", text)
        if f != Path(__file__) and outside.search(text):
            hits.append(str(f.relative_to(REPO)))
    assert hits == []
