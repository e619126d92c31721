"""Sinks: where alerts go. One module per sink, one registry line each in :data:`REGISTRY`.

``build_sinks(cfg.sinks)`` returns the enabled sinks, not started. The app starts them before
anything produces alerts, hands each alert to every sink's ``offer``, asks ``ready`` /
``ready_reason`` for /readyz, and calls ``shutdown(deadline)`` on SIGTERM after ingestion stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshaudit.sinks.base import FatalSinkError, PermanentError, Sink, SinkConfigBase
from meshaudit.sinks.jsonl import JsonlSink
from meshaudit.sinks.kafka import KafkaSink
from meshaudit.sinks.mqtt import MqttSink

if TYPE_CHECKING:
    from meshaudit.config import SinksConfig

__all__ = ["REGISTRY", "FatalSinkError", "PermanentError", "Sink", "SinkConfigBase", "build_sinks"]

# config section name -> sink class (constructed as ``cls(section_config)``)
REGISTRY: dict[str, Callable[[Any], Sink]] = {
    "jsonl": JsonlSink,
    "kafka": KafkaSink,
    "mqtt": MqttSink,
}


def build_sinks(cfg: SinksConfig) -> list[Sink]:
    """The sinks configured and enabled, in registry order (not started)."""
    sinks: list[Sink] = []
    for name, factory in REGISTRY.items():
        section: SinkConfigBase | None = getattr(cfg, name)
        if section is not None and section.enabled:
            sinks.append(factory(section))
    return sinks
