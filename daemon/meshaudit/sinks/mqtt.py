"""MQTT sink (aiomqtt): one message per alert on ``<topic_prefix>/<rule>/<destination service>``
(prefix ``meshaudit/alerts`` by default), QoS 1, payload the JSON alert.

An alert counts as sent when the broker's PUBACK arrived. aiomqtt does not reconnect by
itself: a lost connection fails the delivery, the base worker spools and reconnects with
exponential backoff and jitter, creating a fresh client each time. QoS 1 is at-least-once
already, so consumers deduplicate by alert id.

A broker that closes the connection before its CONNACK (over TLS 1.3, one that requires a client
certificate we did not send, or refuses the one we did) fails the connection attempt at once,
with the reason paho saw (the TLS alert), instead of leaving it to time out.

Topic levels come from data (rule, service name), so the MQTT wildcard and separator characters
``+ # /`` and NUL are replaced by ``_`` in them: a service name cannot add levels or a wildcard.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
from collections.abc import Sequence
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, model_validator

from meshaudit.sinks.base import Sink, SinkConfigBase
from meshaudit.sinks.queue import Outgoing
from meshaudit.sinks.secrets import TlsConfig, read_secret

log = logging.getLogger("meshaudit.sinks.mqtt")

_UNSAFE = re.compile(r"[+#/\x00]")


class MqttConfig(SinkConfigBase):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535, description="1883 plain, 8883 usually with TLS.")
    topic_prefix: str = Field("meshaudit/alerts", min_length=1, description="Topic = <prefix>/<rule>/<service>.")
    client_id: str | None = Field(None, description="MQTT client identifier; null: generated.")
    username: str | None = None
    password_file: str | None = Field(None, description="File holding the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    tls: TlsConfig | None = Field(None, description="TLS to the broker; absent: plaintext.")
    keepalive_secs: int = Field(30, ge=5, description="MQTT keep-alive: how soon a silent broker is noticed.")
    mqtt_version: Literal[3, 5] = Field(3, description="3: MQTT 3.1.1; 5: MQTT 5.")
    retain: bool = Field(False, description="Publish with the retain flag (last alert per topic kept).")
    max_inflight: int = Field(10, ge=1, le=100, description="QoS 1 publishes awaiting PUBACK at once.")

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if self.password_file and self.password_env:
            raise ValueError("set password_file or password_env, not both")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        if any(c in self.topic_prefix for c in "+#\x00") or self.topic_prefix.endswith("/"):
            raise ValueError("topic_prefix must not contain + # or NUL, nor end with /")
        return self


def topic_for(prefix: str, rule: str, service: str | None) -> str:
    return f"{prefix}/{_UNSAFE.sub('_', rule) or '_'}/{_UNSAFE.sub('_', service or 'unknown') or '_'}"


class MqttSink(Sink):
    def __init__(self, config: MqttConfig, name: str = "mqtt") -> None:
        super().__init__(name, config)
        self._cfg = config
        self._client: aiomqtt.Client | None = None
        self._up = False  # the CONNACK arrived: a graceful DISCONNECT makes sense

    async def _connect(self) -> None:
        cfg = self._cfg
        password = read_secret("password", cfg.password_file, cfg.password_env)
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=password,
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if cfg.mqtt_version == 5 else aiomqtt.ProtocolVersion.V311,
            keepalive=cfg.keepalive_secs,
            tls_context=_closing_context(cfg.tls) if cfg.tls is not None else None,
            # Our worker bounds every attempt (attempt_timeout_ms); no second clock here.
            timeout=math.inf,
        )
        # aiomqtt warns past 10 pending publishes; our window is the bound that matters.
        client.pending_calls_threshold = cfg.max_inflight + 1
        self._fail_on_early_close(client)
        self._client, self._up = client, False
        await client.__aenter__()
        self._up = True
        client._client.on_log = None  # needed while connecting only: paho formats every line for it

    def _fail_on_early_close(self, client: aiomqtt.Client) -> None:
        """aiomqtt ignores a connection closed before the CONNACK, so connecting would wait for
        our attempt timeout and say only "timed out". Fail it at once instead, with paho's last
        error (which names the cause: a TLS alert, a reset) as the reason. Private names of
        aiomqtt: pinned versions (pyproject.toml), as in ``_force_close``."""
        inner = client._client
        last_error = ""

        def on_log(_c: paho.Client, _userdata: object, level: int, text: str) -> None:
            nonlocal last_error
            if level == paho.MQTT_LOG_ERR:
                last_error = text

        def on_disconnect(
            c: paho.Client, userdata: Any, flags: paho.DisconnectFlags, rc: ReasonCode, props: Properties | None = None
        ) -> None:
            connecting = client._connected
            if self._client is client and not self._up and not connecting.done():
                why = last_error or f"reason code {rc}"
                connecting.set_exception(
                    aiomqtt.MqttError(f"the broker closed the connection before accepting it: {why}")
                )
            client._on_disconnect(c, userdata, flags, rc, props)

        inner.on_log = on_log
        inner.on_disconnect = on_disconnect

    async def _send(self, items: Sequence[Outgoing]) -> None:
        client = self._client
        if client is None:
            raise ConnectionError("not connected")
        prefix, retain = self._cfg.topic_prefix, self._cfg.retain
        window = self._cfg.max_inflight
        try:
            # A window of QoS 1 publishes awaits its PUBACKs together (paho keeps them in order
            # on the wire): one round trip per window instead of per alert.
            for start in range(0, len(items), window):
                async with asyncio.TaskGroup() as tg:
                    for item in items[start : start + window]:
                        topic = topic_for(prefix, item.rule, item.destination_service)
                        tg.create_task(client.publish(topic, item.payload, qos=1, retain=retain))
        except ExceptionGroup as group:  # report the first failure as the delivery error
            raise group.exceptions[0] from None

    async def _probe(self) -> None:
        client = self._client
        if client is None or not client._client.is_connected():  # paho's own state
            raise ConnectionError("MQTT connection lost")

    async def _close(self) -> None:
        client, self._client = self._client, None
        up, self._up = self._up, False
        if client is None:
            return
        try:
            if up:
                async with asyncio.timeout(2):  # a broker that does not answer DISCONNECT
                    await client.__aexit__(None, None, None)
        finally:
            _force_close(client)


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho leaves the socket of a failed TLS handshake (a broker certificate we do not trust)
    open for the garbage collector: one descriptor per retry. This one closes itself."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _closing_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = tls.context()
    ctx.sslsocket_class = _ClosingSSLSocket  # documented: the class wrap_socket returns
    return ctx


def _force_close(client: aiomqtt.Client) -> None:
    """Release the socket of a client whatever state it is in.

    aiomqtt 2.5 leaves a half-open connection behind when connecting is cancelled (our attempt
    timeout against a broker that accepts and never answers): its CONNACK future is cancelled,
    so paho's later disconnect callback raises and ``__aexit__`` would wait forever. A fresh
    future makes that callback a no-op; paho's own reset closes the socket, which also stops
    aiomqtt's reader and housekeeping task. Private names: pinned versions (pyproject.toml).
    """
    client._connected = asyncio.get_running_loop().create_future()
    client._client._reset_sockets()
