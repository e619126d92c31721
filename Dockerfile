# meshaudit container image. Build: docker build -t meshaudit .
# (No Docker engine on the development machines; the image mirrors `make install`.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 meshaudit
COPY --from=build /install /usr/local
COPY config /etc/meshaudit
USER 10001
# gRPC (Envoy ALS + OTLP), OTLP/HTTP, metrics/health
EXPOSE 4317 4318 9464
ENTRYPOINT ["meshaudit"]
CMD ["run", "--config", "/etc/meshaudit/example.yaml"]
