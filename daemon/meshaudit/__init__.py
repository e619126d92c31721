"""meshaudit: a streaming live-traffic auditor for service meshes."""

__version__ = "0.1.0"
