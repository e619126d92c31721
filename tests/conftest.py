"""Shared pytest plugins: each test library registers its fixtures here, one line each."""

pytest_plugins = [
    "infra.brokers",
    "infra.disk",
]
