"""kopf handlers for EventBus, Topic and Consumer: validate, resolve the bus, reconcile, report.

``_reconcile`` does the JetStream work. This module adds the cluster's part: reading
related objects, the worker Deployment, the status subresource, finalizers, retries,
and Kubernetes Events (kopf posts the per-object log lines below as Events).

Outcomes map onto kopf like this:

- the desired state is reached: status Ready=True, the handler returns;
- a temporary failure (NATS unreachable, Topic not applied yet, API hiccup): status
  Ready=False with Reconciling=True, and ``kopf.TemporaryError`` with an exponential delay;
- a permanent failure (invalid spec, a change JetStream cannot apply): status Ready=False
  with Degraded=True, and ``kopf.PermanentError``, so nothing is retried until the spec
  changes; the periodic resync still re-checks it, at the resync interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
import prometheus_client
import pydantic
from nats.js.manager import JetStreamManager

from eventrails import _naming
from eventrails._errors import translate
from eventrails._manifests import ManifestError, parse_resource
from eventrails._resources import GROUP, VERSION, Consumer, EventBus, Topic
from eventrails_operator import _conditions, _desired, _kube, _reconcile
from eventrails_operator._bus import BusPool, describe, server_version
from eventrails_operator._desired import METADATA_PREFIX, BusConnection
from eventrails_operator._jetstream import Change, ReconcileError
from eventrails_operator._settings import OperatorSettings

logger = logging.getLogger("eventrails.operator")

_R = TypeVar("_R", EventBus, Topic, Consumer)

TEMPLATE_DIGEST_ANNOTATION = f"{METADATA_PREFIX}template-digest"
# How long a Consumer's deletion waits between checks for its workers to terminate.
_WORKERS_GONE_POLL = 3.0
# A Consumer whose Topic has no stream yet checks again this often (seconds)...
_STREAM_WAIT = 0.5
# ...and this many times before it fails with StreamNotFound.
_STREAM_WAITS = 10

RECONCILES = prometheus_client.Counter(
    "eventrails_operator_reconciles", "Reconciles by kind, trigger (change, resync) and outcome (ready, retry, failed).",
    ["kind", "trigger", "outcome"],
)
RECONCILE_ERRORS = prometheus_client.Counter(
    "eventrails_operator_reconcile_errors", "Failed reconciles by kind and condition reason.", ["kind", "reason"],
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    "eventrails_operator_reconcile_duration_seconds", "Time one reconcile took, by kind.", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
JETSTREAM_WRITES = prometheus_client.Counter(
    "eventrails_operator_jetstream_writes",
    "JetStream objects created, updated or deleted, by kind (stream, consumer) and action.", ["kind", "action"],
)
KUBE_WRITES = prometheus_client.Counter(
    "eventrails_operator_kube_writes",
    "Worker Deployments and ScaledObjects created, updated or deleted, by kind and action.", ["kind", "action"],
)


@dataclass
class OperatorContext:
    """State shared by every handler: settings, the API adapter and the NATS connections."""

    settings: OperatorSettings
    kube: _kube.KubeApi
    buses: BusPool
    _locks: dict[tuple[str, str, str], asyncio.Lock] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    # Whether KEDA's ScaledObject resource is served, and when that was last asked.
    _keda: tuple[bool, float] | None = None

    @classmethod
    def create(cls, settings: OperatorSettings) -> OperatorContext:
        kube = _kube.KubeApi(
            timeout=settings.kube_request_timeout,
            limiter=_kube.RateLimiter(settings.kube_requests_per_second, settings.kube_burst),
            connection_limit=settings.kube_connection_limit,
        )
        return cls(settings=settings, kube=kube, buses=BusPool(settings, kube))

    async def keda_installed(self) -> bool:
        """Return whether KEDA's ScaledObject resource is served, checking at most every ``keda_check_interval``."""
        if self.settings.keda == "off":
            return False
        now = time.monotonic()
        if self._keda is not None and now - self._keda[1] < self.settings.keda_check_interval:
            return self._keda[0]
        installed = await self.kube.serves(_kube.SCALEDOBJECTS)
        if self._keda is None or self._keda[0] != installed:
            logger.info("KEDA's ScaledObject resource is %s: Consumers with spec.autoscaling %s",
                        "served" if installed else "not served",
                        "get a ScaledObject" if installed else "run their minimum replicas (at least 1)")
        self._keda = (installed, now)
        return installed

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        """Serialize the change handlers and the resync timer of one object."""
        return self._locks.setdefault((kind, namespace, name), asyncio.Lock())

    def slot(self) -> asyncio.Semaphore | contextlib.nullcontext[None]:
        """Bound the reconciles that run at once to ``worker_limit``.

        The bound is here rather than in kopf's own worker limit: kopf's workers wait,
        holding their slots, until its indexes are filled, so a limit below the number of
        objects would stall the operator's start.
        """
        if self.settings.worker_limit is None:
            return contextlib.nullcontext()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.worker_limit)
        return self._slots

    def retry_delay(self, retry: int) -> float:
        return min(self.settings.retry_delay_max, self.settings.retry_delay_min * 2 ** min(retry, 16))


