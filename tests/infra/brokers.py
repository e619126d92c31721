"""Real message brokers for tests: Tansu (Kafka wire protocol) and Mosquitto (MQTT), each a
subprocess on 127.0.0.1 and a free port, started and stopped by PID; and a TLS terminator
(Debian socat) for a broker that does not serve TLS itself.

Session fixtures ``tansu`` and ``mosquitto`` share one broker per test run; the factories
``tansu_factory``, ``mosquitto_factory`` and ``tls_terminator_factory`` start private ones for
tests that stop, freeze or restart them, or need TLS. Every process a fixture started is stopped
at teardown, also when the test failed.

TLS: Mosquitto serves it itself (``make_mosquitto(tls=...)``). This Tansu build does not (it
refuses ``--cert`` with ``--key``), so a Kafka client reaches it through socat terminating TLS
on a second port, which Tansu advertises (``make_tansu(advertised_port=...)``) so that every
connection the client opens after bootstrap goes through the terminator too.

Two outages: a frozen broker (``pause``: SIGSTOP, then SIGCONT) stops answering but keeps its
data, its port and its clients' connections; a broker that is gone (``kill``: SIGKILL, then
``start`` again on the same port, which Tansu rebinds at once) refuses connections meanwhile.
This Tansu build has no storage that outlives its process (``memory://`` only; ``postgres://``,
``sqlite://`` and the others are features it was built without, and ``s3://`` needs an object
store): a restarted Tansu has no topics, no records and no consumer groups, so its topics must be
created again (``create_topic``) before any client produces. Tansu takes a produce to a topic
that does not exist, into a log the topic created afterwards does not read, then fails that
partition's produces (UnknownError: the offsets collide): its records never reach a consumer.
Clients reconnect within 100 ms, faster than a topic is created, so such a test puts a
``Forwarder`` (the address clients know, which Tansu advertises) in front: broker and forwarder
down; the broker started again and its topic created; then the forwarder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka.conn import create_conn
from aiokafka.protocol.admin import CreateTopicsRequest

from infra.tools import mosquitto_binary, socat_binary, tansu_binary

HOST = "127.0.0.1"


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the kernel picks it; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_accepting(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on the port, or fail with the broker's log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"broker not accepting on {HOST}:{port} after {timeout}s: {log.read_text()[-2000:]}")


class BrokerProcess:
    """One broker subprocess we started; every signal goes to its PID and nowhere else."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} already running"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir
            )
        self.paused = False
        try:
            wait_accepting(self.port, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (SIGKILL after ``timeout``) our process; safe when never started or stopped twice."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL our process (a crash, a node lost): its port refuses connections until ``start``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        proc.kill()
        proc.wait(5.0)

    def pause(self) -> None:
        """Freeze the broker: connections stay open and nothing is answered (a hung broker)."""
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False


class Tansu(BrokerProcess):
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"


async def create_topic(port: int, name: str, partitions: int) -> None:
    """Create topic ``name`` (replication factor 1) on the broker listening on ``port``, as an
    operator or a deployment's job does. The request goes to that port itself, not to the
    address the broker advertises (a forwarder that may be down)."""
    conn = await create_conn(HOST, port)
    try:
        topics: list[tuple[str, int, int, list[Any], list[Any]]] = [(name, partitions, 1, [], [])]
        request = CreateTopicsRequest(create_topic_requests=topics, timeout=10_000, validate_only=False)
        response = await conn.send(request)
    finally:
        conn.close()
    errors = [(topic, code, message) for topic, code, message in response.topic_errors if code]
    if errors:
        raise RuntimeError(f"cannot create topic {name}: {errors}")


class Mosquitto(BrokerProcess):
    pass


class TlsTerminator(BrokerProcess):
    """socat: TLS on ``port``, plaintext to the target port; one child process per connection."""

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        # The per-connection children outlive their parent while their connection is open:
        # stop them too, each by its PID (they are ours: forked by the socat we started).
        children = self._children() if self.running else []
        super().stop(timeout)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _children(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except OSError:
            return []


@dataclass(frozen=True)
class ServerTls:
    """A TLS server's certificate and key, and the CA its clients' certificates must come from
    when ``require_client_cert`` (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path
    require_client_cert: bool = False


B = TypeVar("B", bound=BrokerProcess)


def make_tansu(
    workdir: Path, port: int | None = None, extra: list[str] | None = None, advertised_port: int | None = None
) -> Tansu:
    """Tansu on ``port``; ``advertised_port``: the port it tells clients to connect to (a TLS
    terminator's in front of it), by default its own."""
    port = port or free_port()
    url = f"tcp://{HOST}:{port}"
    argv = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        f"tcp://{HOST}:{advertised_port or port}",
        "--storage-engine",
        "memory://tansu/",
        *(extra or []),
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    return Tansu("tansu", argv, port, workdir)


def make_mosquitto(
    workdir: Path, port: int | None = None, persistence: bool = False, tls: ServerTls | None = None
) -> Mosquitto:
    """Mosquitto with a config of our own. ``persistence`` keeps sessions and queued QoS 1
    messages across a restart (saved on SIGTERM), which an outage test needs for its subscriber.
    ``tls``: the listener serves TLS only (and asks clients for a certificate when required)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"listener {port} {HOST}", "allow_anonymous true", f"persistence {str(persistence).lower()}"]
    if tls is not None:
        lines += [f"certfile {tls.cert}", f"keyfile {tls.key}", f"cafile {tls.client_ca}"]
        lines.append(f"require_certificate {str(tls.require_client_cert).lower()}")
    if persistence:
        lines += [f"persistence_location {workdir}/", "autosave_interval 1"]
    if os.geteuid() == 0:
        # Started as root, Mosquitto switches to the "mosquitto" user, which cannot write the
        # persistence file in a root-owned temporary directory: stay the user that started it.
        lines.append("user root")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return Mosquitto("mosquitto", [str(mosquitto_binary()), "-c", str(conf)], port, workdir)


class Forwarder(TlsTerminator):
    """socat: plaintext TCP on ``port`` forwarded to the target port, one child per connection.
    In front of a broker that advertises it, it is the address clients know: stopping it
    closes their connections and refuses new ones, and a broker restarted behind it can be
    prepared (its topics created) before the forwarder starts again and clients reach it."""


def make_forwarder(workdir: Path, target_port: int, port: int | None = None) -> Forwarder:
    """socat forwarding TCP ``port`` (127.0.0.1) to ``target_port``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    listen = f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork"
    return Forwarder("forwarder", [str(socat_binary()), listen, f"TCP:{HOST}:{target_port}"], port, workdir)


def make_tls_terminator(workdir: Path, target_port: int, tls: ServerTls, port: int | None = None) -> TlsTerminator:
    """socat serving TLS on ``port`` (127.0.0.1) and forwarding each connection in plaintext
    to ``target_port``; a client certificate from ``tls.client_ca`` is required when
    ``tls.require_client_cert``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    listen = ",".join(
        [
            f"OPENSSL-LISTEN:{port}",
            f"bind={HOST}",
            "reuseaddr",
            "fork",
            f"cert={tls.cert}",
            f"key={tls.key}",
            f"cafile={tls.client_ca}",
            f"verify={int(tls.require_client_cert)}",
        ]
    )
    argv = [str(socat_binary()), "-d", listen, f"TCP:{HOST}:{target_port}"]
    return TlsTerminator("socat", argv, port, workdir)


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """One Tansu for the session. Do not pause or stop it: use ``tansu_factory`` for that."""
    broker = make_tansu(tmp_path_factory.mktemp("tansu"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One Mosquitto for the session. Do not stop it: use ``mosquitto_factory`` for that."""
    broker = make_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def _started_brokers(make: Callable[..., B], base: Path) -> Iterator[Callable[..., B]]:
    """A factory of private brokers in their own directories under ``base``, each started on
    creation; all are stopped on exit."""
    started: list[B] = []

    def factory(*args: Any, **kw: Any) -> B:
        broker = make(base / f"{base.name}{len(started)}", *args, **kw)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield factory
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def tansu_factory(tmp_path: Path) -> Iterator[Callable[..., Tansu]]:
    """Start private Tansu brokers: ``factory(port=None, extra=None)``; all stopped at teardown."""
    with _started_brokers(make_tansu, tmp_path / "tansu") as factory:
        yield factory


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start private Mosquitto brokers: ``factory(port=None, persistence=False)``; all stopped at
    teardown."""
    with _started_brokers(make_mosquitto, tmp_path / "mosquitto") as factory:
        yield factory


@pytest.fixture
def forwarder_factory(tmp_path: Path) -> Iterator[Callable[..., Forwarder]]:
    """Start TCP forwarders: ``factory(target_port, port=None)``; all stopped (with their
    per-connection children) at teardown."""
    with _started_brokers(make_forwarder, tmp_path / "forwarder") as factory:
        yield factory


@pytest.fixture
def tls_terminator_factory(tmp_path: Path) -> Iterator[Callable[..., TlsTerminator]]:
    """Start TLS terminators: ``factory(target_port, tls, port=None)``; all stopped (with their
    per-connection children) at teardown."""
    with _started_brokers(make_tls_terminator, tmp_path / "socat") as factory:
        yield factory
