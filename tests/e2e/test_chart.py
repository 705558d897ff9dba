"""charts/eventrails installed with helm on the test control plane, and the operator run with its RBAC.

There is no kubelet, so the operator pod never starts. Instead each test runs the chart's
operator container as a local process, with the command, arguments and environment of the
installed Deployment. Its only credential is a token minted with the TokenRequest API for the
chart's ServiceAccount, so the API server authorizes every request against the chart's roles
alone. Only the health and metrics ports move to free ports on 127.0.0.1.

The operator runs in namespaced mode: a cluster-wide operator would also act on the
objects of other tests sharing this control plane. Cluster mode is checked by asking the
API server what the chart's ServiceAccount may do.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
import pytest
import yaml

from eventrails._controlplane import ControlPlane, ControlPlaneError
from eventrails._natsserver import NatsServer, free_port
from tests.unit.test_chart_helm import CHART, HELM, HELM_UNAVAILABLE, Helm

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(HELM is None, reason=HELM_UNAVAILABLE or ""),
]

T = TypeVar("T")
API = "eventrails.dev/v1alpha1"
WAIT = 60.0
# Settings that make the operator react within seconds, passed through the chart's values.
QUICK = {"RETRY_DELAY_MIN": "0.5", "RETRY_DELAY_MAX": "2", "NATS_CONNECT_TIMEOUT": "2",
         "NATS_REQUEST_TIMEOUT": "2", "KEDA_CHECK_INTERVAL": "5"}
USER_MANAGER = "gitops"


def eventually(check: Callable[[], T], description: str, timeout: float = WAIT) -> T:
    """Call ``check`` until it returns something truthy without failing, or fail naming ``description``."""
    deadline = time.monotonic() + timeout
    last = "nothing truthy yet"
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, ControlPlaneError) as error:
            last = str(error)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {description}: {last}")
        time.sleep(0.3)


# --- a release of the chart -----------------------------------------------------------------------


@dataclass
class Release:
    plane: ControlPlane
    helm: Helm
    name: str
    namespace: str  # where the release and the operator's ServiceAccount live
    watched: str  # the namespace the operator watches
    unwatched: str  # a namespace it must not touch
    tmp: Path

    @property
    def service_account(self) -> str:
        return f"{self.name}-eventrails"

    def deployment(self) -> dict[str, Any]:
        result = self.plane.kubectl("get", "deployment", self.service_account, "-n", self.namespace, "-o", "json")
        return dict(json.loads(result.stdout))

    def token_kubeconfig(self) -> Path:
        """A kubeconfig with a short-lived token of the chart's ServiceAccount (TokenRequest API)."""
        token = self.plane.kubectl("create", "token", self.service_account, "-n", self.namespace,
                                   "--duration=1h").stdout.strip()
        admin = yaml.safe_load(self.plane.kubeconfig.read_text())
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": admin["clusters"],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"], "user": "operator"}}],
            "current-context": "operator",
        }
        path = self.tmp / f"{self.service_account}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def as_operator(self, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, kubeconfig=kubeconfig, check=False)


def _create_namespaces(plane: ControlPlane, *names: str) -> None:
    for name in names:
        plane.kubectl("create", "namespace", name)


@pytest.fixture(scope="module")
def chart_helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    assert HELM is not None
    return Helm(HELM, tmp_path_factory.mktemp("helm-home"), kubeconfig=control_plane.kubeconfig)


def _install(plane: ControlPlane, helm: Helm, tmp: Path, values: dict[str, Any]) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    release = Release(plane, helm, f"er-{suffix}", f"ops-{suffix}", f"shop-{suffix}", f"other-{suffix}", tmp)
    _create_namespaces(plane, release.namespace, release.watched, release.unwatched)
    values = json.loads(json.dumps(values).replace("WATCHED", release.watched))
    try:
        helm.run("install", release.name, str(CHART), "--namespace", release.namespace,
                 "--values", str(helm.values_file(values)), timeout=120)
        yield release
    finally:
        helm.run("uninstall", release.name, "--namespace", release.namespace, "--wait=false", check=False)
        for name in (release.watched, release.unwatched, release.namespace):
            plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture()
def namespaced_release(control_plane: ControlPlane, chart_helm: Helm, nats_server: NatsServer,
                       tmp_path: Path) -> Iterator[Release]:
    values = {
        "watchNamespaces": ["WATCHED"],
        "nats": {"servers": [nats_server.url]},
        "defaultEventBus": {"create": True},
        "operator": {"resyncInterval": 2, "env": QUICK},
    }
    yield from _install(control_plane, chart_helm, tmp_path, values)


