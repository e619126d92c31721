"""What became of a request: whether it failed upstream (error_burst, the service graph's
error rates). One definition, read by the rules and the graph alike."""

from __future__ import annotations

from typing import Final

from meshaudit.model import Hop
from meshaudit.naming import BLACKHOLE

UPSTREAM_FAILURE_FLAGS: Final = frozenset(("UF", "UH", "UO", "UT", "UC", "UR", "URX"))


def failed(h: Hop) -> bool:
    """Whether a request failed upstream (UF, UH, UO, UT, UC, UR, URX flags, or a 5xx the upstream answered;
    the mesh's own refusals are not failures: see error_burst). The status is read first; the flags
    and details (costly fields of an access-log entry) only for a 5xx or a missing status."""
    status: int = h.status
    if 0 < status < 500:  # nearly every request
        return False
    if h.upstream_cluster == BLACKHOLE:
        return False
    flags: str = h.response_flags
    if flags and flags != "-":  # "-": none, as an OpenTelemetry access log writes it
        if not UPSTREAM_FAILURE_FLAGS.isdisjoint(flags.split(",")):
            return True
        if status < 500:
            return False
        details: str = h.response_code_details
        return details == "via_upstream"
    if status < 500:
        return False
    details = h.response_code_details
    # No details at all (an OpenTelemetry access log that does not carry them) and no flag: no
    # sign of a local reply, so the upstream answered.
    return details == "via_upstream" or not details
