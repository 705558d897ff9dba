"""The pure functions from resources to stream, consumer and Deployment objects."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from eventrails._manifests import parse_resource
from eventrails._resources import Consumer, EventBusSpec, Topic
from eventrails._settings import WorkerSettings
from eventrails_operator import _desired
from eventrails_operator._desired import BusConnection

API = "eventrails.dev/v1alpha1"
BUS = BusConnection(servers=("nats://nats-a:4222", "nats://nats-b:4222"), subject_prefix="acme")


def topic(spec: dict[str, Any], name: str = "orders") -> Topic:
    parsed = parse_resource({"apiVersion": API, "kind": "Topic", "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
    assert isinstance(parsed, Topic)
    return parsed


def consumer(spec: dict[str, Any], name: str = "mailer") -> Consumer:
    full = {"topic": "orders", "handler": "shop.workers:worker", **spec}
    parsed = parse_resource({"apiVersion": API, "kind": "Consumer", "metadata": {"name": name, "namespace": "shop"}, "spec": full})
    assert isinstance(parsed, Consumer)
    return parsed


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container_of(deployment)["env"]}


# --- Streams -----------------------------------------------------------------------------------


def test_task_topic_stream_and_dead_letter_stream() -> None:
    streams = _desired.topic_streams(topic({"tasks": ["send-email", "charge-card"]}), BUS)

    stream = streams.stream
    assert stream.name == "shop_orders"
    assert stream.subjects == ["acme.shop.orders.send-email", "acme.shop.orders.charge-card"]
    assert str(stream.retention.value) == "workqueue"
    assert str(stream.storage.value) == "file"
    assert (stream.max_age, stream.max_bytes, stream.max_msgs) == (0.0, -1, -1)
    assert stream.duplicate_window == 120.0
    assert stream.allow_msg_schedules is None
    assert stream.metadata is not None
    assert stream.metadata["eventrails.dev/names"] == "send-email,charge-card"
    assert stream.metadata["eventrails.dev/required-keys"] == "organizationId,projectId"
    assert stream.metadata["eventrails.dev/topic-kind"] == "tasks"

    dead = streams.dead_letter
    assert dead is not None
    assert dead.name == "shop_orders_dlq"
    assert dead.subjects == ["acme.dlq.shop.orders.>"]
    assert str(dead.retention.value) == "limits"
    assert dead.max_age == 14 * 86400


def test_event_topic_defaults_to_limits_and_carries_limits() -> None:
    streams = _desired.topic_streams(topic({
        "events": ["InvoicePaid"], "storage": "memory", "replicas": 3,
        "limits": {"maxAge": "7d", "maxBytes": 1024, "maxMessages": 10},
    }), BUS)

    stream = streams.stream
    assert str(stream.retention.value) == "limits"
    assert str(stream.storage.value) == "memory"
    assert stream.num_replicas == 3
    assert (stream.max_age, stream.max_bytes, stream.max_msgs) == (7 * 86400, 1024, 10)
    assert streams.dead_letter is not None and str(streams.dead_letter.storage.value) == "memory"


def test_duplicate_window_never_exceeds_max_age() -> None:
    stream = _desired.topic_streams(topic({"tasks": ["a"], "limits": {"maxAge": "30s"}, "duplicateWindow": "5m"}), BUS).stream
    assert stream.duplicate_window == 30.0


def test_delayed_delivery_adds_schedule_subjects() -> None:
    streams = _desired.topic_streams(topic({"tasks": ["remind"], "delayedDelivery": True}), BUS)
    assert streams.stream.subjects == ["acme.shop.orders.remind", "acme.sched.shop.orders.>"]
    assert streams.stream.allow_msg_schedules is True
    assert streams.subjects == streams.stream.subjects


def test_disabled_dead_letter_has_no_stream() -> None:
    assert _desired.topic_streams(topic({"tasks": ["a"], "deadLetter": {"enabled": False}}), BUS).dead_letter is None


# --- Consumer ----------------------------------------------------------------------------------


def test_consumer_of_all_names_filters_every_subject() -> None:
    config = _desired.consumer_config(consumer({"ackWait": "2m", "maxDeliver": 4, "backoff": ["1s"]}),
                                      topic({"tasks": ["a", "b"]}), BUS)
    assert config.durable_name == "mailer"
    assert config.filter_subject is None
    assert config.filter_subjects == ["acme.shop.orders.a", "acme.shop.orders.b"]
    assert config.ack_wait == 120.0
    # One delivery more than the spec, so the worker dead-letters the last failure itself.
    assert config.max_deliver == 5
    assert str(config.ack_policy.value) == "explicit"
    assert config.metadata is not None and config.metadata["eventrails.dev/handler"] == "shop.workers:worker"


def test_consumer_of_one_name_uses_a_single_filter() -> None:
    config = _desired.consumer_config(consumer({"names": ["b"]}), topic({"tasks": ["a", "b"]}), BUS)
    assert config.filter_subject == "acme.shop.orders.b"
    assert config.filter_subjects is None


def test_unknown_names_are_reported() -> None:
    assert _desired.unknown_names(consumer({"names": ["b", "zz", "aa"]}), topic({"tasks": ["a", "b"]})) == ["aa", "zz"]
    assert _desired.unknown_names(consumer({}), topic({"tasks": ["a"]})) == []


# --- Worker settings and env -------------------------------------------------------------------


def test_worker_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _desired.worker_settings(
        consumer({"concurrency": 4, "ackWait": "45s", "maxDeliver": 7, "backoff": ["2s", "1m"]}),
        topic({"tasks": ["a"], "deadLetter": {"enabled": False}}), BUS,
    )
    env = settings.to_env()
    assert env["EVENTRAILS_NATS_SERVERS"] == "nats://nats-a:4222,nats://nats-b:4222"
    assert env["EVENTRAILS_HANDLER"] == "shop.workers:worker"
    assert env["EVENTRAILS_BACKOFF"] == "2.0,60.0"
    assert env["EVENTRAILS_DEAD_LETTER"] == "false"

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert WorkerSettings() == settings


def test_deployment_runs_the_worker_with_its_env_probes_and_security() -> None:
    spec_consumer, spec_topic = consumer({"replicas": 3}), topic({"tasks": ["a"]})
    deployment = _desired.worker_deployment(spec_consumer, spec_topic, BUS, "registry.example/worker:1")

    assert deployment["metadata"]["name"] == "mailer-worker"
    assert deployment["metadata"]["namespace"] == "shop"
    assert deployment["spec"]["replicas"] == 3
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"eventrails.dev/consumer": "mailer"}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()

    container = container_of(deployment)
    assert container["image"] == "registry.example/worker:1"
    assert container["command"] == ["eventrails", "worker", "shop.workers:worker"]
    expected_env = _desired.worker_settings(spec_consumer, spec_topic, BUS).to_env()
    assert env_of(deployment) == expected_env
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": _desired.WORKER_PORT, "protocol": "TCP"}]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # A read-only root filesystem still needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_image_from_the_consumer_wins_and_autoscaling_starts_at_its_minimum() -> None:
    deployment = _desired.worker_deployment(
        consumer({"image": "own/image:2", "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}),
        topic({"tasks": ["a"]}), BUS, "default/image:1",
    )
    assert container_of(deployment)["image"] == "own/image:2"
    assert deployment["spec"]["replicas"] == 2


def test_template_overlay_merges_into_the_pod() -> None:
    overlay = {
        "env": [{"name": "EVENTRAILS_CONCURRENCY", "value": "99"}, {"name": "APP_MODE", "value": "batch"}],
        "resources": {"limits": {"memory": "256Mi"}},
        "serviceAccountName": "mailer",
        "nodeSelector": {"pool": "workers"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "labels": {"team": "growth", "eventrails.dev/consumer": "spoofed"},
        "annotations": {"prometheus.io/scrape": "true"},
        "hostNetwork": False,
    }
    spec_consumer = consumer({"template": overlay})
    original = copy.deepcopy(spec_consumer.spec.template)

    deployment = _desired.worker_deployment(spec_consumer, topic({"tasks": ["a"]}), BUS, "img")

    env = env_of(deployment)
    assert env["EVENTRAILS_CONCURRENCY"] == "99"
    assert env["APP_MODE"] == "batch"
    assert [item["name"] for item in container_of(deployment)["env"]].count("EVENTRAILS_CONCURRENCY") == 1
    assert container_of(deployment)["resources"] == {"limits": {"memory": "256Mi"}}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mailer"
    assert pod["nodeSelector"] == {"pool": "workers"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["hostNetwork"] is False
    metadata = deployment["spec"]["template"]["metadata"]
    assert metadata["labels"]["team"] == "growth"
    # The selector label cannot be overridden, or the Deployment would lose its pods.
    assert metadata["labels"]["eventrails.dev/consumer"] == "mailer"
    assert metadata["annotations"] == {"prometheus.io/scrape": "true"}
    assert spec_consumer.spec.template == original


# --- Credentials -------------------------------------------------------------------------------


def bus_with(spec: dict[str, Any]) -> BusConnection:
    return BusConnection.from_spec("main", EventBusSpec.model_validate({"servers": ["tls://nats:4222"], **spec}))


def test_user_password_credentials_come_from_secret_refs() -> None:
    bus = bus_with({"credentials": {"secretName": "nats-user", "kind": "userPassword"}})
    deployment = _desired.worker_deployment(consumer({}), topic({"tasks": ["a"]}), bus, "img")
    env = env_of(deployment)
    assert env["EVENTRAILS_NATS_USER"] == {"secretKeyRef": {"name": "nats-user", "key": "username"}}
    assert env["EVENTRAILS_NATS_PASSWORD"] == {"secretKeyRef": {"name": "nats-user", "key": "password"}}
    assert [volume["name"] for volume in deployment["spec"]["template"]["spec"]["volumes"]] == ["tmp"]


@pytest.mark.parametrize(("kind", "variable", "key"), [
    ("creds", "EVENTRAILS_NATS_CREDS_FILE", "creds"),
    ("nkey", "EVENTRAILS_NATS_NKEY_SEED_FILE", "seed"),
])
def test_file_credentials_are_mounted_from_the_secret(kind: str, variable: str, key: str) -> None:
    bus = bus_with({"credentials": {"secretName": "nats-auth", "kind": kind}, "tlsSecret": "nats-ca"})
    deployment = _desired.worker_deployment(consumer({}), topic({"tasks": ["a"]}), bus, "img")

    env = env_of(deployment)
    assert env[variable] == f"/etc/eventrails/nats/{key}"
    assert env["EVENTRAILS_NATS_TLS_CA_FILE"] == "/etc/eventrails/tls/ca.crt"
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["nats-credentials"]["secret"] == {"secretName": "nats-auth"}
    assert volumes["nats-tls"]["secret"] == {"secretName": "nats-ca"}
    mounts = {mount["name"]: mount for mount in container_of(deployment)["volumeMounts"]}
    assert mounts["nats-credentials"]["readOnly"] is True
    assert mounts["nats-tls"]["mountPath"] == "/etc/eventrails/tls"


def test_bus_connection_from_spec() -> None:
    bus = bus_with({"jetstreamDomain": "hub", "subjectPrefix": "acme.prod",
                    "credentials": {"secretName": "s", "kind": "creds"}, "tlsSecret": "t"})
    assert bus == BusConnection(
        servers=("tls://nats:4222",), subject_prefix="acme.prod", jetstream_domain="hub",
        credentials_secret="s", credentials_kind="creds", tls_secret="t", name="main",
    )


# --- KEDA ScaledObject ---------------------------------------------------------------------------


def test_scaled_object_scales_the_workers_on_consumer_lag() -> None:
    scaled = _desired.scaled_object(
        consumer({"autoscaling": {"minReplicas": 0, "maxReplicas": 8, "lagTarget": 250}}), BUS,
    )

    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["kind"] == "ScaledObject"
    assert scaled["metadata"]["name"] == "mailer-worker"
    assert scaled["metadata"]["namespace"] == "shop"
    assert scaled["metadata"]["labels"]["eventrails.dev/consumer"] == "mailer"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mailer-worker"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 8)
    assert spec["triggers"] == [{
        "type": "nats-jetstream",
        "metadata": {
            # The first server's host, on the NATS monitoring port.
            "natsServerMonitoringEndpoint": "nats-a:8222",
            "account": "$G",
            "stream": "shop_orders",
            "consumer": "mailer",
            "lagThreshold": "250",
            "useHttps": "false",
        },
    }]


def test_scaled_object_uses_the_buses_monitoring_endpoint_and_account() -> None:
    bus = BusConnection.from_spec(
        "main", EventBusSpec.model_validate({"servers": ["nats://nats:4222"]}),
        monitoring_endpoint="https://nats-monitor.nats:8443", account="ABCD1234",
    )
    scaled = _desired.scaled_object(consumer({"autoscaling": {}}), bus, monitoring_port=9999)

    metadata = scaled["spec"]["triggers"][0]["metadata"]
    assert metadata["natsServerMonitoringEndpoint"] == "nats-monitor.nats:8443"
    assert metadata["useHttps"] == "true"
    assert metadata["account"] == "ABCD1234"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 10)
    assert metadata["lagThreshold"] == "100"


def test_scaled_object_port_comes_from_the_operator_settings() -> None:
    scaled = _desired.scaled_object(consumer({"autoscaling": {"maxReplicas": 3}}), BUS, monitoring_port=9222)
    assert scaled["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"] == "nats-a:9222"


def test_scaled_object_needs_autoscaling() -> None:
    with pytest.raises(ValueError, match="has no spec.autoscaling: it runs fixed replicas"):
        _desired.scaled_object(consumer({"replicas": 2}), BUS)


def test_autoscaled_deployment_starts_at_the_minimum_but_never_at_zero() -> None:
    scaled_to_zero = consumer({"autoscaling": {"minReplicas": 0, "maxReplicas": 4}})
    at_least_two = consumer({"autoscaling": {"minReplicas": 2, "maxReplicas": 4}})
    assert _desired.worker_deployment(scaled_to_zero, topic({"tasks": ["a"]}), BUS, "img")["spec"]["replicas"] == 1
    assert _desired.worker_deployment(at_least_two, topic({"tasks": ["a"]}), BUS, "img")["spec"]["replicas"] == 2
