"""The one thing pyproject.toml cannot declare without an experimental setting: meshaudit's C
scanners, of Envoy's access-log entries (daemon/meshaudit/receivers/envoy_als/_scan.c) and of OTLP
spans (daemon/meshaudit/receivers/otlp/_spanscan.c), whose headers say why they exist. `pip install`
builds them with the machine's C compiler and the Python headers; both read the wire format
through daemon/meshaudit/receivers/protowire.h."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meshaudit.receivers.envoy_als._scan",
            sources=["daemon/meshaudit/receivers/envoy_als/_scan.c"],
            depends=["daemon/meshaudit/receivers/protowire.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "meshaudit.receivers.otlp._spanscan",
            sources=["daemon/meshaudit/receivers/otlp/_spanscan.c"],
            depends=["daemon/meshaudit/receivers/protowire.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ]
)
