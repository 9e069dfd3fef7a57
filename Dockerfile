# syntax=docker/dockerfile:1
# One image for every Moneta process; its first argument picks which
# (deploy/docker/entrypoint.sh):
#   docker build -t moneta:dev .
#   docker run --rm moneta:dev ledger          # or wallet, gateway, consumer <name>, migrate …
# Both stages start from the same base, so the virtualenv's interpreter link
# holds in the final one. Pin it by digest where builds must be reproducible.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build

# Runtime dependencies, exactly as pinned, from wheels only: no compiler is
# needed here either, and none reaches the final stage. (pip compiles their
# bytecode here, at the paths the final stage keeps.)
COPY requirements.txt requirements-dev.txt ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r requirements.txt

# Generated protos, with the pinned grpcio-tools in a throwaway virtualenv
# (a build tool, not a runtime dependency).
COPY protos ./protos
RUN python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install --only-binary=:all: -c requirements.txt \
        "$(grep -E '^grpcio-tools==' requirements-dev.txt)" \
 && mkdir gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -Iprotos \
        --python_out=gen --grpc_python_out=gen \
        $(find protos -name '*.proto' | sort) \
 && python -m compileall -q -d /app/gen gen

# ---------------------------------------------------------------- final stage
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="moneta" \
      org.opencontainers.image.description="Moneta: ledger, wallet, budget, fraud, gateway and event consumers"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed, unprivileged identity (the manifests' runAsUser) with no shell
# login and no home to write to.
RUN groupadd --system --gid 10001 moneta \
 && useradd --system --uid 10001 --gid moneta --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin moneta

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /build/gen ./gen
# The services with their SQL migrations (services/<name>/migrations).
COPY services ./services
COPY deploy/docker/entrypoint.sh /usr/local/bin/moneta

# Bytecode compiled now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app/services \
 && chmod 0755 /usr/local/bin/moneta

USER 10001:10001
# The gateway; the plaintext health port and the gRPC services; metrics.
EXPOSE 8080 50050-50055 9101-9105
ENTRYPOINT ["/usr/local/bin/moneta"]
