"""Start-up checks for the receivers' sockets: the open-file limit, and a port that another
process already listens on."""

from __future__ import annotations

import errno
import logging
import resource
import socket

log = logging.getLogger("meshaudit.receivers")


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection costs a descriptor; at
    the usual soft 1024 a burst of connections would leave none for Envoy's streams or /healthz).
    Returns (before, after) and logs the result. Worker processes inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (hard, soft) or soft >= hard:
        log.info("Open-file limit: %s (the hard limit).", "unlimited" if soft == resource.RLIM_INFINITY else soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("Open-file limit stays %d: raising it to %d failed (%s).", soft, hard, exc)
        return soft, soft
    log.info("Open-file limit raised from %d to %d (the hard limit).", soft, hard)
    return soft, hard


def ensure_free(addr: str) -> None:
    """Raise OSError("cannot listen on ADDR: address in use") when another socket holds the
    port. The probe binds without SO_REUSEPORT, so it fails even against a process that set it:
    SO_REUSEPORT is for our own workers only. Port 0 (any free port) is never taken."""
    host, _, port = addr.rpartition(":")
    if int(port) == 0:
        return
    bare = host.strip("[]")
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(f"cannot listen on {addr}: address in use") from None
                raise OSError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