@pytest.fixture()
def cluster_release(control_plane: ControlPlane, chart_helm: Helm, tmp_path: Path) -> Iterator[Release]:
    yield from _install(control_plane, chart_helm, tmp_path, {})


# --- the operator as a local process --------------------------------------------------------------


class LocalOperator:
    """The chart's operator container run here, with the ServiceAccount token as its only credential."""

    def __init__(self, release: Release, kubeconfig: Path) -> None:
        container = release.deployment()["spec"]["template"]["spec"]["containers"][0]
        command = [*container["command"], *container.get("args", [])]
        assert command[:2] == ["eventrails", "operator"], command
        command[0] = str(Path(sys.executable).parent / "eventrails")

        self.health_port = free_port()
        self.metrics_port = free_port()
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("EVENTRAILS_") and key != "KUBECONFIG"}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
            elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[item["name"]] = f"{release.service_account}-local"
            else:
                raise AssertionError(f"env {item['name']} has a source this test does not resolve: {item}")
        # The container ports, moved to free ports on 127.0.0.1.
        env["EVENTRAILS_OPERATOR_LIVENESS_ENDPOINT"] = f"http://127.0.0.1:{self.health_port}/healthz"
        env["EVENTRAILS_OPERATOR_METRICS_PORT"] = str(self.metrics_port)
        env["EVENTRAILS_OPERATOR_METRICS_HOST"] = "127.0.0.1"
        env["KUBECONFIG"] = str(kubeconfig)
        self.identity = env["POD_ID"]
        self.log_path = release.tmp / "operator.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        eventually(self._healthy, "the operator to answer /healthz", timeout=30)

    def _healthy(self) -> bool:
        assert self.process.poll() is None, f"the operator exited with {self.process.returncode}:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError as error:
            raise AssertionError(str(error)) from error

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"the operator did not stop within 30s of SIGTERM:\n{self.log()}") from None
        return self.process.returncode


@pytest.fixture()
def operator(namespaced_release: Release) -> Iterator[LocalOperator]:
    process = LocalOperator(namespaced_release, namespaced_release.token_kubeconfig())
    try:
        yield process
    finally:
        process.stop()


