"""Policy globs: the fast paths (exact paths, ``prefix*``) answer exactly as fnmatch does."""

from __future__ import annotations

import fnmatch

from hypothesis import given, settings
from hypothesis import strategies as st
from meshaudit.engine.matchers import PathMatcher

_CHARS = st.sampled_from(list("/ab1.-_*?[]!"))
_PATHS = st.text(alphabet=st.sampled_from(list("/ab1.-_?=&")), max_size=16)


def _reference(patterns: list[str], path: str | None) -> bool:
    if "*" in patterns:
        return True
    if path is None:
        return False
    bare = path.split("?", 1)[0]
    return any(fnmatch.fnmatchcase(bare, p) for p in patterns)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet=_CHARS, min_size=1, max_size=8), max_size=4), st.one_of(st.none(), _PATHS))
def test_path_matcher_agrees_with_fnmatch(patterns: list[str], path: str | None) -> None:
    assert PathMatcher(patterns)(path) == _reference(patterns, path)


def test_path_matcher_shapes() -> None:
    m = PathMatcher(["/healthz", "/api/*", "/v[12]/items/*/lines"])
    assert m("/healthz") and m("/healthz?probe=1") and not m("/healthz/x")
    assert m("/api/") and m("/api/v1/items/7?q=1") and not m("/ap?i/")
    assert m("/v2/items/9/lines") and not m("/v3/items/9/lines")
    assert not m(None) and PathMatcher(["*"])(None)
