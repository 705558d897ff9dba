"""Run the eventrails operator: ``python -m eventrails_operator`` or ``eventrails operator``.

This is the composition root: it reads ``OperatorSettings`` from the environment, builds
kopf's settings and the handler registry, and runs kopf on the given namespaces (or the
whole cluster when none are given).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from typing import Any

import kopf
import prometheus_client
import pydantic

from eventrails_operator._handlers import OperatorContext, build_registry
from eventrails_operator._settings import OperatorSettings

logger = logging.getLogger("eventrails.operator")

# kopf's progress goes in annotations, not status fields: the CRDs' structural schemas would
# prune them, and the spec is never written (GitOps tools would report drift).
ANNOTATION_PREFIX = "eventrails.dev"
FINALIZER = "eventrails.dev/finalizer"


class StatusDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's diff base in ``status.lastHandledConfiguration``, written with the status in one request.

    Objects last handled by an older operator keep it in the
    ``eventrails.dev/last-handled-configuration`` annotation. It is read when the status
    has none, and removed once the status contains it.
    """

    def __init__(self) -> None:
        super().__init__(field="status.lastHandledConfiguration")
        self._annotation = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        # The annotation storage's essence also leaves out the old annotation.
        return self._annotation.build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return super().fetch(body=body) or self._annotation.fetch(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        super().store(body=body, patch=patch, essence=essence)
        for key in self._annotation.make_keys(self._annotation.key, body=body):
            if key in body.metadata.annotations:
                patch.metadata.annotations[key] = None


class AnnotationsProgress(kopf.AnnotationsProgressStorage):
    """kopf's progress of each handler in annotations, without a lone marker write.

    kopf marks the prefix as its own (``eventrails.dev/kopf-managed``) whenever it stores
    progress, even for a handler that succeeds at once and whose progress is purged in
    the same patch. That marker alone would cost each new object one more write, so it
    is dropped when no progress of the prefix is left in the patch.
    """

    def purge(self, *, key: str, body: kopf.Body, patch: kopf.Patch) -> None:  # type: ignore[override]
        super().purge(key=key, body=body, patch=patch)
        metadata = patch.get("metadata") or {}
        annotations = metadata.get("annotations") or {}
        marker = f"{self.prefix}/kopf-managed"
        if marker not in annotations or marker in body.metadata.annotations:
            return
        if any(name.startswith(f"{self.prefix}/") for name in annotations if name != marker):
            return
        del annotations[marker]
        if not annotations:
            del metadata["annotations"]
        if not metadata:
            del patch["metadata"]


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """Return kopf's settings for this operator."""
    result = kopf.OperatorSettings()
    result.persistence.progress_storage = AnnotationsProgress(prefix=ANNOTATION_PREFIX)
    # In the status, so that a handled change costs one status write and no annotation write.
    result.persistence.diffbase_storage = StatusDiffBase()
    result.persistence.finalizer = FINALIZER
    # The handlers' per-object log lines at event_level and above become the object's Events,
    # posted by a bounded pool so that a burst of a thousand changes does not flood the API.
    result.posting.enabled = settings.post_events
    result.posting.loggers = settings.post_events
    result.posting.level = settings.event_level_number
    result.posting.worker_limit = settings.event_worker_limit
    # kopf's own worker limit stays unset: with indexes, a limit below the number of objects
    # stalls the start (see OperatorContext.slot, which bounds the reconciles instead).
    result.networking.request_timeout = settings.kube_request_timeout
    result.networking.connect_timeout = 10
    # Bounded watches, so that a connection silently dropped by a proxy is noticed and renewed.
    result.watching.server_timeout = 300
    result.watching.client_timeout = 330
    result.watching.connect_timeout = 30
    result.peering.lifetime = settings.peering_lifetime
    # Keep-alives are routine, so they are not logged. kopf still logs pauses and resumes.
    result.peering.stealth = True
    # CustomResourceDefinitions are installed before the operator starts; no need to watch them.
    result.scanning.disabled = True
    return result


def peering_priority(settings: OperatorSettings) -> int:
    """Return this replica's peering priority: the configured one, else a random one.

    kopf pauses every replica when two of the same priority meet. Replicas of one
    Deployment share their settings, so each draws a priority of its own, and the highest acts.
    """
    if settings.peering_priority is not None:
        return settings.peering_priority
    return secrets.randbelow(1_000_000) + 1


def operator_arguments(settings: OperatorSettings, namespaces: list[str]) -> dict[str, Any]:
    """Return the keyword arguments of ``kopf.run`` / ``kopf.operator`` for these settings."""
    arguments: dict[str, Any] = {
        "registry": build_registry(settings),
        "settings": kopf_settings(settings),
        "memo": kopf.Memo(eventrails=OperatorContext.create(settings)),
        "liveness_endpoint": settings.liveness_endpoint,
    }
    if namespaces:
        arguments["namespaces"] = list(namespaces)
    else:
        arguments["clusterwide"] = True
    if settings.peering_name:
        arguments["peering_name"] = settings.peering_name
        arguments["priority"] = peering_priority(settings)
    else:
        arguments["standalone"] = True
    return arguments


def run_operator(namespaces: list[str]) -> int:
    """Run the operator until SIGINT or SIGTERM; return the process exit code."""
    try:
        settings = OperatorSettings()
    except pydantic.ValidationError as error:
        logger.error("invalid EVENTRAILS_OPERATOR_* settings: %s", error)
        return 2
    if settings.metrics_port:
        prometheus_client.start_http_server(settings.metrics_port, addr=settings.metrics_host)
    arguments = operator_arguments(settings, namespaces)
    logger.info(
        "starting the eventrails operator on %s; default NATS %s; resync every %.0fs; %s; "
        "metrics on %s; up to %s reconciles at once",
        ", ".join(namespaces) if namespaces else "all namespaces",
        ", ".join(settings.default_nats_servers), settings.resync_interval,
        f"peering {settings.peering_name!r} with priority {arguments['priority']}" if settings.peering_name
        else "standalone",
        f"{settings.metrics_host}:{settings.metrics_port}/metrics" if settings.metrics_port else "no port",
        settings.worker_limit or "any number of",
    )
    kopf.run(**arguments)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eventrails_operator", description="Run the eventrails operator.")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace to watch; repeatable; all namespaces when unset")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    return run_operator(arguments.namespace)


if __name__ == "__main__":
    sys.exit(main())
