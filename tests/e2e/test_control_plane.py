"""The test control plane serves the eventrails CRDs as a real cluster would.

These run against the real etcd, kube-apiserver and kube-controller-manager started by the
``control_plane`` fixture; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kopf
import kopf.testing
import kubernetes
import pytest
import yaml

from eventrails._controlplane import (
    ETCD_VERSION,
    KUBERNETES_VERSION,
    ControlPlane,
    ControlPlaneError,
    ControlPlaneNotBuilt,
    find_binaries,
)

pytestmark = pytest.mark.e2e

T = TypeVar("T")
API = "eventrails.dev/v1alpha1"
TOOLS = Path(__file__).resolve().parents[2] / "tools" / "controlplane"


def _eventually(attempt: Callable[[], T], timeout: float, description: str) -> T:
    """Call ``attempt`` until it returns without raising, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except (AssertionError, ControlPlaneError) as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{description} did not happen within {timeout:.0f}s: {exc}") from exc
        time.sleep(0.25)


def _topic(name: str, namespace: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"apiVersion": API, "kind": "Topic", "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane, crds_dir: Path) -> ControlPlane:
    """The eventrails CRDs applied with kubectl and established."""
    control_plane.kubectl("apply", "-f", str(crds_dir))
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in sorted(crds_dir.glob("*.yaml"))]
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", *[f"crd/{name}" for name in names], timeout=40,
    )
    return control_plane


def test_pinned_versions_match_go_modules() -> None:
    """The Python constants name the cache directory the build script fills."""
    kubernetes_mod = (TOOLS / "kubernetes" / "go.mod").read_text()
    etcd_mod = (TOOLS / "etcd" / "go.mod").read_text()
    assert re.search(rf"^\s*k8s\.io/kubernetes {re.escape(KUBERNETES_VERSION)}\b", kubernetes_mod, re.M)
    assert re.search(rf"^\s*go\.etcd\.io/etcd/server/v3 {re.escape(ETCD_VERSION)}\b", etcd_mod, re.M)
    staging = re.findall(r"^\s*(k8s\.io/\S+) => (\S+) (v\S+)$", kubernetes_mod, re.M)
    assert staging, "the replace block for the staging modules is missing"
    expected = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    assert [(module, version) for module, target, version in staging if target != module or version != expected] == []


def test_missing_binaries_named_with_fix(tmp_path: Path) -> None:
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    with pytest.raises(ControlPlaneNotBuilt) as caught:
        find_binaries(tmp_path)
    message = str(caught.value)
    assert f"missing from {tmp_path}: kube-apiserver, kube-controller-manager, kubectl;" in message
    assert "build-controlplane.sh" in message
    assert "EVENTRAILS_CONTROLPLANE_BIN" in message


def test_startup_failure_reports_process_log(control_plane_bin: Path, tmp_path: Path) -> None:
    # Hold the API server's port so kube-apiserver exits during startup.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        plane = ControlPlane(root_dir=tmp_path, bin_dir=control_plane_bin, apiserver_port=taken.getsockname()[1])
        with pytest.raises(ControlPlaneError) as caught:
            plane.start(timeout=60)
    message = str(caught.value)
    assert message.startswith("kube-apiserver exited with code"), message
    assert str(tmp_path / "logs" / "kube-apiserver.log") in message
    assert "address already in use" in message
    assert not plane.running


def test_sigterm_stops_the_helper_and_its_servers(control_plane_bin: Path) -> None:
    helper = subprocess.Popen(
        [sys.executable, "-m", "eventrails._controlplane"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=os.environ | {"EVENTRAILS_CONTROLPLANE_BIN": str(control_plane_bin)},
    )
    servers: list[int] = []
    try:
        assert helper.stdout is not None
        first = helper.stdout.readline()  # blocks until the control plane is up (or the helper ended)
        assert first.startswith("export KUBECONFIG="), first
        root = Path(first.strip().removeprefix("export KUBECONFIG=")).parent
        servers = [int(pid) for path in Path(f"/proc/{helper.pid}/task").glob("*/children")
                   for pid in path.read_text().split()]
        assert len(servers) == 3, servers

        helper.send_signal(signal.SIGTERM)
        code = helper.wait(60)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        survivors = [pid for pid in servers if Path(f"/proc/{pid}").exists()]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)

    assert code == 0
    assert survivors == [], "servers outlived the helper"
    assert not root.exists()


