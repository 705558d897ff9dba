# The eventrails operator image. The Helm chart runs it as `eventrails operator`.
#
# Build from the repository root (the context needs pyproject.toml, runtime/ and operator/):
#   docker build -f docker/operator.Dockerfile -t ghcr.io/eventrails/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/eventrails
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
# The versions come from pyproject.toml; a non-editable install leaves /src behind.
RUN /opt/eventrails/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/eventrails/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 eventrails \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin eventrails
COPY --from=build /opt/eventrails /opt/eventrails
USER 10001:10001
# 8080: kopf's /healthz; 9090: Prometheus /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["eventrails", "operator"]
