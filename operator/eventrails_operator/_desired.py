"""Pure functions from custom resources to the JetStream and Kubernetes objects they imply.

Nothing here talks to a server, so every rule about names, limits and pod wiring is
unit-tested without one. The reconcilers compare these results with live objects.
"""

from __future__ import annotations

import copy
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from eventrails import _naming
from eventrails._durations import parse_duration
from eventrails._resources import Consumer, EventBusSpec, Topic
from eventrails._settings import WorkerSettings

METADATA_PREFIX = "eventrails.dev/"
MANAGED_BY = "eventrails-operator"
WORKER_PORT = 8080
KEDA_API_VERSION = "keda.sh/v1alpha1"
# The account KEDA's nats-jetstream scaler reads when the server runs without accounts.
NATS_GLOBAL_ACCOUNT = "$G"


@dataclass(frozen=True)
class BusConnection:
    """A resolved EventBus: what the operator and the workers use to reach NATS."""

    servers: tuple[str, ...]
    subject_prefix: str = "eventrails"
    jetstream_domain: str | None = None
    credentials_secret: str | None = None
    credentials_kind: str | None = None
    tls_secret: str | None = None
    name: str = "default"
    # Where KEDA reads consumer lag ([https://]host:port of the NATS monitoring endpoint),
    # and in which NATS account; derived from the servers and NATS_GLOBAL_ACCOUNT when unset.
    monitoring_endpoint: str | None = None
    account: str | None = None

    @classmethod
    def from_spec(
        cls, name: str, spec: EventBusSpec, *, monitoring_endpoint: str | None = None, account: str | None = None,
    ) -> BusConnection:
        return cls(
            servers=tuple(spec.servers),
            subject_prefix=spec.subject_prefix,
            jetstream_domain=spec.jetstream_domain,
            credentials_secret=spec.credentials.secret_name if spec.credentials else None,
            credentials_kind=str(spec.credentials.kind) if spec.credentials else None,
            tls_secret=spec.tls_secret,
            name=name,
            monitoring_endpoint=monitoring_endpoint,
            account=account,
        )

    def monitoring_address(self, default_port: int) -> str:
        """Return the host:port of the NATS monitoring endpoint: the explicit one, else the first server's host."""
        if self.monitoring_endpoint:
            return self.monitoring_endpoint
        host = urllib.parse.urlsplit(self.servers[0]).hostname or "localhost"
        return f"{host}:{default_port}"


@dataclass(frozen=True)
class TopicStreams:
    """The stream of a Topic and its optional dead-letter companion."""

    stream: StreamConfig
    dead_letter: StreamConfig | None
    subjects: list[str] = field(default_factory=list)


def _metadata(resource: Topic | Consumer, extra: dict[str, str]) -> dict[str, str]:
    base = {
        f"{METADATA_PREFIX}kind": resource.kind,
        f"{METADATA_PREFIX}namespace": resource.metadata.namespace,
        f"{METADATA_PREFIX}name": resource.metadata.name,
        f"{METADATA_PREFIX}managed-by": MANAGED_BY,
    }
    base.update(extra)
    return base


def topic_streams(topic: Topic, bus: BusConnection) -> TopicStreams:
    """Return the desired stream configurations of a Topic.

    The payload contract travels in the stream metadata, so publishers and workers read
    the rules from JetStream itself instead of from a second copy of the manifest.
    """
    spec = topic.spec
    namespace, name = topic.metadata.namespace, topic.metadata.name
    subjects = _naming.topic_subjects(bus.subject_prefix, namespace, name, spec.names)
    if spec.delayed_delivery:
        subjects.append(_naming.schedule_wildcard(bus.subject_prefix, namespace, name))

    max_age = parse_duration(spec.limits.max_age) if spec.limits.max_age else 0.0
    duplicate_window = parse_duration(spec.duplicate_window)
    if max_age and duplicate_window > max_age:
        # nats-server rejects a duplicate window longer than the maximum age.
        duplicate_window = max_age

    metadata = _metadata(topic, {
        f"{METADATA_PREFIX}topic-kind": spec.kind,
        f"{METADATA_PREFIX}names": ",".join(spec.names),
        f"{METADATA_PREFIX}required-keys": ",".join(spec.payload.required_keys),
        f"{METADATA_PREFIX}exempt": ",".join(spec.payload.exempt),
    })
    stream = StreamConfig(
        name=_naming.stream_name(namespace, name),
        description=f"eventrails Topic {namespace}/{name}",
        subjects=subjects,
        retention=RetentionPolicy(spec.effective_retention),
        storage=StorageType(str(spec.storage)),
        num_replicas=spec.replicas,
        max_age=max_age,
        max_bytes=spec.limits.max_bytes or -1,
        max_msgs=spec.limits.max_messages or -1,
        duplicate_window=duplicate_window,
        discard=DiscardPolicy.OLD,
        allow_msg_schedules=True if spec.delayed_delivery else None,
        metadata=metadata,
    )

    dead_letter = None
    if spec.dead_letter.enabled:
        dead_letter = StreamConfig(
            name=_naming.dead_letter_stream_name(namespace, name),
            description=f"eventrails dead letters of Topic {namespace}/{name}",
            subjects=[_naming.dead_letter_wildcard(bus.subject_prefix, namespace, name)],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType(str(spec.storage)),
            num_replicas=spec.replicas,
            max_age=parse_duration(spec.dead_letter.max_age),
            max_bytes=-1,
            max_msgs=-1,
            duplicate_window=min(120.0, parse_duration(spec.dead_letter.max_age)),
            discard=DiscardPolicy.OLD,
            metadata=_metadata(topic, {f"{METADATA_PREFIX}role": "dead-letter"}),
        )
    return TopicStreams(stream=stream, dead_letter=dead_letter, subjects=subjects)


