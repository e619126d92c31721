"""The learned baseline of ``unexpected_edge`` in ``learn`` mode, and its state file.

A baseline is the set of edges seen while learning, keyed (source key, destination key) as the
rule keys them (``Identity.key``: ``svc.ns``, else a SPIFFE principal, else an address), each with
the time it was first seen; and, with ``learn_routes``, the (method, path) pairs seen per
destination (at most :data:`ROUTES_PER_DESTINATION` each; more are dropped and counted).

The state file (``rules.unexpected_edge.state_file``) is one JSON document::

    {"format": "meshaudit-baseline", "version": 1, "written": <epoch seconds>,
     "edges": [{"from": "frontend.default", "to": "reviews.default", "first_seen": <epoch>}, ...],
     "routes": {"reviews.default": {"allow": [["GET", "/reviews/1"], ...], "dropped": 0}, ...},
     "sha256": "<hex>"}

``sha256`` is the digest of the document without that field, serialized canonically (orjson,
keys sorted, no whitespace): a file cut short, edited by hand or flipped on disk is refused
(:class:`BaselineError`, naming the file and what is wrong), never half-read. It is written to a
temporary file in the same directory, flushed and fsynced, renamed over the old one and the
directory fsynced: a crash at any point leaves the old file or the new one, whole.

This module knows nothing of the daemon's processes: the rule (one process) or the coordinator
(``workers: N``) owns a :class:`BaselineFile` and decides when to load and save.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import yaml

from meshaudit import metrics
from meshaudit.logsafe import RateLimited, wire

log = logging.getLogger("meshaudit.baseline")

FORMAT: Final = "meshaudit-baseline"
VERSION: Final = 1
ROUTES_PER_DESTINATION: Final = 1000
RETRY_SECS: Final = 60.0  # a save that failed is tried again this much later
ERROR_LOG_SECS: Final = 600.0  # a save that keeps failing is logged at most this often

Edge = tuple[str, str]  # (source key, destination key)
Route = tuple[str, str]  # (method, path without its query string)


class BaselineError(Exception):
    """A state file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def rfc3339(t: float) -> str:
    """Epoch seconds as an RFC 3339 UTC time, to the second (``2027-01-15T08:00:00Z``)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Routes:
    """Learned (method, path) pairs per destination key, bounded per destination and in all;
    a pair past a bound is dropped and counted. Looks like a store to the metrics
    (``meshaudit_store_items{store="learned_routes"}``, drops as ``capacity`` evictions)."""

    __slots__ = ("_n", "by_dst", "dropped", "evicted_capacity", "expired", "max_items", "name", "per_destination")

    def __init__(self, max_items: int, per_destination: int = ROUTES_PER_DESTINATION) -> None:
        self.name = "learned_routes"
        self.max_items = max_items
        self.per_destination = per_destination
        self.by_dst: dict[str, set[Route]] = {}
        self.dropped: dict[str, int] = {}  # per destination, kept in the state file
        self.expired = 0
        self.evicted_capacity = 0  # dropped by this process (the metric)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, dst: str, method: str, path: str) -> bool:
        """True when the pair is new and kept; a pair past a bound is counted as dropped."""
        have = self.by_dst.get(dst)
        r = (method, path)
        if have is not None and r in have:
            return False
        if self._n >= self.max_items or (have is not None and len(have) >= self.per_destination):
            self.dropped[dst] = self.dropped.get(dst, 0) + 1
            self.evicted_capacity += 1
            return False
        if have is None:
            have = self.by_dst[dst] = set()
        have.add(r)
        self._n += 1
        return True

    def update(self, other: Routes) -> None:
        for dst, routes in other.by_dst.items():
            for method, path in routes:
                self.add(dst, method, path)
        for dst, n in other.dropped.items():
            self.dropped[dst] = self.dropped.get(dst, 0) + n


def route_path(path: str | None) -> str | None:
    """What a route is learned as: the path without its query string (as policy paths match)."""
    if path is None:
        return None
    q = path.find("?")
    return path[:q] if q >= 0 else path


class Baseline:
    """Edges with the time each was first seen, and optionally routes per destination."""

    __slots__ = ("edges", "max_edges", "routes", "written")

    def __init__(self, max_edges: int = 1_000_000, max_routes: int = 1_000_000) -> None:
        self.max_edges = max_edges
        self.edges: dict[Edge, float] = {}
        self.routes = Routes(max_routes)
        self.written: float | None = None  # when the file it was read from was written

    def __len__(self) -> int:
        return len(self.edges)

    def add_edge(self, src: str, dst: str, first_seen: float) -> bool:
        """True when the edge is new and kept (an edge seen again keeps its first time)."""
        k = (src, dst)
        seen = self.edges.get(k)
        if seen is not None:
            if first_seen < seen:
                self.edges[k] = first_seen
            return False
        if len(self.edges) >= self.max_edges:
            return False
        self.edges[k] = first_seen
        return True

    def add_edges(self, edges: Iterable[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
        """Add many; returns those that were new."""
        return [e for e in edges if self.add_edge(*e)]

    # --- the file format ---------------------------------------------------------------------------
    def payload(self, written: float) -> dict[str, Any]:
        """The document without its checksum (edges and routes sorted: the same baseline always
        gives the same bytes)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "written": written,
            "edges": [{"from": s, "to": d, "first_seen": t} for (s, d), t in sorted(self.edges.items())],
            "routes": {
                dst: {"allow": [list(r) for r in sorted(routes)], "dropped": self.routes.dropped.get(dst, 0)}
                for dst, routes in sorted(self.routes.by_dst.items())
            },
        }

    def to_bytes(self, written: float) -> bytes:
        doc = self.payload(written)
        doc["sha256"] = checksum(doc)
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike[str]) -> Baseline:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BaselineError(path, f"not a meshaudit baseline: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BaselineError(path, f'not a meshaudit baseline: no "format": "{FORMAT}" field')
        version = doc.get("version")
        if version != VERSION:
            raise BaselineError(
                path, f"baseline format version {version!r} is not supported (this meshaudit reads version {VERSION})"
            )
        want = doc.pop("sha256", None)
        if not isinstance(want, str):
            raise BaselineError(path, 'no "sha256" field: the file is incomplete')
        got = checksum(doc)
        if got != want:
            raise BaselineError(
                path, f"checksum mismatch (file says sha256 {want[:16]}..., content is {got[:16]}...): "
                "the file was changed or damaged after it was written"
            )  # fmt: skip
        b = cls()
        try:
            written = doc["written"]
            b.written = float(written) if isinstance(written, int | float) else None
            for i, e in enumerate(doc["edges"]):
                s, d, t = e["from"], e["to"], e["first_seen"]
                if not (isinstance(s, str) and isinstance(d, str) and isinstance(t, int | float)):
                    raise ValueError(f"edges[{i}] must have string from/to and a numeric first_seen")
                b.edges[(s, d)] = float(t)
            for dst, entry in doc["routes"].items():
                for method, path_ in entry["allow"]:
                    if not (isinstance(method, str) and isinstance(path_, str)):
                        raise ValueError(f"routes[{dst!r}] must hold [method, path] string pairs")
                    b.routes.add(dst, method, path_)
                if entry.get("dropped"):
                    b.routes.dropped[dst] = int(entry["dropped"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BaselineError(path, f"malformed baseline ({type(exc).__name__}: {exc})") from None
        b.routes.evicted_capacity = 0  # drops counted by the process that learned them
        return b


def checksum(payload: dict[str, Any]) -> str:
    """SHA-256 of the canonical serialization (keys sorted, compact) of a document without its
    ``sha256`` field."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def save(baseline: Baseline, path: str | os.PathLike[str], now: float) -> None:
    """Write atomically: a temporary file in the same directory, fsynced, renamed over ``path``,
    then the directory fsynced. Raises OSError (the old file, if any, is intact)."""
    p = Path(path)
    data = baseline.to_bytes(now)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: str | os.PathLike[str]) -> Baseline | None:
    """The baseline saved at ``path``; None when there is no file (nothing learned yet). Raises
    :class:`BaselineError` for a file that cannot be read or used."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BaselineError(path, f"cannot read: {exc.strerror or exc}") from None
    return Baseline.from_bytes(data, path)


class BaselineFile:
    """The state file as the daemon uses it: read once at start (:meth:`load`), written when
    the learning window ends (:meth:`request` then :meth:`flush` on every tick).

    A file that cannot be used is logged (naming it and the reason), counted
    (``meshaudit_baseline_loads_total{result="corrupt"}``) and left as it is: the daemon learns
    again, and only when the new baseline is saved is the old file copied to ``<file>.corrupt``
    and replaced. A save that fails (disk full, I/O error, read-only) never stops the daemon: it
    is counted (``meshaudit_baseline_writes_total{result="error"}``), logged at most once per
    ``ERROR_LOG_SECS``, and tried again every ``RETRY_SECS`` while the daemon runs."""

    def __init__(self, path: str | os.PathLike[str], logger: logging.Logger = log) -> None:
        self.path = Path(path)
        self.log = logger
        self.corrupt = False  # the file at start could not be used: keep a copy before replacing it
        self.pending = False  # a baseline waits to be written
        self._retry_at = float("-inf")
        self._errors = RateLimited(logger, ERROR_LOG_SECS)

    def load(self, learn_secs: float) -> Baseline | None:
        try:
            b = load(self.path)
        except BaselineError as exc:
            self.corrupt = True
            metrics.BASELINE_LOADS.labels("corrupt").inc()
            self.log.error(
                "Learned baseline refused: %s. Starting with an empty baseline and learning again for "
                "%d s; the file is left as it is until the new baseline is saved over it (a copy is kept "
                "as %s.corrupt).",
                exc,
                learn_secs,
                self.path,
            )
            return None
        if b is None:
            metrics.BASELINE_LOADS.labels("missing").inc()
            self.log.info(
                "No learned baseline at %s yet: learning edges for %d s, then saving them there.", self.path, learn_secs
            )
            where = self.path.parent
            if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
                self.log.warning(
                    "The learned baseline cannot be saved in %s (%s); create it or make it writable before "
                    "the learning window ends.",
                    where,
                    "no such directory" if not where.is_dir() else "not writable",
                )
            return None
        metrics.BASELINE_LOADS.labels("loaded").inc()
        self.log.info(
            "Learned baseline loaded from %s (written %s): %d edges, %d routes. Learning is over: "
            "edges not in it alert at once.",
            self.path,
            rfc3339(b.written) if b.written is not None else "at an unknown time",
            len(b.edges),
            len(b.routes),
        )
        return b

    def request(self) -> None:
        """The baseline changed after learning: write it on the next :meth:`flush`."""
        self.pending = True
        self._retry_at = float("-inf")

    def flush(self, snapshot: Callable[[], Baseline], now: float) -> bool:
        """Write the baseline if one waits (and a failed attempt is not too recent); True when
        written. Never raises for a disk error."""
        if not self.pending or now < self._retry_at:
            return False
        b = snapshot()
        try:
            if self.corrupt:
                shutil.copyfile(self.path, f"{self.path}.corrupt")
            save(b, self.path, now)
        except FileNotFoundError as exc:
            if self.corrupt and exc.filename == str(self.path):  # the bad file went away meanwhile
                self.corrupt = False
                return self.flush(snapshot, now)
            return self._failed(exc, now)
        except OSError as exc:
            return self._failed(exc, now)
        metrics.BASELINE_WRITES.labels("ok").inc()
        if self.corrupt:
            self.log.warning("The refused baseline file was kept as %s.corrupt.", self.path)
        self.corrupt = False
        self.pending = False
        self.log.info("Learned baseline saved to %s: %d edges, %d routes.", self.path, len(b.edges), len(b.routes))
        return True

    def _failed(self, exc: OSError, now: float) -> bool:
        metrics.BASELINE_WRITES.labels("error").inc()
        self._retry_at = now + RETRY_SECS
        self._errors.error(
            "save",
            "Cannot save the learned baseline to %s: %s. The daemon goes on with the baseline in memory "
            'and tries again every %.0f s (meshaudit_baseline_writes_total{result="error"}).',
            self.path,
            exc.strerror or exc,
            RETRY_SECS,
        )
        return False


# --- export: the baseline as a reviewable policy -------------------------------------------------------
def glob_escape(text: str) -> str:
    """A literal for a policy pattern (fnmatch): ``*``, ``?`` and ``[`` in brackets."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def parse_since(text: str) -> float:
    """``YYYY-MM-DD`` (midnight UTC) or an RFC 3339 time with its offset, as epoch seconds."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected YYYY-MM-DD or an RFC 3339 time (2027-01-15T08:00:00Z)") from None
    if t.tzinfo is None:
        raise ValueError(f"--since {text!r}: give the time's offset (Z or +hh:mm), as RFC 3339 requires")
    return t.timestamp()


def _flow(items: list[str]) -> str:
    """A YAML flow sequence, each item quoted only when YAML needs it."""
    return str(yaml.safe_dump(items, default_flow_style=True, width=1_000_000, allow_unicode=True)).strip()


def export_policy(b: Baseline, source: str, since: float | None = None) -> str:
    """The baseline as a policy file for review: ``apiVersion: meshaudit/v1``, one ``edges``
    entry per learned edge (sorted, each after a ``# first seen`` comment) and, when routes were
    learned, a ``routes`` section. ``since``: only edges first seen at or after it (and routes
    of their destinations). Keys are escaped for the policy's globs."""
    edges = sorted((k, t) for k, t in b.edges.items() if since is None or t >= since)
    dsts = {d for (_, d), _ in edges}
    routes = {
        d: r for d, r in sorted(b.routes.by_dst.items()) if r and (since is None or d in dsts)
    }  # fmt: skip
    written = rfc3339(b.written) if b.written is not None else "at an unknown time"
    only = f", first seen since {rfc3339(since)}" if since is not None else ""
    n_routes = sum(len(r) for r in routes.values())
    out = [
        "# meshaudit learned baseline, exported as a policy for review.",
        f"# From {wire(source, 1000)}, written {written}.",
        f"# {len(edges)} edges (of {len(b.edges)} learned{only}); {n_routes} routes on {len(routes)} destinations.",
        "# Every entry below was seen while learning: check each before enforcing it.",
        "apiVersion: meshaudit/v1",
        "edges:" if edges else "edges: []",
    ]
    for (s, d), t in edges:
        out.append(f"  # first seen {rfc3339(t)}")
        out.append(f"  - {{from: {_flow([glob_escape(s)])}, to: {_flow([glob_escape(d)])}}}")
    if routes:
        out.append("routes:")
        for d, pairs in routes.items():
            dropped = b.routes.dropped.get(d, 0)
            if dropped:
                out.append(
                    f"  # {dropped} more routes seen on this destination were not kept (at most "
                    f"{ROUTES_PER_DESTINATION} per destination): with this policy they alert as unexpected_path."
                )
            out.append(f"  - to: {_flow([glob_escape(d)])}")
            out.append("    allow:")
            by_method: dict[str, list[str]] = {}
            for method, path in sorted(pairs):
                by_method.setdefault(method, []).append(glob_escape(path))
            for method, paths in by_method.items():
                out.append(f"      - {{methods: {_flow([method])}, paths: {_flow(paths)}}}")
    return "\n".join(out) + "\n"
