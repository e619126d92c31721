"""The one thing pyproject.toml cannot declare without an experimental setting: meshaudit's C
extensions, whose headers say why they exist: the scanners of Envoy's access-log entries
(daemon/meshaudit/receivers/envoy_als/_scan.c) and of OTLP spans
(daemon/meshaudit/receivers/otlp/_spanscan.c), which read the wire format through
daemon/meshaudit/receivers/protowire.h, and the fingerprint map of the correlation's id indexes
(daemon/meshaudit/engine/_fpmap.c). `pip install` builds them with the machine's C compiler and
the Python headers."""

from setuptools import Extension, setup

# -ffp-contract=off: a float is computed as Python computes it (no fused multiply-add), so the
# scanners' times equal the protobuf path's to the last bit
EXTRA = ["-O2", "-Wall", "-Wextra", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "meshaudit.receivers.envoy_als._scan",
            sources=["daemon/meshaudit/receivers/envoy_als/_scan.c"],
            depends=["daemon/meshaudit/receivers/protowire.h"],
            extra_compile_args=EXTRA,
        ),
        Extension(
            "meshaudit.engine._fpmap",
            sources=["daemon/meshaudit/engine/_fpmap.c"],
            extra_compile_args=EXTRA,
        ),
        Extension(
            "meshaudit.receivers.otlp._spanscan",
            sources=["daemon/meshaudit/receivers/otlp/_spanscan.c"],
            depends=["daemon/meshaudit/receivers/protowire.h"],
            extra_compile_args=EXTRA,
        ),
    ]
)
