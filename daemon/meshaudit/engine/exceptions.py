"""Policy exceptions, compiled: traffic a rule does not alert on. Every matcher an exception sets
must match (an unset one matches anything); within a matcher, any of its values may. Checked only
for violations, never for every entry, so the hop's lazy fields (user agent, source address) are
read only then.

An exception stops applying from its ``expires`` day (00:00 UTC) on: the engine's clock
(``clock``, on every batch and tick) drops it, and the daemon logs and counts it (``take_expired``).
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import re
from collections.abc import Sequence

from meshaudit.config import Exemption, PolicyException
from meshaudit.engine.fpmap import FingerprintMap, new_map
from meshaudit.engine.matchers import PartyMatcher, PathMatcher
from meshaudit.model import Hop, Identity

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
EXCUSED_LIMIT = 100_000  # requests remembered for counting each once (cleared past it)


def _glob(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of "ip:port", "[v6]:port", "ip" or "v6"; None if it is none of them."""
    if addr.startswith("["):
        addr = addr[1 : addr.find("]")]
    elif addr.count(":") == 1:
        addr = addr.split(":", 1)[0]
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


def _status_ok(codes: Sequence[int | str], status: int) -> bool:
    """404 is one status; "5xx" a class of them (no status, 0, is in none)."""
    return any(status == c or (isinstance(c, str) and status > 0 and str(status)[0] == c[0]) for c in codes)


def exemption_name(i: int) -> str:
    """The name the ``i``-th entry of ``policy.exemptions`` (the form before exceptions) runs as."""
    return f"exemptions[{i}]"


class CompiledException:
    __slots__ = (
        "codes", "dst", "expires_at", "methods", "name", "networks", "not_paths", "paths", "protocols", "reason",
        "rules", "src", "user_agents",
    )  # fmt: skip

    def __init__(self, x: PolicyException | Exemption, name: str) -> None:
        self.name = name
        self.rules = frozenset(x.rules)
        self.reason = x.reason
        self.src = PartyMatcher(x.from_) if x.from_ is not None else None
        self.dst = PartyMatcher(x.to) if x.to is not None else None
        self.paths = PathMatcher(x.paths) if x.paths is not None else None
        self.methods: frozenset[str] | None = None
        self.not_paths: PathMatcher | None = None
        self.user_agents: re.Pattern[str] | None = None
        self.networks: list[IPNetwork] | None = None
        self.codes: list[int | str] | None = None
        self.protocols: frozenset[str] | None = None
        self.expires_at = float("inf")
        if isinstance(x, PolicyException):
            if x.methods is not None and "*" not in x.methods:
                self.methods = frozenset(x.methods)
            if x.not_paths is not None:
                self.not_paths = PathMatcher(x.not_paths)
            if x.user_agent is not None:
                self.user_agents = _glob(x.user_agent)
            if x.source_cidr is not None:
                self.networks = [ipaddress.ip_network(c, strict=False) for c in x.source_cidr]
            self.codes = x.response_codes
            self.protocols = frozenset(x.protocol) if x.protocol is not None else None
            if x.expires is not None:
                midnight = datetime.datetime.combine(x.expires, datetime.time(), datetime.UTC)
                self.expires_at = midnight.timestamp()

    def matches(self, src: Identity, dst: Identity, hop: Hop | None) -> bool:
        if self.src is not None and not self.src(src):
            return False
        if self.dst is not None and not self.dst(dst):
            return False
        if hop is None:  # nothing else is known: only an exception about parties alone applies
            return (self.paths, self.methods, self.not_paths, self.user_agents, self.networks, self.codes) == (
                None, None, None, None, None, None,
            ) and self.protocols is None  # fmt: skip
        if self.protocols is not None and ("http" if hop.method is not None else "tcp") not in self.protocols:
            return False
        if self.methods is not None and hop.method not in self.methods:
            return False
        if self.paths is not None and not self.paths(hop.path):
            return False
        if self.not_paths is not None and hop.path is not None and self.not_paths(hop.path):
            return False
        if self.user_agents is not None:
            ua = hop.user_agent
            if ua is None or self.user_agents.match(ua) is None:
                return False
        if self.networks is not None:
            addr = hop.source_address or src.address or hop.conn
            ip = _ip(addr) if addr else None
            if ip is None or not any(ip in net for net in self.networks):
                return False
        return self.codes is None or _status_ok(self.codes, hop.status)


class Exceptions:
    """Every exception of a policy, in order; the first that matches decides. Counts its matches
    per exception name (bounded by the policy) for ``meshaudit_policy_exception_matches_total``."""

    def __init__(self, exceptions: Sequence[PolicyException], exemptions: Sequence[Exemption]) -> None:
        self.active = [CompiledException(x, x.name) for x in exceptions]
        self.active += [CompiledException(x, exemption_name(i)) for i, x in enumerate(exemptions)]
        self.names = [x.name for x in self.active]
        self.now = float("-inf")  # the engine's clock, set on every batch and tick
        self._matches: dict[str, int] = {}
        self._requests: dict[str, int] = {}  # distinct requests (hops) each exception excused
        # the requests excused recently: (exception, observer, request id or socket, start), by
        # fingerprint (nothing of them kept alive: one for each excused entry, up to the limit)
        self._excused: FingerprintMap[tuple[str, str, str | None, float], bool] = new_map()
        self._expired: list[CompiledException] = []

    def exempt(self, rule: str, src: Identity, dst: Identity, hop: Hop | None) -> bool:
        x = self.covering(rule, src, dst, hop)
        if x is None:
            return False
        name = x.name
        self._matches[name] = self._matches.get(name, 0) + 1
        # One request may break several rules an exception covers (a probe: plaintext_hop and
        # unexpected_path, judged at once or after a wait): it is one request of covered traffic.
        if hop is not None:
            seen = self._excused
            request = (name, hop.observer, hop.request_id or hop.conn, hop.start)
            if request not in seen:
                if len(seen) >= EXCUSED_LIMIT:
                    seen = self._excused = new_map()
                seen[request] = True
                self._requests[name] = self._requests.get(name, 0) + 1
        return True

    def covering(self, rule: str, src: Identity, dst: Identity, hop: Hop | None) -> CompiledException | None:
        """The first active exception that covers this violation of ``rule`` (not counted)."""
        for x in self.active:
            if rule in x.rules and x.matches(src, dst, hop):
                return x
        return None

    def clock(self, now: float) -> None:
        self.now = now
        for x in self.active:
            if x.expires_at <= now:
                self._expire(x)

    def _expire(self, x: CompiledException) -> None:
        self.active = [y for y in self.active if y is not x]
        self._expired.append(x)

    def take_matches(self) -> tuple[dict[str, int], dict[str, int]]:
        """(violations, distinct requests) each exception covered since the last call."""
        out, self._matches = self._matches, {}
        requests, self._requests = self._requests, {}
        return out, requests

    def take_expired(self) -> list[CompiledException]:
        out, self._expired = self._expired, []
        return out
