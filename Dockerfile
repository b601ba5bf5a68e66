# The ext_proc sidecar: slim, non-root, exact dependency versions checked against their hashes
# (deploy/requirements.lock, made by scripts/lock.sh from pyproject.toml and this base image's Python).
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY deploy/requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --prefix=/install -r requirements.lock
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:3.11.14-slim-bookworm
COPY --from=build /install /usr/local
COPY deploy/config.yaml /etc/extproc/config.yaml
RUN useradd --system --uid 10001 --no-create-home extproc
USER 10001
# gRPC ext_proc for Envoy; admin (/healthz /readyz /metrics)
EXPOSE 50051 9902
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9902/healthz', timeout=2)"]
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/config.yaml"]