def test_binaries_report_pinned_versions(control_plane: ControlPlane, control_plane_bin: Path) -> None:
    versions = json.loads(control_plane.kubectl("version", "--output=json").stdout)
    assert versions["clientVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert versions["serverVersion"]["gitVersion"] == KUBERNETES_VERSION

    etcd = subprocess.run(
        [str(control_plane_bin / "etcd"), "--version"], capture_output=True, text=True, timeout=10, check=True,
    )
    assert f"etcd Version: {ETCD_VERSION.removeprefix('v')}" in etcd.stdout


def test_python_client_reads_kubeconfig(control_plane: ControlPlane) -> None:
    with kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as client:
        assert kubernetes.client.VersionApi(client).get_code().git_version == KUBERNETES_VERSION
        names = [ns.metadata.name for ns in kubernetes.client.CoreV1Api(client).list_namespace().items]
    assert "default" in names


def test_explain_shows_field_descriptions(crds: ControlPlane) -> None:
    # The OpenAPI document that kubectl explain reads is published a moment after the
    # CRD is established.
    output = _eventually(lambda: crds.kubectl("explain", "topic.spec").stdout, 30, "kubectl explain topic.spec")
    assert re.search(r"^\s+tasks\s+<\[\]string>", output, re.M), output
    assert "Task names in lower-kebab-case" in output
    assert "Event names in PascalCase" in output


def test_get_topics_shows_printer_columns(crds: ControlPlane, namespace: str) -> None:
    crds.kubectl("apply", "-f", "-", input=_topic("jobs", namespace, {"tasks": ["send-email"]}))
    status = {
        "stream": "SHOP_JOBS",
        "messages": 3,
        "deadLettered": 1,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "StreamInSync",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }],
    }
    crds.kubectl(
        "patch", "topic", "jobs", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )

    lines = crds.kubectl("get", "topics", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "READY", "STREAM", "MESSAGES", "DEAD", "AGE"]
    assert lines[1].split()[:5] == ["jobs", "True", "SHOP_JOBS", "3", "1"]

    wide = crds.kubectl("get", "ert", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert "REASON" in wide[0].split()
    assert "StreamInSync" in wide[1].split()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"tasks": ["Send_Email"]}, ["spec.tasks[0]", "Send_Email", "should match"]),
        (
            {"tasks": ["send-email"], "events": ["InvoicePaid"]},
            ["spec: Invalid value", "set exactly one of spec.tasks or spec.events"],
        ),
        ({"events": ["InvoicePaid"], "retention": "workqueue"}, ["spec.retention", "cannot use workqueue retention"]),
    ],
    ids=["task-name", "tasks-and-events", "event-workqueue"],
)
def test_api_server_rejects_invalid_topic(
    crds: ControlPlane, namespace: str, spec: dict[str, Any], expected: list[str],
) -> None:
    result = crds.kubectl("apply", "-f", "-", input=_topic("bad", namespace, spec), check=False)
    assert result.returncode != 0
    assert 'The Topic "bad" is invalid' in result.stderr
    for fragment in expected:
        assert fragment in result.stderr

    missing = crds.kubectl("get", "topic", "bad", "-n", namespace, check=False)
    assert "NotFound" in missing.stderr


def test_python_client_gets_422_rejection(crds: ControlPlane, namespace: str) -> None:
    body = yaml.safe_load(_topic("bad", namespace, {"tasks": ["Send_Email"]}))
    with kubernetes.config.new_client_from_config(config_file=str(crds.kubeconfig)) as client:
        api = kubernetes.client.CustomObjectsApi(client)
        with pytest.raises(kubernetes.client.ApiException) as caught:
            api.create_namespaced_custom_object("eventrails.dev", "v1alpha1", namespace, "topics", body)
    assert caught.value.status == 422
    causes = json.loads(caught.value.body)["details"]["causes"]
    assert [cause["field"] for cause in causes] == ["spec.tasks[0]"]


def test_garbage_collector_removes_orphaned_dependent(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = control_plane.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    dependent = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "dependent", "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(dependent))

    # The API server only deletes the owner; removing the dependent is the garbage
    # collector's work in kube-controller-manager.
    control_plane.kubectl("delete", "configmap", "owner", "-n", namespace, "--wait=true", "--timeout=30s", timeout=40)

    def gone() -> None:
        result = control_plane.kubectl("get", "configmap", "dependent", "-n", namespace, check=False)
        assert "NotFound" in result.stderr, result.stdout

    _eventually(gone, 60, "garbage collection of configmap/dependent")


def test_minted_identity_limited_by_rbac(control_plane: ControlPlane, namespace: str) -> None:
    viewer = control_plane.user_kubeconfig("e2e-viewer", groups=["e2e-team"])

    denied = control_plane.kubectl("get", "configmaps", "-n", namespace, kubeconfig=viewer, check=False)
    assert denied.returncode != 0
    assert 'User "e2e-viewer" cannot list resource "configmaps"' in denied.stderr

    control_plane.kubectl(
        "create", "rolebinding", "e2e-viewer", "-n", namespace, "--clusterrole=view", "--group=e2e-team",
    )
    _eventually(
        lambda: control_plane.kubectl("get", "configmaps", "-n", namespace, kubeconfig=viewer),
        30, "access after the role binding",
    )


def test_kopf_operator_handles_topic(
    crds: ControlPlane, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = tmp_path / "operator.py"
    operator.write_text(
        "import kopf\n\n"
        "@kopf.on.login()\n"
        "def login(**kwargs):\n"
        "    return kopf.login_with_kubeconfig(**kwargs)\n\n"
        "@kopf.on.create('eventrails.dev', 'v1alpha1', 'topics')\n"
        "def mark(patch, **_):\n"
        "    patch.metadata.annotations['e2e.eventrails.dev/seen'] = 'yes'\n"
    )
    # kopf.login_with_kubeconfig reads KUBECONFIG when the operator logs in. The kubernetes
    # client's own loader reads it only once, at import time.
    monkeypatch.setenv("KUBECONFIG", str(crds.kubeconfig))
    crds.kubectl("apply", "-f", "-", input=_topic("handled", namespace, {"events": ["InvoicePaid"]}))

    def annotated() -> None:
        jsonpath = r"jsonpath={.metadata.annotations.e2e\.eventrails\.dev/seen}"
        result = crds.kubectl("get", "topic", "handled", "-n", namespace, "-o", jsonpath)
        assert result.stdout == "yes", result.stdout

    args = ["run", "--standalone", "--namespace", namespace, str(operator)]
    with kopf.testing.KopfRunner(args, timeout=60, registry=kopf.OperatorRegistry()) as runner:
        _eventually(annotated, 30, "the kopf handler's annotation")
    assert runner.exception is None
    assert runner.exit_code == 0
