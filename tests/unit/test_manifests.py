"""Manifest validation: every rejection names the field, the value and the rule."""

from pathlib import Path

import pytest

from eventrails._manifests import ManifestError, load_resources, parse_resource
from eventrails._resources import Consumer, Topic

API = "eventrails.dev/v1alpha1"


def _topic(spec: dict, name: str = "jobs") -> dict:
    return {"apiVersion": API, "kind": "Topic", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def _consumer(spec: dict, name: str = "mailer") -> dict:
    return {"apiVersion": API, "kind": "Consumer", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def test_valid_task_topic_defaults() -> None:
    topic = parse_resource(_topic({"tasks": ["send-email"]}))
    assert isinstance(topic, Topic)
    assert topic.spec.effective_retention == "workqueue"
    assert topic.spec.storage == "file"
    assert topic.spec.payload.required_keys == ["organizationId", "projectId"]
    assert topic.spec.deletion_policy == "Retain"


def test_valid_event_topic_defaults_to_limits() -> None:
    topic = parse_resource(_topic({"events": ["InvoicePaid"]}))
    assert isinstance(topic, Topic)
    assert topic.spec.effective_retention == "limits"


BAD_INPUT = [
    (_topic({"tasks": ["Send_Email"]}), "spec.tasks[0]", "'Send_Email'", "lower-kebab-case"),
    (_topic({"events": ["invoice_paid"]}), "spec.events[0]", "'invoice_paid'", "PascalCase"),
    (_topic({"tasks": ["a"], "retention": "forever"}), "spec.retention", "'forever'", "workqueue"),
    (_topic({"tasks": ["a"], "storage": "disk"}), "spec.storage", "'disk'", "'file'"),
    (_topic({"tasks": ["a"], "replicas": 7}), "spec.replicas", "7", "less than or equal to 5"),
    (_topic({"tasks": ["a"], "limits": {"maxAge": "7 days"}}), "spec.limits.maxAge", "'7 days'", "duration"),
    (_topic({"tasks": ["a"], "deletionPolicy": "Orphan"}), "spec.deletionPolicy", "'Orphan'", "Retain"),
    (_topic({"tasks": ["a"], "events": ["B"]}), "spec", "", "exactly one of spec.tasks or spec.events"),
    (_topic({"events": ["B"], "retention": "workqueue"}), "spec", "", "cannot use workqueue"),
    (_topic({"tasks": ["a"], "payload": {"exempt": ["b"]}}), "spec", "['b']", "not declared"),
    (_topic({"tasks": ["a"], "colour": "red"}), "spec.colour", "", "unknown field"),
    (_topic({"tasks": ["a"]}, name="Jobs"), "metadata.name", "'Jobs'", "DNS label"),
    (_consumer({"topic": "jobs", "handler": "app.worker"}), "spec.handler", "'app.worker'", "module:object"),
    (_consumer({"topic": "jobs", "handler": "a:b", "maxDeliver": 2, "backoff": ["1s", "2s"]}), "spec", "2", "fewer backoff entries"),
    (_consumer({"topic": "jobs", "handler": "a:b", "ackWait": "soon"}), "spec.ackWait", "'soon'", "duration"),
    (_consumer({"topic": "jobs", "handler": "a:b", "concurrency": 0}), "spec.concurrency", "0", "greater than or equal to 1"),
    (_consumer({"topic": "jobs", "handler": "a:b", "replicas": 2, "autoscaling": {}}), "spec", "", "replicas or autoscaling"),
    (_consumer({"handler": "a:b"}), "spec.topic", "", "required"),
]


@pytest.mark.parametrize(("body", "field", "value", "rule"), BAD_INPUT, ids=[case[1] + ":" + case[3] for case in BAD_INPUT])
def test_invalid_manifest_names_field_value_rule(body: dict, field: str, value: str, rule: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_resource(body, "bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml: "), message
    assert f"{field}:" in message, message
    assert value in message, message
    assert rule in message, message


def test_wrong_api_version_is_rejected() -> None:
    body = _topic({"tasks": ["a"]}) | {"apiVersion": "eventrails.dev/v1"}
    with pytest.raises(ManifestError, match="apiVersion: 'eventrails.dev/v1' is invalid"):
        parse_resource(body)


def test_load_resources_keeps_valid_beside_invalid(tmp_path: Path) -> None:
    (tmp_path / "topics.yaml").write_text(
        """
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: jobs}
spec: {tasks: [send-email]}
---
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: broken}
spec: {tasks: [Send_Email]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: unrelated}
"""
    )
    (tmp_path / "consumer.yml").write_text(
        "apiVersion: eventrails.dev/v1alpha1\nkind: Consumer\nmetadata: {name: mailer}\n"
        "spec: {topic: jobs, handler: 'app.workers:worker'}\n"
    )
    resources, errors = load_resources([tmp_path], default_namespace="dev")
    assert sorted((r.kind, r.metadata.name, r.metadata.namespace) for r in resources) == [
        ("Consumer", "mailer", "dev"), ("Topic", "jobs", "dev"),
    ]
    assert len(errors) == 1
    assert "Topic dev/broken" in str(errors[0])
    assert "'Send_Email'" in str(errors[0])
    assert isinstance(next(r for r in resources if r.kind == "Consumer"), Consumer)


def test_missing_manifest_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_resources([tmp_path / "nope"])


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(ManifestError, match="invalid YAML"):
        load_resources([tmp_path])