def _context(memo: kopf.Memo) -> OperatorContext:
    context = memo.get("eventrails")
    if not isinstance(context, OperatorContext):
        raise RuntimeError("the operator context is missing from kopf's memo: start the operator with run_operator")
    return context


# --- Activities --------------------------------------------------------------------------------


async def login(memo: kopf.Memo, settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> kopf.ConnectionInfo:
    """Log in once for kopf and for the handlers' own API requests."""
    context = _context(memo)
    connection: kopf.ConnectionInfo | None
    if context.settings.kube_api_server:
        logger.info("using the Kubernetes API at %s without credentials", context.settings.kube_api_server)
        connection = kopf.ConnectionInfo(server=context.settings.kube_api_server)
    else:
        connection = kopf.login_via_client(logger=logger, settings=settings)
    if connection is None:
        raise kopf.LoginError("no Kubernetes credentials: run in a cluster or provide a kubeconfig")
    await context.kube.use(connection)
    return connection


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    context = _context(memo)
    await context.buses.close()
    await context.kube.close()


# --- Shared steps ------------------------------------------------------------------------------


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(body[key]) for key in body}


def _parse(body: Mapping[str, Any], expected: type[_R]) -> _R:
    """Validate the object; an invalid one raises a permanent ReconcileError naming field, value and rule."""
    raw = _plain(body)
    status = raw.pop("status", None)
    try:
        resource = parse_resource(raw, source="cluster")
    except ManifestError as error:
        fields = sorted({problem.split(":", 1)[0] for problem in error.problems if ":" in problem})
        raise ReconcileError(
            "InvalidSpec", "invalid spec: " + "; ".join(error.problems),
            field=", ".join(fields) or None, temporary=False,
        ) from None
    if not isinstance(resource, expected):
        raise ReconcileError("InvalidSpec", f"kind {raw.get('kind')!r} is not {expected.__name__}", temporary=False)
    # The status is read only for the previous conditions; one the models reject is replaced, not fatal.
    if isinstance(status, dict):
        try:
            resource = expected.model_validate({**raw, "status": status})
        except pydantic.ValidationError:
            logger.debug("ignoring the unreadable status of %s %s", expected.__name__, resource.metadata.name)
    return resource


