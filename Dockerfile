# meshaudit container image: docker build -t meshaudit:0.1.0 .
# Two stages: the first builds a venv with meshaudit and its runtime dependencies only (no dev
# extras), the second is that venv on a clean base, run as an unprivileged user. Runs with a
# read-only root filesystem (deploy/kubernetes): the only writable paths are the working
# directory /var/lib/meshaudit (spools, learn-mode state; a volume in Kubernetes) and /tmp.
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for meshaudit's own extensions (the ALS entry and OTLP span scanners, the id
# indexes' map: setup.py); the final stage takes only the built venv. Debian's compiler packages
# are not pinned: the base image pins the release, and a point release of gcc builds the same code.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/meshaudit
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY daemon ./daemon
# Every dependency is pinned in pyproject.toml and comes as a binary wheel; only meshaudit is built.
RUN /opt/meshaudit/bin/pip install --no-cache-dir --only-binary=:all: . \
 && /opt/meshaudit/bin/pip check

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="meshaudit" \
      org.opencontainers.image.description="Streaming live-traffic auditor for service meshes: Envoy access logs and OTLP in, security alerts out." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 meshaudit \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/meshaudit --no-create-home \
      --shell /usr/sbin/nologin meshaudit \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/meshaudit
COPY --from=build /opt/meshaudit /opt/meshaudit
# The configuration the Kubernetes ConfigMap ships, so the image runs as it is; the ConfigMap
# is mounted over /etc/meshaudit in the cluster.
COPY deploy/kubernetes/base/config/config.yaml deploy/kubernetes/base/config/policy.yaml /etc/meshaudit/
ENV PATH=/opt/meshaudit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/meshaudit
USER 10001:10001
# gRPC (Envoy ALS, OTLP traces and logs), OTLP/HTTP, metrics and health. No HEALTHCHECK:
# Kubernetes ignores it and probes /healthz and the gRPC health service itself.
EXPOSE 4317 4318 9464
ENTRYPOINT ["meshaudit"]
CMD ["run", "--config", "/etc/meshaudit/config.yaml"]