def consumer_config(consumer: Consumer, topic: Topic, bus: BusConnection) -> ConsumerConfig:
    """Return the desired durable pull consumer of a Consumer resource.

    The server's max_deliver is one above the spec's, so a worker that dies during the
    last allowed delivery still sees the message once more and dead-letters it, instead
    of the server dropping it silently.
    """
    spec = consumer.spec
    namespace = consumer.metadata.namespace
    names = spec.names or topic.spec.names
    filters = _naming.topic_subjects(bus.subject_prefix, namespace, topic.metadata.name, names)
    return ConsumerConfig(
        name=_naming.consumer_name(consumer.metadata.name),
        durable_name=_naming.consumer_name(consumer.metadata.name),
        description=f"eventrails Consumer {namespace}/{consumer.metadata.name}",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=parse_duration(spec.ack_wait),
        max_deliver=spec.max_deliver + 1,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        metadata=_metadata(consumer, {f"{METADATA_PREFIX}handler": spec.handler}),
    )


def unknown_names(consumer: Consumer, topic: Topic) -> list[str]:
    """Return the names a Consumer asks for that its Topic does not declare."""
    return sorted(set(consumer.spec.names or []) - set(topic.spec.names))


class _ExplicitWorkerSettings(WorkerSettings):
    """WorkerSettings built from the given values and defaults only, never from the environment.

    The operator (or local mode) computing them has EVENTRAILS_* variables of its own, such
    as a NATS password, which must not reach worker Deployments.
    """

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: Any, init_settings: Any, env_settings: Any, dotenv_settings: Any, file_secret_settings: Any,
    ) -> tuple[Any, ...]:
        return (init_settings,)


def worker_settings(consumer: Consumer, topic: Topic, bus: BusConnection) -> WorkerSettings:
    """Return the settings a worker process of this Consumer runs with."""
    spec = consumer.spec
    explicit = _ExplicitWorkerSettings(
        nats_servers=list(bus.servers),
        jetstream_domain=bus.jetstream_domain,
        subject_prefix=bus.subject_prefix,
        namespace=consumer.metadata.namespace,
        handler=spec.handler,
        topic=topic.metadata.name,
        consumer=_naming.consumer_name(consumer.metadata.name),
        concurrency=spec.concurrency,
        ack_wait=parse_duration(spec.ack_wait),
        max_deliver=spec.max_deliver,
        backoff=[parse_duration(item) for item in spec.backoff],
        dead_letter=topic.spec.dead_letter.enabled,
        health_port=WORKER_PORT,
    )
    # A plain WorkerSettings with the validated values, without reading the environment again.
    return WorkerSettings.model_construct(**explicit.model_dump())


def _credential_env_and_volumes(bus: BusConnection) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if bus.credentials_secret and bus.credentials_kind == "userPassword":
        for variable, key in (("EVENTRAILS_NATS_USER", "username"), ("EVENTRAILS_NATS_PASSWORD", "password")):
            env.append({"name": variable, "valueFrom": {"secretKeyRef": {"name": bus.credentials_secret, "key": key}}})
    elif bus.credentials_secret:
        key = "creds" if bus.credentials_kind == "creds" else "seed"
        volumes.append({"name": "nats-credentials", "secret": {"secretName": bus.credentials_secret}})
        mounts.append({"name": "nats-credentials", "mountPath": "/etc/eventrails/nats", "readOnly": True})
        variable = "EVENTRAILS_NATS_CREDS_FILE" if key == "creds" else "EVENTRAILS_NATS_NKEY_SEED_FILE"
        env.append({"name": variable, "value": f"/etc/eventrails/nats/{key}"})
    if bus.tls_secret:
        volumes.append({"name": "nats-tls", "secret": {"secretName": bus.tls_secret}})
        mounts.append({"name": "nats-tls", "mountPath": "/etc/eventrails/tls", "readOnly": True})
        env.append({"name": "EVENTRAILS_NATS_TLS_CA_FILE", "value": "/etc/eventrails/tls/ca.crt"})
    return env, volumes, mounts