@dataclass
class _Attempt:
    """State one reconcile reached before it failed: the parsed object, when it got that far."""

    resource: Topic | Consumer | EventBus | None = None


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an object the handlers read, without managedFields and status."""
    metadata = body.get("metadata", {})
    kept = ("name", "namespace", "uid", "generation", "labels", "annotations")
    return {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {key: copy.deepcopy(metadata[key]) for key in kept if key in metadata},
        "spec": copy.deepcopy(body.get("spec")),
    }


def eventbus_bodies(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """kopf index of EventBuses by (namespace, name): bus resolution reads it instead of the API server."""
    return {(namespace, name): _slim(body)}


def topic_bodies(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """kopf index of Topics by (namespace, name): Consumers read their Topic from it."""
    return {(namespace, name): _slim(body)}


@dataclass(frozen=True)
class _Known:
    """The EventBuses and Topics kopf keeps in memory from its watches (its indexes).

    kopf fills the indexes from its first listing before any handler runs, so a lookup
    misses only objects that are newer than the last watch event; without the indexes
    (older callers), the handlers read from the API server.
    """

    buses: kopf.Index[tuple[str, str], dict[str, Any]] | None = None
    topics: kopf.Index[tuple[str, str], dict[str, Any]] | None = None

    @staticmethod
    def _first(index: kopf.Index[tuple[str, str], dict[str, Any]], namespace: str, name: str) -> dict[str, Any] | None:
        store = index.get((namespace, name))
        return next(iter(store), None) if store is not None else None

    def bus_lookup(self) -> Callable[[str, str], dict[str, Any] | None] | None:
        buses = self.buses
        return None if buses is None else (lambda namespace, name: self._first(buses, namespace, name))

    async def topic(self, context: OperatorContext, namespace: str, name: str) -> dict[str, Any] | None:
        if self.topics is None:
            return await context.kube.get(_kube.TOPICS, namespace, name)
        return self._first(self.topics, namespace, name)


def _failure_status(body: kopf.Body, resource: Topic | Consumer | EventBus | None, error: ReconcileError) -> dict[str, Any]:
    generation = body.get("metadata", {}).get("generation")
    if isinstance(resource, (Topic, Consumer)):
        status = _reconcile.failed_status(resource, error)
    else:
        # Unparsed objects and EventBuses: the same conditions, built from the raw status.
        previous = list((body.get("status") or {}).get("conditions") or [])
        status = {
            "conditions": _conditions.failed_conditions(
                previous, error.reason, error.message, generation, temporary=error.temporary,
            )
        }
    status["observedGeneration"] = generation
    return status


def _patch_status(body: kopf.Body, patch: kopf.Patch, status: dict[str, Any]) -> bool:
    """Put the status fields that changed into kopf's patch; return False when none did.

    kopf sends the patch once the handler returns, in one request to the status
    subresource together with its diff base (see ``StatusDiffBase``).
    """
    live = body.get("status") or {}
    changed = {key: value for key, value in status.items() if live.get(key) != value}
    for key, value in changed.items():
        patch.status[key] = value
    return bool(changed)


def _count_writes(changes: list[Change]) -> None:
    for change in changes:
        if change.action not in ("unchanged", "absent"):
            JETSTREAM_WRITES.labels(change.kind, change.action).inc()


def _describe_changes(changes: list[Change]) -> str:
    parts = []
    for change in changes:
        text = f"{change.kind} {change.name} {change.action}"
        if change.fields:
            text += f" ({', '.join(change.fields)})"
        parts.append(text)
    return "; ".join(parts)


async def _settle(
    context: OperatorContext, kind: str, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
    retry: int, periodic: bool, reconcile: Callable[[_Attempt], Awaitable[dict[str, Any]]],
) -> None:
    """Run one reconcile, record its status, count it, and turn failures into kopf outcomes."""
    started = time.monotonic()
    trigger = "resync" if periodic else "change"
    attempt = _Attempt()
    try:
        status = await reconcile(attempt)
    except _kube.KubeError as error:
        failure = ReconcileError("KubernetesApiError", str(error), temporary=error.temporary)
    except ReconcileError as error:
        failure = error
    else:
        status["observedGeneration"] = body.get("metadata", {}).get("generation")
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
        _patch_status(body, patch, status)
        RECONCILES.labels(kind, trigger, "ready").inc()
        return

    RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
    RECONCILES.labels(kind, trigger, "retry" if failure.temporary else "failed").inc()
    RECONCILE_ERRORS.labels(kind, failure.reason).inc()
    status_changed = _patch_status(body, patch, _failure_status(body, attempt.resource, failure))

    detail = f"{failure.reason}: {failure.message}"
    if periodic:
        # Warn (and so post an Event) when the resync finds a new problem, not at every interval.
        logger.log(logging.WARNING if status_changed else logging.DEBUG, "resync found the object not ready: %s", detail)
        return
    if failure.temporary:
        delay = context.retry_delay(retry)
        raise kopf.TemporaryError(f"{detail}; retrying in {delay:.0f}s", delay=delay)
    raise kopf.PermanentError(f"{detail}; not retried until the spec changes")


_Reconcile = Callable[[OperatorContext, kopf.Body, logging.Logger, _Attempt, _Known], Awaitable[dict[str, Any]]]


async def _run(
    kind: str, reconcile: _Reconcile, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo,
    logger: logging.Logger, retry: int, known: _Known, *, periodic: bool,
) -> None:
    context = _context(memo)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    async with context.lock(kind, namespace, name), context.slot():
        await _settle(context, kind, body, patch, logger, retry, periodic,
                      lambda attempt: reconcile(context, body, logger, attempt, known))


# --- EventBus ----------------------------------------------------------------------------------


async def _reconcile_event_bus(
    context: OperatorContext, body: kopf.Body, logger: logging.Logger, attempt: _Attempt, known: _Known,
) -> dict[str, Any]:
    bus_resource = attempt.resource = _parse(body, EventBus)
    namespace, name = bus_resource.metadata.namespace, bus_resource.metadata.name
    bus = BusConnection.from_spec(name, bus_resource.spec)
    client = await context.buses.client(namespace, bus)
    version = server_version(client)
    jsm = await context.buses.jetstream(namespace, bus)
    try:
        # A read: proves JetStream is enabled for this account (and domain) without writing.
        await jsm.account_info()
    except Exception as error:  # noqa: BLE001 - translated below
        translated = translate(error, f"read JetStream account info through {describe(bus, namespace)}")
        raise ReconcileError("JetStreamUnavailable", str(translated), temporary=True) from error

    previous = [condition.model_dump(by_alias=True, exclude_none=True)
                for condition in (bus_resource.status.conditions if bus_resource.status else [])]
    message = f"connected to nats-server {version} with JetStream"
    status = {
        "serverVersion": version,
        "conditions": _conditions.ready_conditions(previous, message, bus_resource.metadata.generation),
    }
    if bus_resource.status is None or bus_resource.status.server_version != version:
        logger.info("EventBus %s/%s is ready: %s", namespace, name, message)
    return status


async def event_bus_changed(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, retry: int, **_: Any,
) -> None:
    await _run("EventBus", _reconcile_event_bus, body, patch, memo, logger, retry, _Known(), periodic=False)


async def event_bus_resync(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any,
) -> None:
    await _run("EventBus", _reconcile_event_bus, body, patch, memo, logger, 0, _Known(), periodic=True)


async def event_bus_deleted(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    context = _context(memo)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    await context.buses.forget(namespace, name)
    logger.info("EventBus %s/%s deleted; closed its NATS connection", namespace, name)


# --- Topic -------------------------------------------------------------------------------------


async def _topic_jetstream(context: OperatorContext, topic: Topic, known: _Known) -> tuple[BusConnection, JetStreamManager]:
    bus = await context.buses.resolve(topic.metadata.namespace, topic.spec.bus, known.bus_lookup())
    return bus, await context.buses.jetstream(topic.metadata.namespace, bus)


async def _reconcile_topic(
    context: OperatorContext, body: kopf.Body, logger: logging.Logger, attempt: _Attempt, known: _Known,
) -> dict[str, Any]:
    topic = attempt.resource = _parse(body, Topic)
    bus, jsm = await _topic_jetstream(context, topic, known)
    result = await _reconcile.reconcile_topic(jsm, topic, bus)
    _count_writes(result.writes)
    if result.writes:
        logger.info("Topic reconciled on %s: %s", describe(bus, topic.metadata.namespace), _describe_changes(result.writes))
    else:
        logger.debug("Topic streams are in sync; nothing sent to JetStream")
    if result.error is not None:
        raise result.error
    return result.status


async def topic_changed(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, retry: int,
    eventbus_bodies: kopf.Index[Any, Any] | None = None, **_: Any,
) -> None:
    await _run("Topic", _reconcile_topic, body, patch, memo, logger, retry, _Known(eventbus_bodies),
               periodic=False)


async def topic_resync(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
    eventbus_bodies: kopf.Index[Any, Any] | None = None, **_: Any,
) -> None:
    await _run("Topic", _reconcile_topic, body, patch, memo, logger, 0, _Known(eventbus_bodies), periodic=True)


async def topic_deleted(
    body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int,
    eventbus_bodies: kopf.Index[Any, Any] | None = None, **_: Any,
) -> None:
    """Delete the streams when ``deletionPolicy`` is Delete; any failure keeps the finalizer."""
    context = _context(memo)
    try:
        topic = _parse(body, Topic)
    except ReconcileError as error:
        logger.warning("Topic deleted with an unreadable spec (%s); its streams, if any, are kept", error.message)
        return
    stream = _naming.stream_name(topic.metadata.namespace, topic.metadata.name)
    if topic.spec.deletion_policy != "Delete":
        logger.info("Topic deleted with deletionPolicy Retain: stream %s and its dead letters are kept", stream)
        return
    try:
        _, jsm = await _topic_jetstream(context, topic, _Known(eventbus_bodies))
        changes = await _reconcile.delete_topic(jsm, topic)
        _count_writes(changes)
    except (ReconcileError, _kube.KubeError) as error:
        delay = context.retry_delay(retry)
        raise kopf.TemporaryError(f"could not delete stream {stream}: {error}; retrying in {delay:.0f}s", delay=delay) from error
    logger.info("Topic deleted with deletionPolicy Delete: %s", _describe_changes(changes))


# --- Consumer ----------------------------------------------------------------------------------


def _contains(live: Any, desired: Any) -> bool:
    """Return whether ``live`` contains every value of ``desired`` (server defaults may add more)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(key in live and _contains(live[key], value) for key, value in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(_contains, live, desired))
    return bool(live == desired)


