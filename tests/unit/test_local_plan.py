"""Local mode planning: manifest loading, bus resolution, worker environment and the status table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from eventrails._local import (
    LocalStack,
    LocalModeError,
    StatusRow,
    format_status_table,
    load_manifests,
    python_path_for,
    resolve_bus,
    skipped_template_env,
    worker_command,
    worker_env,
)
from eventrails._manifests import parse_resource
from eventrails._resources import Consumer, EventBus, Topic
from eventrails._settings import WorkerSettings
from eventrails_operator import _desired
from eventrails_operator._jetstream import ReconcileError

API = "eventrails.dev/v1alpha1"
URL = "nats://127.0.0.1:4999"


def _bus(name: str = "default", namespace: str = "shop", prefix: str = "acme") -> EventBus:
    resource = parse_resource({
        "apiVersion": API, "kind": "EventBus", "metadata": {"name": name, "namespace": namespace},
        "spec": {"servers": ["nats://nats.cluster:4222"], "subjectPrefix": prefix, "jetstreamDomain": "hub"},
    })
    assert isinstance(resource, EventBus)
    return resource


def _topic(bus: str | None = None, namespace: str = "shop") -> Topic:
    spec: dict = {"tasks": ["send-email", "charge-card"]}
    if bus:
        spec["bus"] = bus
    resource = parse_resource({"apiVersion": API, "kind": "Topic", "metadata": {"name": "jobs", "namespace": namespace}, "spec": spec})
    assert isinstance(resource, Topic)
    return resource


def _consumer(**spec: object) -> Consumer:
    body = {"topic": "jobs", "handler": "app.jobs:worker", "maxDeliver": 3, "backoff": ["1s", "2s"], **spec}
    resource = parse_resource({"apiVersion": API, "kind": "Consumer", "metadata": {"name": "mailer", "namespace": "shop"}, "spec": body})
    assert isinstance(resource, Consumer)
    return resource


# --- Loading ---------------------------------------------------------------------------------

GOOD = """
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: jobs}
spec: {tasks: [send-email]}
---
apiVersion: eventrails.dev/v1alpha1
kind: Consumer
metadata: {name: mailer}
spec: {topic: jobs, handler: "app.jobs:worker"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: not-ours}
"""

BAD = """
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: badly-named}
spec: {tasks: [Send_Email]}
---
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: forever, namespace: other}
spec: {tasks: [a], retention: forever}
---
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: jobs}
spec: {tasks: [charge-card]}
"""


def test_load_manifests_keeps_valid_and_reports_invalid(tmp_path: Path) -> None:
    (tmp_path / "a-good.yaml").write_text(GOOD)
    (tmp_path / "b-bad.yaml").write_text(BAD)
    (tmp_path / "c-broken.yml").write_text("kind: [unclosed\n")
    (tmp_path / "notes.txt").write_text("not a manifest")

    loaded = load_manifests([tmp_path], namespace="shop")

    assert [(t.metadata.namespace, t.metadata.name, t.spec.names) for t in loaded.topics] == [("shop", "jobs", ["send-email"])]
    assert [c.metadata.name for c in loaded.consumers] == ["mailer"]
    problems = {(p.kind, p.namespace, p.name): p for p in loaded.problems}
    assert set(problems) == {
        ("Topic", "shop", "badly-named"), ("Topic", "other", "forever"), ("Topic", "shop", "jobs"), ("File", "", "c-broken.yml"),
    }
    bad_task = problems[("Topic", "shop", "badly-named")].message
    assert "spec.tasks[0]" in bad_task
    assert "'Send_Email'" in bad_task
    assert "lower-kebab-case" in bad_task
    retention = problems[("Topic", "other", "forever")].message
    assert "spec.retention" in retention
    assert "'forever'" in retention
    assert "workqueue" in retention
    assert "already loaded" in problems[("Topic", "shop", "jobs")].message
    assert "invalid YAML" in problems[("File", "", "c-broken.yml")].message
    assert problems[("Topic", "shop", "badly-named")].source.startswith(str(tmp_path / "b-bad.yaml"))


def test_load_manifests_names_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(LocalModeError, match="nowhere.*-f"):
        load_manifests([missing])


def test_load_manifests_of_an_empty_directory_is_empty(tmp_path: Path) -> None:
    assert load_manifests([tmp_path]).empty


# --- Bus resolution --------------------------------------------------------------------------


def test_bus_named_default_gives_the_prefix_and_the_local_url() -> None:
    bus = resolve_bus(_topic(), [_bus()], URL)
    assert bus.servers == (URL,)
    assert bus.subject_prefix == "acme"
    assert bus.name == "default"
    # A local server has no JetStream domain, whatever the cluster's bus sets.
    assert bus.jetstream_domain is None


def test_explicit_bus_wins_over_default() -> None:
    bus = resolve_bus(_topic(bus="billing"), [_bus(), _bus("billing", prefix="billing")], URL)
    assert (bus.name, bus.subject_prefix) == ("billing", "billing")


def test_missing_explicit_bus_is_an_error_naming_the_field() -> None:
    with pytest.raises(ReconcileError) as caught:
        resolve_bus(_topic(bus="billing"), [_bus()], URL)
    assert caught.value.field == "spec.bus"
    assert "'billing'" in caught.value.message
    assert "'shop'" in caught.value.message


def test_no_bus_falls_back_to_the_default_prefix() -> None:
    # A bus in another namespace does not count.
    bus = resolve_bus(_topic(), [_bus(namespace="elsewhere")], URL)
    assert (bus.servers, bus.subject_prefix) == ((URL,), "eventrails")


# --- Worker processes ------------------------------------------------------------------------


def test_python_path_is_each_manifest_directory_then_its_parent(tmp_path: Path) -> None:
    manifests = tmp_path / "project" / "manifests"
    manifests.mkdir(parents=True)
    single = tmp_path / "other" / "topic.yaml"
    single.parent.mkdir()
    single.write_text("")
    assert python_path_for([manifests, single, manifests]) == [
        manifests.resolve(), manifests.parent.resolve(), single.parent.resolve(), tmp_path.resolve(),
    ]


def test_explicit_python_path_replaces_the_default(tmp_path: Path) -> None:
    stack = LocalStack([tmp_path / "manifests"], python_path=[tmp_path / "src"])
    assert stack.python_path == [(tmp_path / "src").resolve()]
    assert LocalStack([tmp_path]).python_path == [tmp_path.resolve(), tmp_path.parent.resolve()]


def test_worker_command_runs_the_worker_module_with_this_python() -> None:
    assert worker_command("app.jobs:worker") == [sys.executable, "-m", "eventrails", "worker", "app.jobs:worker"]


def test_worker_env_is_the_deployment_env_plus_local_overrides(tmp_path: Path) -> None:
    consumer, topic = _consumer(concurrency=4), _topic()
    bus = resolve_bus(topic, [_bus()], URL)
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/existing", "EVENTRAILS_NATS_PASSWORD": "from-my-shell", "HOME": "/root"}

    env = worker_env(consumer, topic, bus, health_port=41234, python_path=[tmp_path / "m", tmp_path], base_env=base)

    deployment = _desired.worker_deployment(consumer, topic, bus, "worker:latest")
    container_env = {item["name"]: item["value"] for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    local_only = {"EVENTRAILS_HEALTH_PORT", "EVENTRAILS_HEALTH_HOST", "EVENTRAILS_PUBLISH_OUTCOMES"}
    for key, value in container_env.items():
        if key not in local_only:
            assert env[key] == value, key
    assert env["EVENTRAILS_NATS_SERVERS"] == URL
    assert env["EVENTRAILS_SUBJECT_PREFIX"] == "acme"
    assert env["EVENTRAILS_PUBLISH_OUTCOMES"] == "true"
    assert env["EVENTRAILS_HEALTH_HOST"] == "127.0.0.1"
    assert env["EVENTRAILS_HEALTH_PORT"] == "41234"
    assert "EVENTRAILS_NATS_PASSWORD" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["HOME"] == "/root"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "m"), str(tmp_path), "/existing"]


def test_worker_env_is_read_back_by_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, topic = _consumer(), _topic()
    env = worker_env(consumer, topic, resolve_bus(topic, [_bus()], URL), health_port=40001, python_path=[], base_env={})
    for key in [key for key in os.environ if key.startswith("EVENTRAILS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    settings = WorkerSettings()

    assert (settings.namespace, settings.topic, settings.consumer, settings.handler) == ("shop", "jobs", "mailer", "app.jobs:worker")
    assert settings.nats_servers == [URL]
    assert settings.stream == "shop_jobs"
    assert (settings.max_deliver, settings.backoff) == (3, [1.0, 2.0])
    assert (settings.publish_outcomes, settings.health_host, settings.health_port) == (True, "127.0.0.1", 40001)


def test_worker_env_ignores_this_process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTRAILS_NATS_PASSWORD", "from-my-shell")
    monkeypatch.setenv("EVENTRAILS_DRAIN_TIMEOUT", "3")
    consumer, topic = _consumer(), _topic()
    env = worker_env(consumer, topic, resolve_bus(topic, [], URL), health_port=40003, python_path=[], base_env=os.environ)
    assert "EVENTRAILS_NATS_PASSWORD" not in env
    assert env["EVENTRAILS_DRAIN_TIMEOUT"] == "25.0"


def test_template_env_values_apply_and_value_from_is_listed() -> None:
    consumer = _consumer(template={"env": [
        {"name": "FEATURE_FLAG", "value": "on"},
        {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}},
        {"name": "EVENTRAILS_HEALTH_PORT", "value": "9999"},
    ]})
    topic = _topic()
    env = worker_env(consumer, topic, resolve_bus(topic, [], URL), health_port=40002, python_path=[], base_env={})
    assert env["FEATURE_FLAG"] == "on"
    assert "API_TOKEN" not in env
    # The health port is local mode's own: several workers share one host.
    assert env["EVENTRAILS_HEALTH_PORT"] == "40002"
    assert skipped_template_env(consumer) == ["API_TOKEN"]


# --- Status table ----------------------------------------------------------------------------


def test_status_table_aligns_columns_and_keeps_long_messages() -> None:
    long_message = "spec.topic: Topic 'missing' not found in namespace 'shop'; apply the Topic or fix spec.topic"
    table = format_status_table([
        StatusRow("Topic", "shop", "jobs", "True", "shop_jobs", "-", "stream shop_jobs is in sync"),
        StatusRow("Consumer", "shop", "orphan", "False", "-", "-", long_message),
        StatusRow("File", "", "broken.yaml", "Invalid", message="invalid YAML"),
    ])
    lines = table.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "READY", "STREAM/CONSUMER", "WORKERS", "MESSAGE"]
    ready_column = lines[0].index("READY")
    assert [line[ready_column:].split()[0] for line in lines[1:]] == ["True", "False", "Invalid"]
    assert lines[2].endswith(long_message)
    assert lines[3].split()[:2] == ["File", "broken.yaml"]
