"""The API server rejects invalid eventrails objects with the field named, and so does local mode.

Each manifest below is applied with kubectl against the real kube-apiserver (schema and
CEL validation) and parsed with ``eventrails._manifests.parse_resource`` (the pydantic
models local mode and the operator use), so the two paths cannot drift apart.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from eventrails._controlplane import ControlPlane
from eventrails._manifests import ManifestError, parse_resource

pytestmark = pytest.mark.e2e

API = "eventrails.dev/v1alpha1"
CONSUMER = {"topic": "jobs", "handler": "app.workers:worker"}


def _manifest(kind: str, spec: dict[str, Any], name: str = "bad") -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


# (case id, manifest, texts the API server's message must contain, the field path first). The
# object-name rule runs at the root, where the API server accepts no fieldPath pointing into
# metadata, so its message names metadata.name itself.
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("task-name", _manifest("Topic", {"tasks": ["Send_Email"]}), ["spec.tasks[0]", "Send_Email"]),
    ("event-name", _manifest("Topic", {"events": ["invoice_paid"]}), ["spec.events[0]", "invoice_paid"]),
    ("tasks-and-events", _manifest("Topic", {"tasks": ["a"], "events": ["B"]}),
     ["spec", "set exactly one of spec.tasks or spec.events"]),
    ("neither", _manifest("Topic", {"storage": "file"}), ["spec", "set exactly one of spec.tasks or spec.events"]),
    ("event-workqueue", _manifest("Topic", {"events": ["B"], "retention": "workqueue"}),
     ["spec.retention", "cannot use workqueue retention"]),
    ("retention", _manifest("Topic", {"tasks": ["a"], "retention": "forever"}), ["spec.retention", "forever"]),
    ("storage", _manifest("Topic", {"tasks": ["a"], "storage": "disk"}), ["spec.storage", "disk"]),
    ("replicas-high", _manifest("Topic", {"tasks": ["a"], "replicas": 7}), ["spec.replicas", "5"]),
    ("replicas-zero", _manifest("Topic", {"tasks": ["a"], "replicas": 0}), ["spec.replicas", "1"]),
    ("max-age", _manifest("Topic", {"tasks": ["a"], "limits": {"maxAge": "7 days"}}), ["spec.limits.maxAge", "7 days"]),
    ("max-bytes", _manifest("Topic", {"tasks": ["a"], "limits": {"maxBytes": 0}}), ["spec.limits.maxBytes"]),
    ("duplicate-window", _manifest("Topic", {"tasks": ["a"], "duplicateWindow": "soon"}),
     ["spec.duplicateWindow", "soon"]),
    ("deletion-policy", _manifest("Topic", {"tasks": ["a"], "deletionPolicy": "Orphan"}),
     ["spec.deletionPolicy", "Orphan"]),
    ("empty-tasks", _manifest("Topic", {"tasks": []}), ["spec.tasks"]),
    ("duplicate-task", _manifest("Topic", {"tasks": ["a", "a"]}), ["spec.tasks[1]", "Duplicate value"]),
    ("bus-name", _manifest("Topic", {"tasks": ["a"], "bus": "Default"}), ["spec.bus", "Default"]),
    ("required-key", _manifest("Topic", {"tasks": ["a"], "payload": {"requiredKeys": ["org-id"]}}),
     ["spec.payload.requiredKeys[0]", "org-id"]),
    ("unknown-field", _manifest("Topic", {"tasks": ["a"], "colour": "red"}), ["spec.colour"]),
    ("object-name", _manifest("Topic", {"tasks": ["a"]}, name="jobs.v2"), ["metadata.name must be a DNS label"]),
    ("handler", _manifest("Consumer", {**CONSUMER, "handler": "app.worker"}), ["spec.handler", "app.worker"]),
    ("missing-handler", _manifest("Consumer", {"topic": "jobs"}), ["spec.handler", "Required value"]),
    ("consumer-topic", _manifest("Consumer", {**CONSUMER, "topic": "Jobs"}), ["spec.topic", "Jobs"]),
    ("concurrency", _manifest("Consumer", {**CONSUMER, "concurrency": 0}), ["spec.concurrency"]),
    ("ack-wait", _manifest("Consumer", {**CONSUMER, "ackWait": "soon"}), ["spec.ackWait", "soon"]),
    ("backoff-length", _manifest("Consumer", {**CONSUMER, "maxDeliver": 2, "backoff": ["1s", "2s"]}),
     ["spec.backoff", "fewer entries than maxDeliver"]),
    ("replicas-and-autoscaling", _manifest("Consumer", {**CONSUMER, "replicas": 2, "autoscaling": {}}),
     ["spec", "set replicas or autoscaling, not both"]),
    ("autoscaling-range", _manifest("Consumer", {**CONSUMER, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
     ["spec.autoscaling", "minReplicas must not exceed maxReplicas"]),
    ("no-servers", _manifest("EventBus", {"servers": []}), ["spec.servers"]),
    ("server-url", _manifest("EventBus", {"servers": ["http://nats:4222"]}), ["spec.servers[0]", "http://nats:4222"]),
    ("credentials-kind", _manifest("EventBus", {"servers": ["nats://nats:4222"],
                                                "credentials": {"secretName": "nats", "kind": "token"}}),
     ["spec.credentials.kind", "token"]),
]


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, crds_dir: Path) -> ControlPlane:
    control_plane.kubectl("apply", "-f", str(crds_dir))
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in sorted(crds_dir.glob("*.yaml"))]
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", *[f"crd/{name}" for name in names], timeout=40,
    )
    return control_plane


@pytest.fixture(scope="module")
def rules_namespace(cluster: ControlPlane) -> str:
    name = f"cel-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    return name


def test_invalid_table_has_twenty_cases() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize(("manifest", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_api_server_rejects_with_field(
    cluster: ControlPlane, rules_namespace: str, manifest: dict[str, Any], expected: list[str],
) -> None:
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": rules_namespace}}
    result = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0, result.stdout
    for fragment in expected:
        assert fragment in result.stderr, result.stderr

    kind = manifest["kind"].lower()
    missing = cluster.kubectl("get", kind, manifest["metadata"]["name"], "-n", rules_namespace, check=False)
    assert "NotFound" in missing.stderr


@pytest.mark.parametrize(("manifest", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_local_models_reject_too(manifest: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ManifestError):
        parse_resource(manifest, "bad.yaml")


@pytest.mark.parametrize(
    ("kind", "spec", "change", "expected"),
    [
        ("Topic", {"tasks": ["a"]}, {"storage": "memory"}, ["spec.storage", "immutable"]),
        ("Consumer", CONSUMER, {"topic": "other"}, ["spec.topic", "immutable"]),
    ],
    ids=["topic-storage", "consumer-topic"],
)
def test_immutable_fields_reject_updates(
    cluster: ControlPlane, rules_namespace: str, kind: str, spec: dict[str, Any], change: dict[str, Any],
    expected: list[str],
) -> None:
    name = f"immutable-{kind.lower()}"
    body = _manifest(kind, spec, name=name)
    body["metadata"]["namespace"] = rules_namespace
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))

    body["spec"] = {**spec, **change}
    result = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0, result.stdout
    for fragment in expected:
        assert fragment in result.stderr, result.stderr

    stored = yaml.safe_load(cluster.kubectl("get", kind.lower(), name, "-n", rules_namespace, "-o", "yaml").stdout)
    for field, value in change.items():
        assert stored["spec"][field] != value