def _deployment_patch(live: dict[str, Any], desired: dict[str, Any], manage_replicas: bool) -> list[dict[str, Any]]:
    """Return the JSON patch that makes the live Deployment match the desired one.

    The pod template is replaced whole, so keys removed from the Consumer's template
    overlay disappear too; labels, annotations and owner references set by others stay.
    """
    live_meta, desired_meta = live.get("metadata", {}), desired["metadata"]
    owners = [ref for ref in live_meta.get("ownerReferences", [])
              if ref.get("uid") not in {item["uid"] for item in desired_meta["ownerReferences"]}]
    operations = [
        {"op": "add", "path": "/metadata/labels", "value": {**live_meta.get("labels", {}), **desired_meta["labels"]}},
        {"op": "add", "path": "/metadata/annotations",
         "value": {**live_meta.get("annotations", {}), **desired_meta["annotations"]}},
        {"op": "add", "path": "/metadata/ownerReferences", "value": owners + desired_meta["ownerReferences"]},
        {"op": "add", "path": "/spec/template", "value": desired["spec"]["template"]},
    ]
    if manage_replicas:
        operations.append({"op": "add", "path": "/spec/replicas", "value": desired["spec"]["replicas"]})
    return operations


def _owned_by(deployment: dict[str, Any], uid: str | None) -> bool:
    return any(ref.get("uid") == uid for ref in deployment.get("metadata", {}).get("ownerReferences", []))


