"""The kopf operator end to end against an emulated Kubernetes API (kmock) and a real nats-server.

The operator runs in its own thread and event loop, as in production, through the same
``operator_arguments`` that ``run_operator`` uses; only kopf's timeouts are shortened.

NOTE: kmock does not run CRD schemas: no OpenAPI or CEL validation, no defaulting, no
pruning. ``EmulatedApi`` below adds what the operator relies on and kmock leaves out
(uid, resourceVersion, generation, names from generateName, and the split between the
main resource and its status subresource), so the operator's own validation is what
rejects bad input here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import kmock
import kopf
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client

from eventrails._natsserver import NatsServer
from eventrails._settings import WorkerSettings
from eventrails_operator.__main__ import operator_arguments
from eventrails_operator._settings import OperatorSettings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    # kmock 0.8 loads its bundled resource list with a deprecated importlib call.
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

NAMESPACE = "shop"
API = "eventrails.dev/v1alpha1"
TOPICS = "eventrails.dev/v1alpha1/topics"
CONSUMERS = "eventrails.dev/v1alpha1/consumers"
EVENTBUSES = "eventrails.dev/v1alpha1/eventbuses"
DEPLOYMENTS = "apps/v1/deployments"
WAIT = 20.0


@attrs.define(kw_only=True)
class EmulatedApi(kmock.KubernetesEmulator):
    """kmock's emulator plus the object bookkeeping a real API server does.

    - creation assigns uid, resourceVersion, generation, creationTimestamp, and a name
      from ``generateName`` (kopf posts Events that way);
    - every change bumps resourceVersion, and a change to ``spec`` bumps generation;
    - a patch of the main resource cannot change ``status``, and a patch of the
      ``status`` subresource can change nothing else.
    """

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            metadata = request.data.setdefault("metadata", {})
            if not metadata.get("name") and metadata.get("generateName"):
                metadata["name"] = f"{metadata['generateName']}{uuid.uuid4().hex[:6]}"
            metadata.setdefault("namespace", request.namespace)
            metadata["uid"] = str(uuid.uuid4())
            metadata["resourceVersion"] = str(next(self._versions))
            metadata["creationTimestamp"] = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if "spec" in request.data:
                metadata["generation"] = 1
        elif request.resource is not None and request.action == kmock.action.UPDATE:
            self._bookkeep_patch(request)
        return await super()._handle(request)

    def _bookkeep_patch(self, request: kmock.Request) -> None:
        version = str(next(self._versions))
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
        generation = int(current.get("metadata", {}).get("generation", 0))
        status_only = request.subresource == "status"
        if isinstance(request.data, dict):
            for field in list(request.data):
                if (field != "status") if status_only else (field == "status"):
                    request.data.pop(field)
            metadata = request.data.setdefault("metadata", {})
            metadata["resourceVersion"] = version
            if "spec" in request.data:
                metadata["generation"] = generation + 1
        elif isinstance(request.data, list):
            kept = [op for op in request.data if op.get("path", "").startswith("/status") == status_only]
            request.data[:] = kept
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            if any(op.get("path", "").startswith("/spec") for op in kept):
                request.data.append({"op": "add", "path": "/metadata/generation", "value": generation + 1})


def serve_resources(api: EmulatedApi) -> None:
    api.resources.load_bundled()
    for plural, kind in (("eventbuses", "EventBus"), ("topics", "Topic"), ("consumers", "Consumer")):
        api.resources[f"eventrails.dev/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, subresources={"status"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )


def live(api: EmulatedApi, resource: str, name: str) -> dict[str, Any] | None:
    # kmock's `in` compares keys as stored, so the resource must be parsed first.
    key = (kmock.resource(resource), NAMESPACE, name)
    if key not in api.objects or api.objects[key].deleted:
        return None
    return copy.deepcopy(api.objects[key].raw)


def condition(body: dict[str, Any] | None, type_: str = "Ready") -> dict[str, Any]:
    for item in ((body or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == type_:
            return dict(item)
    return {}


async def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


async def apply(api: EmulatedApi, resource: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": API, "kind": kind, "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
    response = await api.post(f"/apis/{resource.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/{resource.rsplit('/', 1)[1]}",
                              json=body)
    assert response.status in (200, 201), await response.text()


async def delete(api: EmulatedApi, resource: str, name: str) -> None:
    response = await api.delete(f"/apis/{resource.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/{resource.rsplit('/', 1)[1]}/{name}")
    assert response.status == 200, await response.text()


def requests_to(api: EmulatedApi, resource: str, name: str, method: str, subresource: str | None = None) -> list[Any]:
    group_version, plural = resource.rsplit("/", 1)
    return [
        request for request in list(api)
        if request.resource is not None and request.resource.plural == plural
        and f"{request.resource.group}/{request.resource.version}".lstrip("/") == group_version
        and request.name == name and str(request.method.value) == method and request.subresource == subresource
    ]


def watching(api: EmulatedApi) -> bool:
    """Whether the operator has opened its watch streams on all three kinds."""
    watched = {request.resource.plural for request in list(api)
               if request.resource is not None and request.action == kmock.action.WATCH}
    return {"eventbuses", "topics", "consumers"} <= watched


def writes_spec(patch: Any) -> bool:
    """Whether a merge patch (a dict) or a JSON patch (a list of operations) touches ``spec``."""
    if isinstance(patch, dict):
        return "spec" in patch
    return any(str(operation.get("path", "")).startswith("/spec") for operation in patch or [])


@contextlib.asynccontextmanager
async def running_operator(api: EmulatedApi, settings: OperatorSettings) -> AsyncIterator[None]:
    """Run the operator in a thread with its own loop, as ``run_operator`` would, until the block ends."""
    arguments = operator_arguments(settings, [NAMESPACE])
    quick: kopf.OperatorSettings = arguments["settings"]
    quick.watching.connect_timeout = 2
    quick.watching.server_timeout = None
    quick.watching.client_timeout = None
    quick.persistence.consistency_timeout = 1
    quick.process.ultimate_exiting_timeout = None
    quick.background.instant_exit_timeout = 0.5
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def target() -> None:
        try:
            kopf.run(**arguments, stop_flag=stop, ready_flag=ready)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(error)

    thread = threading.Thread(target=target, name="operator", daemon=True)
    thread.start()
    try:
        await eventually(lambda: ready.is_set() or failures, "the operator to start")
        if failures:
            raise failures[0]
        # kmock's watch replays every existing object even after a listing, so objects applied
        # between kopf's listing and its watch would arrive twice; apply them once it watches.
        await eventually(lambda: watching(api) or failures, "the operator to watch its resources")
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the operator did not stop within 30s"
    if failures:
        raise failures[0]


@pytest.fixture()
async def api() -> AsyncIterator[EmulatedApi]:
    async with EmulatedApi() as handler, kmock.Server(handler):
        serve_resources(handler)
        yield handler
        # Failures inside the emulator (not API errors it answers on purpose) fail the test.
        assert [error for error in handler.errors if not isinstance(error, kmock.KubernetesError)] == []


@pytest.fixture()
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url, connect_timeout=5)
    yield client
    await client.close()


def operator_settings(api: EmulatedApi, nats_server: NatsServer, **overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "kube_api_server": str(api.url).rstrip("/"),
        "default_nats_servers": [nats_server.url],
        "worker_image": "registry.example/shop-worker:1.0",
        "retry_delay_min": 0.3,
        "retry_delay_max": 1.0,
        "liveness_endpoint": None,
        "metrics_port": 0,
        **overrides,
    }
    return OperatorSettings(**values)


async def stream_names(nc: Client) -> list[str]:
    return sorted(info.config.name or "" for info in await nc.jsm(timeout=5).streams_info())


async def test_topic_and_consumer_become_streams_consumer_and_workers(
    api: EmulatedApi, nats_server: NatsServer, nc: Client, caplog: pytest.LogCaptureFixture,
) -> None:
    # kopf posts the per-object log lines that pass the logger's level, as `eventrails operator` does at info.
    caplog.set_level(logging.INFO, logger="kopf.objects")
    jsm = nc.jsm(timeout=5)
    # The operator's own default points nowhere: everything must come from the EventBus.
    settings = operator_settings(api, nats_server, resync_interval=1.0, default_nats_servers=["nats://127.0.0.1:9"])
    async with running_operator(api, settings):
        await apply(api, EVENTBUSES, "EventBus", "default", {"servers": [nats_server.url], "subjectPrefix": "acme"})
        await apply(api, TOPICS, "Topic", "orders", {"tasks": ["send-email", "charge-card"], "deletionPolicy": "Delete"})
        await apply(api, CONSUMERS, "Consumer", "mailer", {
            "topic": "orders", "handler": "shop.workers:worker", "names": ["send-email"], "replicas": 2,
            "template": {"env": [{"name": "APP_MODE", "value": "batch"}]},
        })

        bus = await eventually(lambda: condition(live(api, EVENTBUSES, "default")).get("status") == "True"
                               and live(api, EVENTBUSES, "default"), "EventBus default to be Ready")
        assert bus["status"]["serverVersion"].startswith("2.")
        topic = await eventually(lambda: condition(live(api, TOPICS, "orders")).get("status") == "True"
                                 and live(api, TOPICS, "orders"), "Topic orders to be Ready")
        consumer = await eventually(lambda: condition(live(api, CONSUMERS, "mailer")).get("status") == "True"
                                    and live(api, CONSUMERS, "mailer"), "Consumer mailer to be Ready")

        # JetStream has the stream, its dead-letter companion and the durable consumer.
        assert await stream_names(nc) == ["shop_orders", "shop_orders_dlq"]
        info = await jsm.consumer_info("shop_orders", "mailer")
        assert info.config.filter_subject == "acme.shop.orders.send-email"
        assert topic["status"]["stream"] == "shop_orders"
        assert topic["status"]["deadLetterStream"] == "shop_orders_dlq"
        assert topic["status"]["observedGeneration"] == 1
        assert consumer["status"]["consumer"] == "mailer"
        assert consumer["status"]["deployment"] == "mailer-worker"

        # The worker Deployment runs the handler with the runtime's env, probes and hardening.
        deployment = live(api, DEPLOYMENTS, "mailer-worker")
        assert deployment is not None
        assert deployment["spec"]["replicas"] == 2
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["eventrails", "worker", "shop.workers:worker"]
        assert container["image"] == "registry.example/shop-worker:1.0"
        env = {item["name"]: item.get("value") for item in container["env"]}
        expected = WorkerSettings(
            nats_servers=[nats_server.url], subject_prefix="acme", namespace=NAMESPACE, handler="shop.workers:worker",
            topic="orders", consumer="mailer", health_port=8080,
        ).to_env()
        assert {key: env[key] for key in expected} == expected
        assert env["APP_MODE"] == "batch"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        owner = deployment["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Consumer", "mailer", consumer["metadata"]["uid"])
        assert owner["controller"] is True

        # Let the resync timer run a few times: in sync, it patches nothing.
        deployment_patches = len(requests_to(api, DEPLOYMENTS, "mailer-worker", "PATCH"))
        await eventually(lambda: len(requests_to(api, DEPLOYMENTS, "mailer-worker", "GET")) >= 4,
                         "the resync timer to re-read the worker Deployment")
        assert len(requests_to(api, DEPLOYMENTS, "mailer-worker", "PATCH")) == deployment_patches == 0

        # Drift: a consumer removed out of band comes back on the next resync.
        await jsm.delete_consumer("shop_orders", "mailer")

        async def consumer_is_back() -> bool:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                return bool(await jsm.consumer_info("shop_orders", "mailer"))
            return False

        await eventually(consumer_is_back, "the resync to recreate the deleted JetStream consumer")

        # A spec change updates the JetStream consumer and patches the Deployment.
        response = await api.patch(f"/apis/eventrails.dev/v1alpha1/namespaces/{NAMESPACE}/consumers/mailer",
                                   json={"spec": {"replicas": 3, "ackWait": "45s"}},
                                   headers={"Content-Type": "application/merge-patch+json"})
        assert response.status == 200
        await eventually(lambda: (live(api, DEPLOYMENTS, "mailer-worker") or {}).get("spec", {}).get("replicas") == 3,
                         "the worker Deployment to scale to 3 replicas")
        assert (await jsm.consumer_info("shop_orders", "mailer")).config.ack_wait == 45.0
        patched = live(api, DEPLOYMENTS, "mailer-worker")
        assert patched is not None
        patched_env = {item["name"]: item.get("value") for item in patched["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert patched_env["EVENTRAILS_ACK_WAIT"] == "45.0"
        await eventually(lambda: condition(live(api, CONSUMERS, "mailer")).get("observedGeneration") == 2,
                         "the Consumer's Ready condition to observe generation 2")

        # The operator wrote status through the status subresource only, and never wrote a spec.
        assert requests_to(api, TOPICS, "orders", "PATCH", "status")
        for resource, name in ((TOPICS, "orders"), (CONSUMERS, "mailer")):
            for request in requests_to(api, resource, name, "PATCH"):
                if not request.headers.get("User-Agent", "").startswith("kmock/"):  # not the test's own patch
                    assert not writes_spec(request.data), request.data
        # kopf's diff base is in the status, not in an annotation.
        handled = live(api, TOPICS, "orders")
        assert handled is not None
        assert json.loads(handled["status"]["lastHandledConfiguration"])["spec"]["deletionPolicy"] == "Delete"
        assert "eventrails.dev/last-handled-configuration" not in handled["metadata"].get("annotations", {})

        # The handlers' log lines reached the Topic as Kubernetes Events.
        messages = [event["message"] for (resource, _, _), event in list(api.objects.items())
                    if resource.plural == "events" and not event.deleted
                    and event["involvedObject"]["name"] == "orders"]
        assert any("stream shop_orders created" in message for message in messages), messages
        # ...but not the routine successes of every resync.
        assert not any("topic_resync" in message for message in messages), messages

        # Deleting the Consumer removes its workers, then its JetStream consumer.
        await delete(api, CONSUMERS, "mailer")
        await eventually(lambda: live(api, CONSUMERS, "mailer") is None, "the Consumer's finalizer to be released")
        assert live(api, DEPLOYMENTS, "mailer-worker") is None
        assert [item.name for item in await jsm.consumers_info("shop_orders")] == []

        # Deleting the Topic with deletionPolicy Delete removes both streams.
        await delete(api, TOPICS, "orders")
        await eventually(lambda: live(api, TOPICS, "orders") is None, "the Topic's finalizer to be released")
        assert await stream_names(nc) == []


def operator_patches(api: EmulatedApi, resource: str, name: str, subresource: str | None = None) -> list[Any]:
    return [request.data for request in requests_to(api, resource, name, "PATCH", subresource)
            if not request.headers.get("User-Agent", "").startswith("kmock/")]


async def test_new_topic_writes_finalizer_then_status(
    api: EmulatedApi, nats_server: NatsServer,
) -> None:
    settings = operator_settings(api, nats_server, post_events=False)
    async with running_operator(api, settings):
        await apply(api, TOPICS, "Topic", "orders", {"tasks": ["send-email"]})
        await eventually(lambda: condition(live(api, TOPICS, "orders")).get("status") == "True",
                         "Topic orders to be Ready")
        # Give a stray write time to show up; the resync interval is far longer.
        await asyncio.sleep(1.5)

    # kopf adds its finalizer with a JSON patch (the emulator appends the resourceVersion).
    [finalizer] = operator_patches(api, TOPICS, "orders")
    assert {operation["path"] for operation in finalizer if operation["op"] != "test"} == {
        "/metadata/finalizers", "/metadata/resourceVersion"}
    [status] = operator_patches(api, TOPICS, "orders", "status")
    assert {"conditions", "observedGeneration", "stream", "lastHandledConfiguration"} <= set(status["status"])
    assert json.loads(status["status"]["lastHandledConfiguration"]) == {"spec": {"tasks": ["send-email"]}}


async def test_diff_base_moves_from_annotation_to_status(
    api: EmulatedApi, nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kopf.objects")
    # As an older operator left it: its diff base in an annotation, and the spec changed since.
    body = {
        "apiVersion": API, "kind": "Topic",
        "metadata": {
            "name": "orders", "namespace": NAMESPACE, "finalizers": ["eventrails.dev/finalizer"],
            "annotations": {
                "eventrails.dev/kopf-managed": "yes",
                "eventrails.dev/last-handled-configuration": json.dumps({"spec": {"tasks": ["send-email"]}}) + "\n",
            },
        },
        "spec": {"tasks": ["send-email", "charge-card"]},
    }
    response = await api.post(f"/apis/eventrails.dev/v1alpha1/namespaces/{NAMESPACE}/topics", json=body)
    assert response.status in (200, 201), await response.text()

    async with running_operator(api, operator_settings(api, nats_server)):
        topic = await eventually(lambda: (live(api, TOPICS, "orders") or {}).get("status", {}).get("lastHandledConfiguration")
                                 and live(api, TOPICS, "orders"), "the diff base to be in the status")
        await eventually(lambda: "eventrails.dev/last-handled-configuration"
                         not in live(api, TOPICS, "orders")["metadata"].get("annotations", {}),  # type: ignore[index]
                         "the old annotation to be removed")

    assert json.loads(topic["status"]["lastHandledConfiguration"]) == {"spec": {"tasks": ["send-email", "charge-card"]}}
    assert condition(topic)["status"] == "True"
    # The old diff base was read: the change is an update, not the creation of an unknown object.
    messages = [record.getMessage() for record in caplog.records if record.name == "kopf.objects"]
    assert any(message.startswith("Updating is processed") for message in messages), messages
    assert not any(message.startswith("Creation is processed") for message in messages), messages


async def test_consumer_waits_for_topic_stream(
    api: EmulatedApi, nats_server: NatsServer, nc: Client, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kopf.objects")
    async with running_operator(api, operator_settings(api, nats_server, resync_interval=1.0)):
        await apply(api, TOPICS, "Topic", "orders", {"tasks": ["send-email"]})
        await eventually(lambda: condition(live(api, TOPICS, "orders")).get("status") == "True",
                         "Topic orders to be Ready")
        # The stream is gone, as it is for a Consumer applied together with its Topic.
        # The Topic's next resync makes it again.
        await nc.jsm(timeout=5).delete_stream("shop_orders")
        await apply(api, CONSUMERS, "Consumer", "mailer", {"topic": "orders", "handler": "shop.workers:worker"})
        await eventually(lambda: condition(live(api, CONSUMERS, "mailer")).get("status") == "True",
                         "Consumer mailer to be Ready")

    failures = [record.getMessage() for record in caplog.records if "failed temporarily" in record.getMessage()]
    assert failures == []


async def test_bad_input_is_reported_and_creates_nothing(
    api: EmulatedApi, nats_server: NatsServer, nc: Client, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_operator(api, operator_settings(api, nats_server)):
        await apply(api, TOPICS, "Topic", "bad-task", {"tasks": ["Send_Email"]})
        await apply(api, TOPICS, "Topic", "bad-retention", {"tasks": ["send-email"], "retention": "forever"})
        await apply(api, CONSUMERS, "Consumer", "orphan", {"topic": "later", "handler": "shop.workers:worker"})
        await apply(api, TOPICS, "Topic", "good", {"events": ["InvoicePaid"]})

        def failed(resource: str, name: str) -> dict[str, Any]:
            ready = condition(live(api, resource, name))
            return ready if ready.get("status") == "False" else {}

        bad_task = await eventually(lambda: failed(TOPICS, "bad-task"), "Topic bad-task to be not Ready")
        bad_retention = await eventually(lambda: failed(TOPICS, "bad-retention"), "Topic bad-retention to be not Ready")
        orphan = await eventually(lambda: failed(CONSUMERS, "orphan"), "Consumer orphan to be not Ready")
        await eventually(lambda: condition(live(api, TOPICS, "good")).get("status") == "True", "Topic good to be Ready")

        assert bad_task["reason"] == "InvalidSpec"
        assert "spec.tasks[0]" in bad_task["message"]
        assert "'Send_Email'" in bad_task["message"]
        assert "lower-kebab-case" in bad_task["message"]
        assert condition(live(api, TOPICS, "bad-task"), "Degraded")["status"] == "True"
        assert bad_retention["reason"] == "InvalidSpec"
        assert "spec.retention" in bad_retention["message"]
        assert "'forever'" in bad_retention["message"]
        assert orphan["reason"] == "TopicNotFound"
        assert "spec.topic" in orphan["message"]
        assert "'later'" in orphan["message"]
        assert condition(live(api, CONSUMERS, "orphan"), "Reconciling")["status"] == "True"

        # Nothing was created in NATS for them, and no workers either.
        assert await stream_names(nc) == ["shop_good", "shop_good_dlq"]
        assert live(api, DEPLOYMENTS, "orphan-worker") is None

        # A permanent error is not retried until the spec changes: no storm of status writes,
        # while the Consumer waiting for its Topic keeps being retried (kopf counts the
        # retries in its progress annotation; the Topic is looked up in kopf's index).
        def retries() -> int:
            annotations = (live(api, CONSUMERS, "orphan") or {}).get("metadata", {}).get("annotations") or {}
            progress = annotations.get("eventrails.dev/consumer_changed")
            return int(json.loads(progress)["retries"]) if progress else 0

        patches = len(requests_to(api, TOPICS, "bad-task", "PATCH", "status"))
        retried = retries()
        await asyncio.sleep(2.0)
        assert len(requests_to(api, TOPICS, "bad-task", "PATCH", "status")) == patches == 1
        assert retries() > retried
        assert requests_to(api, TOPICS, "later", "GET") == []

        # Once the missing Topic appears, the retried Consumer becomes Ready.
        await apply(api, TOPICS, "Topic", "later", {"tasks": ["send-email"]})
        await eventually(lambda: condition(live(api, CONSUMERS, "orphan")).get("status") == "True",
                         "Consumer orphan to be Ready after its Topic was applied")
        assert live(api, DEPLOYMENTS, "orphan-worker") is not None

        # A Topic on an EventBus whose credentials Secret is missing waits for it, then connects with it.
        await apply(api, EVENTBUSES, "EventBus", "secured", {
            "servers": [nats_server.url], "credentials": {"secretName": "nats-user", "kind": "userPassword"},
        })
        await apply(api, TOPICS, "Topic", "billing", {"events": ["InvoicePaid"], "bus": "secured"})
        waiting = await eventually(lambda: failed(TOPICS, "billing"), "Topic billing to wait for its Secret")
        assert waiting["reason"] == "SecretNotFound"
        assert "shop/nats-user" in waiting["message"]
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nats-user", "namespace": NAMESPACE},
                  "data": {"username": base64.b64encode(b"billing").decode(), "password": base64.b64encode(b"s3cret").decode()}}
        response = await api.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", json=secret)
        assert response.status == 200
        await eventually(lambda: condition(live(api, TOPICS, "billing")).get("status") == "True",
                         "Topic billing to be Ready once its Secret exists")
        assert "s3cret" not in caplog.text

        # Fixing the spec is what retries a permanent failure.
        response = await api.patch(f"/apis/eventrails.dev/v1alpha1/namespaces/{NAMESPACE}/topics/bad-task",
                                   json={"spec": {"tasks": ["send-email"]}},
                                   headers={"Content-Type": "application/merge-patch+json"})
        assert response.status == 200
        await eventually(lambda: condition(live(api, TOPICS, "bad-task")).get("status") == "True",
                         "Topic bad-task to be Ready after its spec was fixed")
        assert "shop_bad-task" in await stream_names(nc)


async def test_failed_deletion_keeps_the_finalizer_and_retries(api: EmulatedApi, nats_server: NatsServer) -> None:
    async with running_operator(api, operator_settings(api, nats_server, nats_request_timeout=1.0)):
        await apply(api, TOPICS, "Topic", "ledger", {"tasks": ["post-entry"], "deletionPolicy": "Delete"})
        await eventually(lambda: condition(live(api, TOPICS, "ledger")).get("status") == "True", "Topic ledger to be Ready")

        # With NATS down, the streams cannot be deleted, so the Topic stays, held by its finalizer.
        nats_server.stop()
        await delete(api, TOPICS, "ledger")
        # kopf records a failed attempt of the deletion handler in its progress annotation.
        progress_key = "eventrails.dev/topic_deleted"
        await eventually(
            lambda: progress_key in ((live(api, TOPICS, "ledger") or {}).get("metadata", {}).get("annotations") or {}),
            "the deletion handler to fail and schedule a retry",
        )
        held = live(api, TOPICS, "ledger")
        assert held is not None
        assert held["metadata"]["deletionTimestamp"]
        assert held["metadata"]["finalizers"] == ["eventrails.dev/finalizer"]
        assert '"retries":' in held["metadata"]["annotations"][progress_key]

        # Once NATS is back, a retry deletes the streams and releases the Topic.
        nats_server.start()
        await eventually(lambda: live(api, TOPICS, "ledger") is None, "the Topic to be released after NATS returned")
        client = await nats.connect(nats_server.url, connect_timeout=5)
        try:
            assert await stream_names(client) == []
        finally:
            await client.close()
