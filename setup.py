"""The one thing pyproject.toml cannot declare without an experimental setting: the C scanner of
Envoy's HTTP access-log entries (daemon/meshaudit/receivers/envoy_als/_scan.c, whose header says
why it exists). `pip install` builds it with the machine's C compiler and the Python headers."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meshaudit.receivers.envoy_als._scan",
            sources=["daemon/meshaudit/receivers/envoy_als/_scan.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
