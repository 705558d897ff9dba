# The eventrails worker image: `eventrails worker module:object`, as the operator's worker
# Deployments run it. Teams build their own image on top of it and add their handlers:
#
#   FROM ghcr.io/eventrails/worker:0.1.0
#   COPY --chown=10001:10001 mail/ /app/mail/
#
# and name the image in their Consumer's spec.image. Build this one from the repository root:
#   docker build -f docker/worker.Dockerfile -t ghcr.io/eventrails/worker:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/eventrails
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
RUN /opt/eventrails/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/eventrails/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app
# The same numeric user the operator gives worker pods (runAsUser 10001).
RUN groupadd --system --gid 10001 eventrails \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin eventrails
COPY --from=build /opt/eventrails /opt/eventrails
WORKDIR /app
USER 10001:10001
# /healthz, /readyz and /metrics.
EXPOSE 8080
ENTRYPOINT ["eventrails", "worker"]