def _digest(desired: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Workers:
    """Shape of the Consumer's worker Deployment (and its scaler) after a reconcile."""

    replicas: int | None
    scaling: str


async def _ensure_deployment(
    context: OperatorContext, body: kopf.Body, consumer: Consumer, topic: Topic, bus: BusConnection,
    logger: logging.Logger, *, manage_replicas: bool,
) -> int | None:
    """Create or patch the worker Deployment; return its replica count.

    With ``manage_replicas`` false a scaler (KEDA) owns the count after creation, so a
    difference there is left alone.
    """
    desired = _desired.worker_deployment(consumer, topic, bus, context.settings.worker_image)
    kopf.append_owner_reference(desired, owner=body, controller=True, block_owner_deletion=True)
    desired["metadata"]["annotations"] = {TEMPLATE_DIGEST_ANNOTATION: _digest(desired)}
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]

    live = await context.kube.get(_kube.DEPLOYMENTS, namespace, name)
    if live is None:
        try:
            await context.kube.create(_kube.DEPLOYMENTS, namespace, desired)
        except _kube.KubeInvalid as error:
            raise ReconcileError("DeploymentRejected", f"spec.template: worker Deployment {name} was rejected: {error}",
                                 field="spec.template", temporary=False) from error
        KUBE_WRITES.labels("Deployment", "created").inc()
        logger.info("created worker Deployment %s running `eventrails worker %s` with %d replicas",
                    name, consumer.spec.handler, desired["spec"]["replicas"])
        return int(desired["spec"]["replicas"])

    if not _owned_by(live, consumer.metadata.uid):
        raise ReconcileError(
            "DeploymentConflict",
            f"Deployment {namespace}/{name} exists but does not belong to this Consumer; "
            "delete or rename it so the operator can create the workers",
            temporary=True,
        )
    live_replicas = live.get("spec", {}).get("replicas")
    in_sync = (
        live.get("metadata", {}).get("annotations", {}).get(TEMPLATE_DIGEST_ANNOTATION)
        == desired["metadata"]["annotations"][TEMPLATE_DIGEST_ANNOTATION]
        and _contains(live.get("metadata", {}).get("labels", {}), desired["metadata"]["labels"])
        and _contains(live.get("spec", {}).get("template"), desired["spec"]["template"])
        and (not manage_replicas or live_replicas == desired["spec"]["replicas"])
    )
    if in_sync:
        return int(live_replicas) if live_replicas is not None else None
    try:
        await context.kube.json_patch(_kube.DEPLOYMENTS, namespace, name, _deployment_patch(live, desired, manage_replicas))
    except _kube.KubeInvalid as error:
        raise ReconcileError("DeploymentRejected", f"spec.template: worker Deployment {name} was rejected: {error}",
                             field="spec.template", temporary=False) from error
    KUBE_WRITES.labels("Deployment", "updated").inc()
    logger.info("updated worker Deployment %s to match the Consumer", name)
    return int(desired["spec"]["replicas"]) if manage_replicas else live_replicas