def _merge_env(base: list[dict[str, Any]], overlay: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = {item["name"]: item for item in base}
    for item in overlay:
        merged[item["name"]] = item
    return list(merged.values())


def worker_labels(consumer: Consumer) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "eventrails-worker",
        "app.kubernetes.io/instance": consumer.metadata.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "eventrails.dev/consumer": consumer.metadata.name,
        "eventrails.dev/topic": consumer.spec.topic,
    }


def worker_deployment(consumer: Consumer, topic: Topic, bus: BusConnection, default_image: str) -> dict[str, Any]:
    """Return the worker Deployment of a Consumer, with the pod template overlay applied.

    Owner references are added by the caller, which knows the live object's uid.
    """
    spec = consumer.spec
    overlay = copy.deepcopy(spec.template)
    labels = worker_labels(consumer)
    selector = {"eventrails.dev/consumer": consumer.metadata.name}

    settings_env = [{"name": key, "value": value} for key, value in sorted(worker_settings(consumer, topic, bus).to_env().items())]
    credential_env, volumes, mounts = _credential_env_and_volumes(bus)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})

    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.image or default_image,
        "command": ["eventrails", "worker", spec.handler],
        "env": _merge_env(settings_env + credential_env, overlay.pop("env", [])),
        "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if "resources" in overlay:
        container["resources"] = overlay.pop("resources")

    drain = _ExplicitWorkerSettings().drain_timeout
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": int(drain) + 5,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    pod_labels = {**overlay.pop("labels", {}), **labels}
    pod_annotations = overlay.pop("annotations", {})
    for key in ("serviceAccountName", "nodeSelector", "tolerations", "affinity", "priorityClassName",
                "topologySpreadConstraints", "imagePullSecrets"):
        if key in overlay:
            pod_spec[key] = overlay.pop(key)
    # Any remaining overlay keys are pod spec fields the user knows about; pass them through.
    pod_spec.update(overlay)

    template_metadata: dict[str, Any] = {"labels": pod_labels}
    if pod_annotations:
        template_metadata["annotations"] = pod_annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": _naming.deployment_name(consumer.metadata.name),
            "namespace": consumer.metadata.namespace,
            "labels": labels,
        },
        "spec": {
            "replicas": spec.effective_replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": template_metadata, "spec": pod_spec},
        },
    }


def scaled_object(consumer: Consumer, bus: BusConnection, *, monitoring_port: int = 8222) -> dict[str, Any]:
    """Return the KEDA ScaledObject that scales a Consumer's workers on its consumer lag.

    KEDA's ``nats-jetstream`` scaler reads the consumer's pending count from the NATS
    monitoring endpoint and aims for ``lagTarget`` pending messages per pod. Owner
    references are added by the caller, which knows the live object's uid. Raises
    ValueError for a Consumer without ``spec.autoscaling``.
    """
    autoscaling = consumer.spec.autoscaling
    if autoscaling is None:
        raise ValueError(f"Consumer {consumer.metadata.name!r} has no spec.autoscaling: it runs fixed replicas")
    namespace, name = consumer.metadata.namespace, consumer.metadata.name
    deployment = _naming.deployment_name(name)
    # An explicit endpoint may start with https://, and KEDA takes host:port plus a flag.
    endpoint = bus.monitoring_address(monitoring_port)
    use_https = endpoint.startswith("https://")
    address = endpoint.split("://", 1)[-1]
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": {"name": deployment, "namespace": namespace, "labels": worker_labels(consumer)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "triggers": [{
                "type": "nats-jetstream",
                "metadata": {
                    "natsServerMonitoringEndpoint": address,
                    "account": bus.account or NATS_GLOBAL_ACCOUNT,
                    "stream": _naming.stream_name(namespace, consumer.spec.topic),
                    "consumer": _naming.consumer_name(name),
                    # KEDA reads trigger metadata as strings.
                    "lagThreshold": str(autoscaling.lag_target),
                    "useHttps": "true" if use_https else "false",
                },
            }],
        },
    }