def _apply(release: Release, manifest: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    return release.plane.kubectl("apply", "-n", release.watched, "-f", "-", *extra, input=yaml.safe_dump(manifest))


def _get(release: Release, plural: str, name: str) -> dict[str, Any]:
    result = release.plane.kubectl("get", plural, name, "-n", release.watched, "-o", "json",
                                   "--show-managed-fields")
    return dict(json.loads(result.stdout))


def _topic(name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Topic", "metadata": {"name": name, **metadata}, "spec": spec}


def _wait_ready(release: Release, plural: str, name: str) -> None:
    release.plane.kubectl("wait", "-n", release.watched, "--for=condition=Ready", f"{plural}/{name}",
                          f"--timeout={WAIT:.0f}s", timeout=WAIT + 10)


def _jetstream(url: str, stream: str, consumer: str | None = None) -> tuple[Any, Any]:
    """The stream's info and the consumer's, each None when it does not exist."""
    async def read() -> tuple[Any, Any]:
        client = await nats.connect(url, connect_timeout=5)
        manager = client.jsm(timeout=5)
        try:
            try:
                stream_info = await manager.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return None, None
            if consumer is None:
                return stream_info, None
            try:
                return stream_info, await manager.consumer_info(stream, consumer)
            except nats.js.errors.NotFoundError:
                return stream_info, None
        finally:
            await client.close()

    return asyncio.run(read())


# --- kstatus --------------------------------------------------------------------------------------


def kstatus(resource: dict[str, Any]) -> str:
    """The health Flux (and Argo CD with the check in docs/gitops.md) reads from a status, after kstatus.

    InProgress while the status describes an older generation or Reconciling is True; Failed
    when Stalled is True; Current when Ready is True; InProgress otherwise. kstatus has no
    Degraded condition, so a permanently failed object stays InProgress (not Current).
    """
    status = resource.get("status") or {}
    conditions = {item["type"]: item for item in status.get("conditions") or []}
    generation = resource["metadata"].get("generation")
    if status.get("observedGeneration") != generation:
        return "InProgress"
    if any(item.get("observedGeneration", generation) != generation for item in conditions.values()):
        return "InProgress"
    if conditions.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conditions.get("Stalled", {}).get("status") == "True":
        return "Failed"
    if conditions.get("Ready", {}).get("status") == "True":
        return "Current"
    return "InProgress"


def test_kstatus_reading_follows_the_conventions() -> None:
    """The small reader above tells apart the states the tests below rely on."""
    def resource(generation: int, observed: int, **conditions: str) -> dict[str, Any]:
        return {"metadata": {"generation": generation}, "status": {"observedGeneration": observed, "conditions": [
            {"type": kind, "status": value, "observedGeneration": observed} for kind, value in conditions.items()]}}

    assert kstatus(resource(2, 2, Ready="True", Reconciling="False", Degraded="False")) == "Current"
    assert kstatus(resource(3, 2, Ready="True", Reconciling="False", Degraded="False")) == "InProgress"
    assert kstatus(resource(2, 2, Ready="False", Reconciling="True", Degraded="False")) == "InProgress"
    assert kstatus(resource(2, 2, Ready="False", Reconciling="False", Stalled="True")) == "Failed"
    assert kstatus(resource(2, 2, Ready="False", Reconciling="False", Degraded="True")) == "InProgress"
    assert kstatus({"metadata": {"generation": 1}}) == "InProgress"


# --- tests ----------------------------------------------------------------------------------------


def test_operator_reconciles_with_chart_rbac(
    namespaced_release: Release, operator: LocalOperator, nats_server: NatsServer,
) -> None:
    release = namespaced_release
    # The process authenticates as the chart's ServiceAccount, not as an administrator.
    whoami = release.as_operator(release.token_kubeconfig(), "auth", "whoami", "-o", "json")
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == \
        f"system:serviceaccount:{release.namespace}:{release.service_account}"

    # The chart's default EventBus is reconciled too: the operator reads and patches it.
    _wait_ready(release, "eventbuses", "default")

    _apply(release, _topic("mail", {"tasks": ["send-email"]}))
    _apply(release, {"apiVersion": API, "kind": "Consumer", "metadata": {"name": "mailer"},
                     "spec": {"topic": "mail", "handler": "mail.handlers:worker", "replicas": 2}})
    _wait_ready(release, "topics", "mail")
    _wait_ready(release, "consumers", "mailer")

    stream, durable = _jetstream(nats_server.url, f"{release.watched}_mail", "mailer")
    assert stream is not None and durable is not None
    assert stream.config.subjects == [f"eventrails.{release.watched}.mail.send-email"]
    assert durable.config.durable_name == "mailer"
    workers = release.plane.kubectl("get", "deployment", "-n", release.watched, "-o", "json",
                                    "-l", "eventrails.dev/consumer=mailer")
    [deployment] = json.loads(workers.stdout)["items"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/eventrails/worker:0.1.0"

    # Peering ran under the same identity: the replica keeps alive in the chart's KopfPeering.
    def keeps_alive() -> bool:
        peering = json.loads(release.plane.kubectl("get", "kopfpeerings", release.service_account, "-n",
                                                   release.watched, "-o", "json").stdout)
        assert operator.identity in (peering.get("status") or {}), peering.get("status")
        return True

    eventually(keeps_alive, "the operator's keep-alive in the KopfPeering")

    # Events were posted, and nothing the operator tried was forbidden.
    events = release.plane.kubectl("get", "events", "-n", release.watched, "-o", "json")
    assert any(item["involvedObject"]["name"] == "mail" for item in json.loads(events.stdout)["items"])
    assert operator.stop() == 0, operator.log()
    log = operator.log()
    assert "Forbidden" not in log and " 403" not in log and "Traceback" not in log, log


def test_ungranted_verbs_are_forbidden(namespaced_release: Release) -> None:
    release = namespaced_release
    plane = release.plane
    for namespace in (release.watched, release.unwatched):
        plane.kubectl("create", "secret", "generic", "nats-creds", "-n", namespace, "--from-literal=creds=x")
    kubeconfig = release.token_kubeconfig()

    # What it needs in the watched namespace works.
    allowed = release.as_operator(kubeconfig, "get", "secret", "nats-creds", "-n", release.watched, "-o", "name")
    assert allowed.returncode == 0, allowed.stderr
    assert release.as_operator(kubeconfig, "get", "topics", "-n", release.watched).returncode == 0

    forbidden = {
        "read a Secret in an unwatched namespace": ("get", "secret", "nats-creds", "-n", release.unwatched),
        "list Secrets where it may read them": ("get", "secrets", "-n", release.watched),
        "read Topics in an unwatched namespace": ("get", "topics", "-n", release.unwatched),
        "list Topics in all namespaces": ("get", "topics", "--all-namespaces"),
        "delete a namespace": ("delete", "namespace", release.unwatched, "--wait=false"),
        "create a ClusterRole": ("create", "clusterrole", "escalate", "--verb=get", "--resource=secrets"),
        "bind itself a Role": ("create", "rolebinding", "escalate", "-n", release.watched, "--clusterrole=admin",
                               f"--serviceaccount={release.namespace}:{release.service_account}"),
        "create a Deployment in an unwatched namespace": (
            "create", "deployment", "intruder", "--image=registry.example/x:1", "-n", release.unwatched),
        "read Pods": ("get", "pods", "-n", release.watched),
    }
    for action, args in forbidden.items():
        result = release.as_operator(kubeconfig, *args)
        assert result.returncode != 0, f"the operator could {action}: {result.stdout}"
        assert "forbidden" in result.stderr.lower(), f"{action} failed for another reason: {result.stderr}"
    # The namespace it tried to delete is still there.
    plane.kubectl("get", "namespace", release.unwatched)


def test_cluster_mode_permissions(cluster_release: Release) -> None:
    release = cluster_release
    account = f"system:serviceaccount:{release.namespace}:{release.service_account}"

    def can(*args: str) -> bool:
        result = release.plane.kubectl("auth", "can-i", *args, f"--as={account}", check=False)
        return result.stdout.strip() == "yes"

    for namespace in (release.watched, release.unwatched):
        for verb in ("get", "list", "watch", "patch"):
            assert can(verb, "topics.eventrails.dev", "-n", namespace), (verb, namespace)
        assert can("patch", "consumers.eventrails.dev", "--subresource=status", "-n", namespace)
        assert can("create", "deployments.apps", "-n", namespace)
        assert can("get", "secrets", "-n", namespace)
        assert not can("list", "secrets", "-n", namespace)
        assert not can("update", "topics.eventrails.dev", "-n", namespace)
        assert not can("get", "pods", "-n", namespace)
    assert can("patch", "clusterkopfpeerings.kopf.dev")
    assert not can("delete", "namespaces")
    assert not can("create", "clusterroles.rbac.authorization.k8s.io")
    assert not can("create", "customresourcedefinitions.apiextensions.k8s.io")
    # The chart created the cluster-wide peering object the replicas share.
    release.plane.kubectl("get", "clusterkopfpeering", release.service_account)


def test_gitops_owned_fields_stay_with_gitops(namespaced_release: Release, operator: LocalOperator) -> None:
    release = namespaced_release
    manifest = _topic("orders", {"tasks": ["charge-card"], "limits": {"maxAge": "1h"}},
                      labels={"team": "payments"}, annotations={"example.com/owner": "payments"})

    def apply() -> None:
        # Server-side apply without --force-conflicts: a field another manager took would fail it.
        _apply(release, manifest, "--server-side", f"--field-manager={USER_MANAGER}")

    apply()
    _wait_ready(release, "topics", "orders")
    eventually(lambda: kstatus(_get(release, "topics", "orders")) == "Current", "the Topic to be Current")
    before = _get(release, "topics", "orders")

    # Re-applying the same manifest conflicts with nothing and changes nothing the user owns.
    apply()
    after = _get(release, "topics", "orders")
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1
    assert after["spec"] == before["spec"]
    assert after["metadata"]["labels"] == {"team": "payments"}
    user_annotations = {key: value for key, value in after["metadata"]["annotations"].items()
                        if not key.startswith("eventrails.dev/")}
    assert user_annotations == {"example.com/owner": "payments"}
    # kopf's record of the handled spec is in the status, not in an annotation.
    assert json.loads(after["status"]["lastHandledConfiguration"])["spec"] == after["spec"]
    assert "eventrails.dev/last-handled-configuration" not in after["metadata"]["annotations"]
    assert after["metadata"]["finalizers"] == ["eventrails.dev/finalizer"]

    # The operator's writes own only status, its eventrails.dev/ annotations and its finalizer.
    managers = {entry["manager"] for entry in after["metadata"]["managedFields"]}
    assert USER_MANAGER in managers and len(managers) > 1, managers
    for entry in after["metadata"]["managedFields"]:
        fields = entry.get("fieldsV1", {})
        if entry["manager"] == USER_MANAGER:
            assert "f:spec" in fields and "f:status" not in fields, entry
            continue
        assert "f:spec" not in fields, entry
        metadata = fields.get("f:metadata", {})
        assert "f:labels" not in metadata, entry
        assert all(key.startswith("f:eventrails.dev/") for key in metadata.get("f:annotations", {})), entry
        assert set(metadata) <= {"f:annotations", "f:finalizers"}, entry
        assert set(fields) <= {"f:metadata", "f:status"}, entry

    # A change through GitOps is reconciled, and health follows the generation.
    manifest["spec"]["tasks"] = ["charge-card", "refund-card"]
    apply()

    def current_at_generation_two() -> bool:
        topic = _get(release, "topics", "orders")
        assert topic["metadata"]["generation"] == 2
        assert kstatus(topic) == "Current", topic.get("status")
        return True

    eventually(current_at_generation_two, "the Topic to be Current at generation 2")

    # A Topic that cannot be reconciled is not reported healthy.
    _apply(release, _topic("audit", {"events": ["AuditRecorded"], "bus": "missing"}), "--server-side",
           f"--field-manager={USER_MANAGER}")

    def not_ready() -> dict[str, Any]:
        topic = _get(release, "topics", "audit")
        ready = next((item for item in (topic.get("status") or {}).get("conditions") or [] if item["type"] == "Ready"),
                     None)
        assert ready is not None and ready["reason"] == "EventBusNotFound", topic.get("status")
        return topic

    assert kstatus(eventually(not_ready, "the Topic with a missing bus to report it")) != "Current"


def test_upgrade_and_uninstall_as_documented(
    namespaced_release: Release, operator: LocalOperator, nats_server: NatsServer,
) -> None:
    """What docs/upgrade.md tells users to do works as written."""
    release, plane, helm = namespaced_release, namespaced_release.plane, namespaced_release.helm
    _apply(release, _topic("mail", {"tasks": ["send-email"]}))
    _wait_ready(release, "topics", "mail")

    # Upgrade: CRDs first (Helm leaves them alone), then the release with one value changed.
    crds = helm.run("show", "crds", str(CHART)).stdout
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crds)
    helm.run("upgrade", release.name, str(CHART), "--namespace", release.namespace, "--reuse-values",
             "--set", "operator.resyncInterval=5", timeout=120)
    env = {item["name"]: item.get("value") for item in
           release.deployment()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EVENTRAILS_OPERATOR_RESYNC_INTERVAL"] == "5"
    assert env["EVENTRAILS_OPERATOR_DEFAULT_NATS_SERVERS"] == nats_server.url

    # Uninstall: the Topic, its finalizer and its stream stay.
    assert operator.stop() == 0, operator.log()
    helm.run("uninstall", release.name, "--namespace", release.namespace, timeout=120)
    topic = _get(release, "topics", "mail")
    assert topic["metadata"]["finalizers"] == ["eventrails.dev/finalizer"]
    stream_name = f"{release.watched}_mail"
    assert _jetstream(nats_server.url, stream_name)[0] is not None

    # Deleting it without the operator leaves it Terminating until the finalizer goes.
    plane.kubectl("delete", "topic", "mail", "-n", release.watched, "--wait=false")
    assert _get(release, "topics", "mail")["metadata"].get("deletionTimestamp")
    wrong = plane.kubectl("patch", "topic", "mail", "-n", release.watched, "--type=json", "-p", json.dumps([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "someone-else/finalizer"},
        {"op": "remove", "path": "/metadata/finalizers/0"}]), check=False)
    assert wrong.returncode != 0 and _get(release, "topics", "mail")["metadata"]["finalizers"]
    plane.kubectl("patch", "topic", "mail", "-n", release.watched, "--type=json", "-p", json.dumps([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "eventrails.dev/finalizer"},
        {"op": "remove", "path": "/metadata/finalizers/0"}]))
    lookup = plane.kubectl("get", "topic", "mail", "-n", release.watched, check=False)
    assert lookup.returncode != 0
    assert "NotFound" in lookup.stderr
    # deletionPolicy Retain: the stream outlives the Topic.
    assert _jetstream(nats_server.url, stream_name)[0] is not None