async def _ensure_scaled_object(
    context: OperatorContext, body: kopf.Body, consumer: Consumer, bus: BusConnection, logger: logging.Logger,
) -> None:
    """Create or patch the KEDA ScaledObject of a Consumer with ``spec.autoscaling``."""
    desired = _desired.scaled_object(consumer, bus, monitoring_port=context.settings.nats_monitoring_port)
    kopf.append_owner_reference(desired, owner=body, controller=True, block_owner_deletion=True)
    desired["metadata"]["annotations"] = {TEMPLATE_DIGEST_ANNOTATION: _digest(desired)}
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]

    live = await context.kube.get(_kube.SCALEDOBJECTS, namespace, name)
    if live is None:
        try:
            await context.kube.create(_kube.SCALEDOBJECTS, namespace, desired)
        except _kube.KubeInvalid as error:
            raise ReconcileError("ScaledObjectRejected", f"spec.autoscaling: ScaledObject {name} was rejected: {error}",
                                 field="spec.autoscaling", temporary=False) from error
        KUBE_WRITES.labels("ScaledObject", "created").inc()
        trigger = desired["spec"]["triggers"][0]["metadata"]
        logger.info("created KEDA ScaledObject %s: %d to %d workers, one more per %s pending messages of consumer %s",
                    name, desired["spec"]["minReplicaCount"], desired["spec"]["maxReplicaCount"],
                    trigger["lagThreshold"], trigger["consumer"])
        return
    if not _owned_by(live, consumer.metadata.uid):
        raise ReconcileError(
            "ScaledObjectConflict",
            f"ScaledObject {namespace}/{name} exists but does not belong to this Consumer; "
            "delete it so the operator can scale the workers",
            temporary=True,
        )
    digest = desired["metadata"]["annotations"][TEMPLATE_DIGEST_ANNOTATION]
    if (live.get("metadata", {}).get("annotations", {}).get(TEMPLATE_DIGEST_ANNOTATION) == digest
            and _contains(live.get("spec"), desired["spec"])):
        return
    live_annotations = live.get("metadata", {}).get("annotations", {})
    operations = [
        {"op": "add", "path": "/metadata/annotations", "value": {**live_annotations, **desired["metadata"]["annotations"]}},
        {"op": "add", "path": "/spec", "value": desired["spec"]},
    ]
    try:
        await context.kube.json_patch(_kube.SCALEDOBJECTS, namespace, name, operations)
    except _kube.KubeInvalid as error:
        raise ReconcileError("ScaledObjectRejected", f"spec.autoscaling: ScaledObject {name} was rejected: {error}",
                             field="spec.autoscaling", temporary=False) from error
    KUBE_WRITES.labels("ScaledObject", "updated").inc()
    logger.info("updated KEDA ScaledObject %s to match spec.autoscaling", name)


async def _remove_scaled_object(context: OperatorContext, namespace: str, name: str, uid: str | None,
                                logger: logging.Logger) -> None:
    """Delete the ScaledObject this Consumer owns, if there is one."""
    scaled = _naming.deployment_name(name)
    live = await context.kube.get(_kube.SCALEDOBJECTS, namespace, scaled)
    if live is None or not _owned_by(live, uid) or live.get("metadata", {}).get("deletionTimestamp"):
        return
    if await context.kube.delete(_kube.SCALEDOBJECTS, namespace, scaled, propagation="Background"):
        KUBE_WRITES.labels("ScaledObject", "deleted").inc()
        logger.info("deleted KEDA ScaledObject %s; the operator sets the worker replicas again", scaled)


