"""MQTT sink (aiomqtt): one message per alert on ``<topic_prefix>/<rule>/<destination service>``
(prefix ``meshaudit/alerts`` by default), QoS 1, payload the JSON alert.

An alert counts as sent when the broker's PUBACK arrived. aiomqtt does not reconnect by
itself: a lost connection fails the delivery, the base worker spools and reconnects with
exponential backoff and jitter, creating a fresh client each time. QoS 1 is at-least-once
already, so consumers deduplicate by alert id.

Topic levels come from data (rule, service name), so the MQTT wildcard and separator characters
``+ # /`` and NUL are replaced by ``_`` in them: a service name cannot add levels or a wildcard.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from typing import Literal

import aiomqtt
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
            tls_context=cfg.tls.context() if cfg.tls is not None else None,
            # Our worker bounds every attempt (attempt_timeout_ms); no second clock here.
            timeout=math.inf,
        )
        # aiomqtt warns past 10 pending publishes; our window is the bound that matters.
        client.pending_calls_threshold = cfg.max_inflight + 1
        self._client, self._up = client, False
        await client.__aenter__()
        self._up = True

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
