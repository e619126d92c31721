"""Stage 2: per (rule, source, destination) alert windows. The first violation of a key alerts at
once, later ones in ``suppress_secs`` are counted and summed up when the window closes; one
request seen by both sidecars counts once; and an alert budget bounds the output whatever the
input.

Enforcement (violations that say whether the mesh denied their request, ``Violation.blocked``):
a window keeps "every counted request was denied so far" and its highest severity. Its first
alert says what the first request showed; a served request in a window that so far showed only
denied ones alerts at once (``blocked: false``, the served severity); the closing summary says the
whole window's verdict. When both sidecars log one request, the entry of the sidecar that denied
it decides, whichever arrived first: a request counted as served and then shown denied by its
other entry is counted once, as denied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from meshaudit import metrics
from meshaudit.config import EngineConfig
from meshaudit.engine.api import Violation
from meshaudit.engine.store import GenStore, TTLStore
from meshaudit.model import SEVERITIES, Alert, Example, Hop, alert_id, identity

BUDGET_PARTY: Final = identity("meshaudit")  # source and destination of an alert_budget_exceeded alert


class _AggState:
    __slots__ = (
        "blocked",
        "count",
        "detail",
        "dst",
        "emitted_blocked",
        "emitted_count",
        "examples",
        "first_seen",
        "last_seen",
        "observers",
        "opened_at",
        "opened_first",
        "rule",
        "seq",
        "served",
        "severity",
        "severity_blocked",
        "src",
        "summary",
        "suppressed",
        "window_no",
    )

    def __init__(self, v: Violation, now: float, window_no: int) -> None:
        self.summary = v.summary
        self.rule = v.rule
        self.severity = v.severity
        self.src = v.src
        self.dst = v.dst
        self.detail = v.detail
        self.first_seen = v.when
        self.last_seen = v.when
        self.count = 0
        self.emitted_count = 0
        self.seq = 0
        self.examples: list[Example] = []
        self.observers: set[str] = set()  # distinct observers reporting it (at most MAX_OBSERVERS)
        # What names the window in its alerts' ids: when it opened (receive time), its ordinal
        # among the aggregator's windows, and the data time of its first violation.
        self.opened_at = now
        self.window_no = window_no
        self.opened_first = v.when
        self.suppressed = False  # an alert of this window was held back by the alert budget
        # Enforcement (violations whose ``blocked`` is not None): "every counted request was
        # denied so far" (None: does not apply), how many were served, what the last alert said,
        # and the highest severity among the denied ones (what the window falls back to when a
        # request counted as served turns out to have been denied).
        self.blocked = v.blocked
        self.served = 1 if v.blocked is False else 0
        self.emitted_blocked = v.blocked
        self.severity_blocked = v.severity if v.blocked else SEVERITIES[0]


BUDGET_RULE: Final = "alert_budget_exceeded"
_SEVERITY_RANK: Final = {s: i for i, s in enumerate(SEVERITIES)}
_DEFAULT_BUDGET: Final[int] = EngineConfig.model_fields["alert_budget_per_window"].default
MAX_OBSERVERS: Final = 1000  # distinct observers counted per window (the count stops there)


class _Windows(TTLStore[tuple[str, str, str], _AggState]):
    """The alert windows; expiring them first closes the alert budget's window when it is due
    (the daemon and the coordinator both call ``states.expire`` on every tick)."""

    __slots__ = ("before_expire",)

    def __init__(
        self,
        ttl: float,
        max_items: int,
        on_expire: Callable[[tuple[str, str, str], _AggState, float], None],
        before_expire: Callable[[float], None],
    ) -> None:
        super().__init__("alert_windows", ttl, max_items, on_expire)
        self.before_expire = before_expire

    def expire(self, now: float) -> int:
        self.before_expire(now)
        return super().expire(now)


class Aggregator:
    """One alert per (rule, source, destination) per window of ``suppress_secs``, and at most
    ``alert_budget`` alerts per budget window (``suppress_secs`` from the first alert after the
    previous one closed) across all keys: the excess is counted and reported in one
    ``alert_budget_exceeded`` alert when the budget window closes, so the output is bounded
    whatever the input."""

    def __init__(
        self,
        suppress_secs: int,
        max_examples: int,
        max_items: int,
        alert_budget: int = _DEFAULT_BUDGET,
        summaries: Mapping[str, str] | None = None,
    ) -> None:
        """``summaries``: each rule's summary template (``{src}``, ``{dst}``), by rule name."""
        self.summaries = dict(summaries or {})
        self.window = suppress_secs
        self.max_examples = max_examples
        self.states: TTLStore[tuple[str, str, str], _AggState] = _Windows(
            suppress_secs, max_items, self._close, self._roll_budget
        )
        # One request seen by both sidecars must count once: (rule, request id) recently counted,
        # with the window it counted in and its enforcement verdict (see ``add``).
        self.counted: GenStore[tuple[str, str], tuple[tuple[str, str, str], int, bool | None]] = GenStore(
            "counted_requests", 300, max_items
        )
        self.out: list[Alert] = []
        self.violations: dict[str, int] = {}
        self.windows_opened = 0  # ordinal of the next window, part of its alerts' ids
        # Windows named by data time alone (the evaluator role, ``align``): see ``align``.
        self.aligned = False
        # The alert budget: alerts emitted in the current budget window, and what it held back.
        self.budget = alert_budget
        self.budget_windows = 0
        self._budget_start: float | None = None
        self._budget_used = 0
        self._held: dict[str, int] = {}  # rule -> alerts held back in this budget window
        self._held_keys = 0
        self._held_severity = SEVERITIES[0]
        self._held_first = float("inf")
        self._held_last = float("-inf")
        self.suppressed: dict[str, int] = {}  # rule -> alerts held back since start (a metric)

    @classmethod
    def from_config(cls, engine: EngineConfig, summaries: Mapping[str, str]) -> Aggregator:
        return cls(
            engine.suppress_secs, engine.examples, engine.store_max_items, engine.alert_budget_per_window, summaries
        )

    def align(self) -> None:
        """Name windows by the data time of their violations alone, so that every process judging
        the same violations gives their alerts the same ids (the evaluator role: a partition's
        hops judged again by its next owner after a failover, and several evaluators alerting on
        one (rule, source, destination), are deduplicated by alert id downstream). A window is then
        the ``suppress_secs`` bucket of epoch time its violation's data time falls in, per
        (rule, source, destination); its alerts' ids are (rule, source, destination, bucket,
        sequence in the window). Call before the first violation."""
        self.aligned = True

    def reconfigure(self, engine: EngineConfig) -> None:
        """A reload: open windows keep their deadlines and counts; new ones use the new length."""
        self.window = self.states.ttl = engine.suppress_secs
        self.max_examples = engine.examples
        self.budget = engine.alert_budget_per_window

    def add(self, v: Violation, now: float) -> None:
        h = v.hop
        blocked = v.blocked
        rid_key = (v.rule, h.request_id) if h is not None and h.request_id else None
        if rid_key is not None:
            seen = self.counted.get(rid_key)
            if seen is not None:
                if blocked and seen[2] is False:
                    self._denied_after_all(rid_key, seen, v, now)
                return
        self.violations[v.rule] = self.violations.get(v.rule, 0) + 1
        key = (v.rule, v.src.key, v.dst.key)
        if self.aligned:  # one window per bucket: its number rides in the key's last part
            key = (v.rule, v.src.key, f"{v.dst.key}|{int(v.when // self.window)}")
        st = self.states.get(key)
        fresh = st is None
        urgent = False
        if st is None:
            st = _AggState(v, now, self.windows_opened)
            self.windows_opened += 1
            self.states.put(key, st, now)  # the TTL is the window: closing it is the expire hook
        else:
            if _SEVERITY_RANK.get(v.severity, 0) > _SEVERITY_RANK.get(st.severity, 0):
                st.severity = v.severity
            if blocked is not None:
                if blocked:
                    if _SEVERITY_RANK.get(v.severity, 0) > _SEVERITY_RANK.get(st.severity_blocked, 0):
                        st.severity_blocked = v.severity
                else:
                    st.served += 1
                    # A forbidden request got through in a window that so far showed only denied
                    # ones: the auditor hears it now, not when the window closes.
                    urgent = st.blocked is True
                    st.blocked = False
        if rid_key is not None:
            self.counted.put(rid_key, (key, st.window_no, blocked), now)
        st.count += 1
        st.last_seen = max(st.last_seen, v.when)
        st.first_seen = min(st.first_seen, v.when)
        if h is not None:
            if len(st.observers) < MAX_OBSERVERS:
                st.observers.add(h.observer)
            self._add_example(st, h)
            for more in v.more:  # a per-edge violation brings its window's examples
                self._add_example(st, more)
        if fresh or urgent:
            self._emit(st, now)

    def _add_example(self, st: _AggState, h: Hop) -> None:
        """Keep a few examples, from as many observers as report it: once the list is full, an
        example from an observer not shown yet replaces the latest one of an observer shown
        twice. A forged report that came first cannot hide a real one behind its own examples."""
        examples = st.examples
        if len(examples) < self.max_examples:
            examples.append(Example(h))
            return
        shown = [e.observer for e in examples]
        if h.observer in shown:
            return
        for i in range(len(examples) - 1, -1, -1):
            if shown.count(shown[i]) > 1:
                examples[i] = Example(h)
                return

    def _denied_after_all(
        self, k: tuple[str, str], seen: tuple[tuple[str, str, str], int, bool | None], v: Violation, now: float
    ) -> None:
        """A request counted as served (the first entry of it to arrive, e.g. the source
        sidecar's outbound entry, which reads a denial as the upstream's 403) is shown denied by
        another entry of it (the destination sidecar's, which denied it). The denying sidecar's
        entry decides: the request counts once, as denied, and the window's verdict is corrected
        (its closing summary says so)."""
        key, window_no, _ = seen
        self.counted.put(k, (key, window_no, True), now)
        st = self.states.get(key)
        if st is None or st.window_no != window_no or st.served <= 0:
            return
        st.served -= 1
        if _SEVERITY_RANK.get(v.severity, 0) > _SEVERITY_RANK.get(st.severity_blocked, 0):
            st.severity_blocked = v.severity
        if st.served == 0:
            st.blocked = True
            st.severity = st.severity_blocked

    def _emit(self, st: _AggState, now: float) -> None:
        if not self._spend_budget(st, now):
            return
        src, dst = st.src, st.dst
        summary = st.summary or self.summaries.get(st.rule, "{rule} from {src} to {dst}").format(
            rule=st.rule, src=src.key, dst=dst.key
        )
        if st.count > 1:
            summary += f" ({st.count} times in {self.window} s)"
        if self.aligned:
            aid = alert_id(st.rule, src.key, dst.key, (st.opened_first // self.window) * self.window, st.seq)
        else:
            aid = alert_id(st.rule, src.key, dst.key, st.opened_at, st.seq, st.window_no, st.opened_first)
        self.out.append(
            Alert(
                id=aid,
                rule=st.rule,
                severity=st.severity,
                summary=summary + ".",
                source=src,
                destination=dst,
                count=st.count,
                first_seen=st.first_seen,
                last_seen=st.last_seen,
                window_secs=self.window,
                examples=list(st.examples),
                detail=st.detail,
                emitted_at=now,
                blocked=st.blocked,
                observers=max(1, len(st.observers)),
            )
        )
        st.emitted_count = st.count
        st.emitted_blocked = st.blocked
        st.seq += 1

    # --- the alert budget ---------------------------------------------------------------------
    def _spend_budget(self, st: _AggState, now: float) -> bool:
        """True when the alert may go out; else it is counted as held back."""
        self._roll_budget(now)
        if self._budget_start is None:
            self._budget_start = now
        if self._budget_used < self.budget:
            self._budget_used += 1
            return True
        rule = st.rule
        self._held[rule] = self._held.get(rule, 0) + 1
        self.suppressed[rule] = self.suppressed.get(rule, 0) + 1
        metrics.ALERTS_SUPPRESSED.labels(rule).inc()
        if not st.suppressed:
            st.suppressed = True
            self._held_keys += 1
        if _SEVERITY_RANK.get(st.severity, 0) > _SEVERITY_RANK[self._held_severity]:
            self._held_severity = st.severity
        self._held_first = min(self._held_first, st.first_seen)
        self._held_last = max(self._held_last, st.last_seen)
        return False

    def _roll_budget(self, now: float) -> None:
        """Close the budget window when it is over: one alert for what it held back."""
        start = self._budget_start
        if start is None or now < start + self.window:
            return
        held = sum(self._held.values())
        if held:
            top = sorted(self._held.items(), key=lambda kv: (-kv[1], kv[0]))
            rules = ", ".join(f"{r} {n}" for r, n in top[:5])
            me = BUDGET_PARTY
            self.out.append(
                Alert(
                    id=alert_id(BUDGET_RULE, me.key, me.key, start, 0, self.budget_windows),
                    rule=BUDGET_RULE,
                    severity=self._held_severity,
                    summary=f"More than {self.budget} alerts in {self.window} s: {held} alerts "
                    f"({self._held_keys} source/destination pairs) were held back; by rule: {rules}.",
                    source=me,
                    destination=me,
                    count=held,
                    first_seen=self._held_first,
                    last_seen=self._held_last,
                    window_secs=self.window,
                    examples=[],
                    detail=f"engine.alert_budget_per_window is {self.budget}; held back by rule: {rules}",
                    emitted_at=now,
                )
            )
        self.budget_windows += 1
        self._budget_start = None
        self._budget_used = 0
        self._held = {}
        self._held_keys = 0
        self._held_severity = SEVERITIES[0]
        self._held_first = float("inf")
        self._held_last = float("-inf")

    def _close(self, key: tuple[str, str, str], st: _AggState, now: float) -> None:
        # The window's summary, with the full count and verdict; not for a window the budget held back (the
        # budget's alert reported it: one alert held back, never counted twice).
        if (st.count > st.emitted_count or st.blocked != st.emitted_blocked) and not st.suppressed:
            self._emit(st, now)

    def release(self, drop: Callable[[str, str, str], bool]) -> int:
        """Forget, with no closing summary, the alert windows whose (rule, source key, destination
        key) ``drop`` selects (the evaluator role: keys now aggregated by another process)."""
        gone = [k for k, st in self.states.items() if drop(st.rule, st.src.key, st.dst.key)]
        for k in gone:
            self.states.pop(k)
        return len(gone)

    def drain(self) -> list[Alert]:
        out, self.out = self.out, []
        return out