async def _ensure_workers(
    context: OperatorContext, body: kopf.Body, consumer: Consumer, topic: Topic, bus: BusConnection,
    logger: logging.Logger,
) -> _Workers:
    """Bring the worker Deployment and its KEDA ScaledObject (when asked for and possible) in line."""
    autoscaling = consumer.spec.autoscaling
    keda = await context.keda_installed()
    scaled = autoscaling is not None and keda
    replicas = await _ensure_deployment(context, body, consumer, topic, bus, logger, manage_replicas=not scaled)
    deployment = _naming.deployment_name(consumer.metadata.name)
    if scaled:
        assert autoscaling is not None
        await _ensure_scaled_object(context, body, consumer, bus, logger)
        return _Workers(replicas, f"KEDA ScaledObject {deployment} scales the workers from {autoscaling.min_replicas} "
                                  f"to {autoscaling.max_replicas} at {autoscaling.lag_target} pending messages per pod")
    if keda:
        await _remove_scaled_object(context, consumer.metadata.namespace, consumer.metadata.name,
                                    consumer.metadata.uid, logger)
    if autoscaling is not None:
        return _Workers(replicas, f"KEDA is not installed, so {replicas} fixed worker replica(s) run "
                                  "(spec.autoscaling.minReplicas, at least 1)")
    return _Workers(replicas, f"{replicas} worker replica(s)")


async def _read_topic(context: OperatorContext, namespace: str, name: str, known: _Known) -> Topic | None:
    body = await known.topic(context, namespace, name)
    if body is None:
        return None
    try:
        return _parse(body, Topic)
    except ReconcileError as error:
        raise ReconcileError(
            "TopicInvalid", f"spec.topic: Topic {name!r} is not usable ({error.message}); fix the Topic",
            field="spec.topic", temporary=True,
        ) from None


async def _reconcile_consumer(
    context: OperatorContext, body: kopf.Body, logger: logging.Logger, attempt: _Attempt, known: _Known,
) -> dict[str, Any]:
    consumer = attempt.resource = _parse(body, Consumer)
    namespace = consumer.metadata.namespace
    topic = await _read_topic(context, namespace, consumer.spec.topic, known)
    if topic is None:
        raise ReconcileError(
            "TopicNotFound",
            f"spec.topic: Topic {consumer.spec.topic!r} not found in namespace {namespace!r}; "
            "apply the Topic or fix spec.topic",
            field="spec.topic", temporary=True,
        )
    bus, jsm = await _topic_jetstream(context, topic, known)
    result = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)
    # A Consumer applied together with its Topic often arrives before the Topic's stream
    # exists. Give the Topic's reconcile a moment, so the Consumer does not fail and retry.
    for _ in range(_STREAM_WAITS):
        if result.error is None or result.error.reason != "StreamNotFound":
            break
        logger.debug("stream %s of Topic %s not found; checking again in %.1fs",
                     _naming.stream_name(namespace, topic.metadata.name), topic.metadata.name, _STREAM_WAIT)
        await asyncio.sleep(_STREAM_WAIT)
        result = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)
    _count_writes(result.writes)
    if result.writes:
        logger.info("Consumer reconciled on %s: %s", describe(bus, namespace), _describe_changes(result.writes))
    if result.error is not None:
        raise result.error

    # Workers (and their scaler, which reads the consumer's lag) start only after their
    # durable consumer exists.
    workers = await _ensure_workers(context, body, consumer, topic, bus, logger)
    status = {**result.status, "deployment": _naming.deployment_name(consumer.metadata.name)}
    if workers.replicas is not None:
        status["replicas"] = workers.replicas
    status["conditions"] = [
        {**condition, "message": f"{condition['message']}; {workers.scaling}"} if condition["type"] == "Ready" else condition
        for condition in status["conditions"]
    ]
    return status


async def consumer_changed(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, retry: int,
    eventbus_bodies: kopf.Index[Any, Any] | None = None, topic_bodies: kopf.Index[Any, Any] | None = None, **_: Any,
) -> None:
    await _run("Consumer", _reconcile_consumer, body, patch, memo, logger, retry,
               _Known(eventbus_bodies, topic_bodies), periodic=False)


async def consumer_resync(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
    eventbus_bodies: kopf.Index[Any, Any] | None = None, topic_bodies: kopf.Index[Any, Any] | None = None, **_: Any,
) -> None:
    await _run("Consumer", _reconcile_consumer, body, patch, memo, logger, 0,
               _Known(eventbus_bodies, topic_bodies), periodic=True)


async def consumer_deleted(
    body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int,
    eventbus_bodies: kopf.Index[Any, Any] | None = None, topic_bodies: kopf.Index[Any, Any] | None = None, **_: Any,
) -> None:
    """Remove the workers, wait until they are gone, then delete the JetStream consumer."""
    context = _context(memo)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    deployment = _naming.deployment_name(name)
    try:
        # The scaler goes first, so that it does not act on workers being removed.
        if await context.keda_installed():
            await _remove_scaled_object(context, namespace, name, body["metadata"].get("uid"), logger)
        live = await context.kube.get(_kube.DEPLOYMENTS, namespace, deployment)
        if live is not None and _owned_by(live, body["metadata"].get("uid")):
            if not live.get("metadata", {}).get("deletionTimestamp"):
                await context.kube.delete(_kube.DEPLOYMENTS, namespace, deployment, propagation="Foreground")
                KUBE_WRITES.labels("Deployment", "deleted").inc()
                logger.info("deleted worker Deployment %s; the JetStream consumer goes once its pods are gone", deployment)
            if await context.kube.get(_kube.DEPLOYMENTS, namespace, deployment) is not None:
                raise kopf.TemporaryError(f"waiting for the pods of worker Deployment {deployment} to terminate",
                                          delay=_WORKERS_GONE_POLL)
    except _kube.KubeError as error:
        delay = context.retry_delay(retry)
        raise kopf.TemporaryError(f"could not delete worker Deployment {deployment}: {error}; retrying in {delay:.0f}s",
                                  delay=delay) from error

    try:
        consumer = _parse(body, Consumer)
    except ReconcileError as error:
        logger.warning("Consumer deleted with an unreadable spec (%s); its JetStream consumer, if any, is kept",
                       error.message)
        return
    stream = _naming.stream_name(namespace, consumer.spec.topic)
    try:
        known = _Known(eventbus_bodies, topic_bodies)
        topic = await _read_topic(context, namespace, consumer.spec.topic, known)
        # TODO: remember the bus of a Consumer, so that deleting it after its Topic still finds a named EventBus.
        bus = await context.buses.resolve(namespace, topic.spec.bus if topic is not None else None, known.bus_lookup())
        jsm = await context.buses.jetstream(namespace, bus)
        change = await _reconcile.delete_consumer(jsm, consumer)
        _count_writes([change])
    except (ReconcileError, _kube.KubeError) as error:
        delay = context.retry_delay(retry)
        raise kopf.TemporaryError(f"could not delete consumer {name} on stream {stream}: {error}; "
                                  f"retrying in {delay:.0f}s", delay=delay) from error
    logger.info("Consumer deleted: %s on stream %s", _describe_changes([change]), stream)


_ROUTINE = re.compile(r"^(Handler|Timer) '[^']+' succeeded\.$|^\w+ is processed: \d+ succeeded; 0 failed\.$")
_RESYNC_SUCCEEDED = re.compile(r"^Timer '\w+_resync' succeeded\.$")


class _QuietRoutine(logging.Filter):
    """Keep kopf's routine success lines out of Kubernetes Events, and resync successes out of the log.

    "Handler 'topic_changed' succeeded." and "Creation is processed: 1 succeeded; 0 failed."
    would post two Events per change next to the handler's own line that says what
    changed; "Timer 'topic_resync' succeeded." would post one per object at every resync
    interval, and a thousand log lines a minute. The resync's own lines still become
    Events when it repairs something or finds a new problem, and failures stay as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        if _RESYNC_SUCCEEDED.match(message) and not logger.isEnabledFor(logging.DEBUG):
            return False
        if _ROUTINE.match(message):
            record.k8s_skip = True
        return True


def quiet_routine_events() -> None:
    """Install the filter on kopf's per-object logger, once per process."""
    objects_logger = logging.getLogger("kopf.objects")
    if not any(isinstance(item, _QuietRoutine) for item in objects_logger.filters):
        objects_logger.addFilter(_QuietRoutine())


# --- Registration ------------------------------------------------------------------------------


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """Register every handler in a registry of its own, with the resync interval from settings."""
    quiet_routine_events()
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.index(GROUP, VERSION, "eventbuses", registry=registry)(eventbus_bodies)
    kopf.index(GROUP, VERSION, "topics", registry=registry)(topic_bodies)

    interval = settings.resync_interval
    kinds: list[tuple[str, Any, Any, Any, bool]] = [
        ("eventbuses", event_bus_changed, event_bus_resync, event_bus_deleted, True),
        ("topics", topic_changed, topic_resync, topic_deleted, False),
        ("consumers", consumer_changed, consumer_resync, consumer_deleted, False),
    ]
    for plural, changed, resync, deleted, optional_finalizer in kinds:
        for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
            decorator(GROUP, VERSION, plural, registry=registry)(changed)
        kopf.on.delete(GROUP, VERSION, plural, registry=registry, optional=optional_finalizer)(deleted)
        kopf.timer(GROUP, VERSION, plural, registry=registry, interval=interval, idle=interval,
                   initial_delay=interval)(resync)
    return registry
