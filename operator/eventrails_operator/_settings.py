"""Operator settings, read from ``EVENTRAILS_OPERATOR_*`` environment variables.

The defaults suit a cluster with about a thousand Topics and Consumers per operator;
docs/operator.md explains each knob and what to change for larger or smaller clusters.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EventLevel = Literal["debug", "info", "warning", "error"]


class OperatorSettings(BaseSettings):
    """Settings of the operator process, beyond what its custom resources say.

    ``default_nats_servers`` is the last step of bus resolution: a Topic that names no
    EventBus, in a namespace without an EventBus called ``default``, uses these servers.
    """

    model_config = SettingsConfigDict(env_prefix="EVENTRAILS_OPERATOR_", extra="ignore")

    default_nats_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nats://nats:4222"],
        description="Comma-separated NATS server URLs used when a namespace has no EventBus.",
    )
    default_subject_prefix: str = Field(
        default="eventrails", description="Subject prefix used with the default NATS servers."
    )
    worker_image: str = Field(
        # The image docker/worker.Dockerfile builds, tagged with this release (as the chart does).
        default_factory=lambda: f"ghcr.io/eventrails/worker:{importlib.metadata.version('eventrails')}",
        description="Image of worker pods whose Consumer names none.",
    )
    resync_interval: float = Field(
        default=60.0, gt=0,
        description="Seconds between periodic reconciles that repair drift and refresh status figures.",
    )
    retry_delay_min: float = Field(default=5.0, gt=0, description="First retry delay after a temporary error.")
    retry_delay_max: float = Field(default=300.0, gt=0, description="Longest retry delay after temporary errors.")

    # --- High availability (kopf peering) ---
    peering_name: str | None = Field(
        default=None,
        description="kopf peering object shared by operator replicas so that one acts; standalone when unset.",
    )
    peering_priority: int | None = Field(
        default=None, ge=0,
        description="Priority of this replica among its peers; the highest acts. A random one when unset, "
        "because replicas of equal priority would all pause.",
    )
    peering_lifetime: int = Field(
        default=60, ge=5,
        description="Seconds after which a replica that stopped sending keep-alives counts as gone.",
    )

    # --- Load: limits that keep a thousand objects from flooding the API server ---
    worker_limit: int | None = Field(
        default=64, ge=1,
        description="Reconciles (changes, resyncs) that run at once; empty for no limit.",
    )
    kube_requests_per_second: float = Field(
        default=50.0, gt=0,
        description="Sustained rate of the handlers' own Kubernetes API requests (reads, Deployment and "
        "ScaledObject writes); kopf's watches and its patches (finalizer, status, annotations) are not paced by it.",
    )
    kube_burst: int = Field(default=100, ge=1, description="Requests allowed at once above the sustained rate.")
    kube_connection_limit: int = Field(
        default=16, ge=1, description="Open connections of the handlers' Kubernetes API client."
    )
    kube_request_timeout: float = Field(default=30.0, gt=0, description="Seconds one Kubernetes API request may take.")

    # --- Events, metrics, liveness ---
    post_events: bool = Field(default=True, description="Post Kubernetes Events about reconciles.")
    event_level: EventLevel = Field(
        default="info",
        description="Lowest level of the handlers' log lines posted as Events: 'info' posts what changed "
        "(a stream created, a Deployment updated), 'warning' only problems.",
    )
    event_worker_limit: int = Field(default=8, ge=1, description="Events posted at once.")
    liveness_endpoint: str | None = Field(
        default="http://0.0.0.0:8080/healthz", description="kopf liveness endpoint; empty to disable."
    )
    metrics_port: int = Field(
        default=9090, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 disables it."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the /metrics endpoint binds.")

    # --- KEDA ---
    keda: Literal["auto", "off"] = Field(
        default="auto",
        description="'auto' creates a KEDA ScaledObject for Consumers with spec.autoscaling when KEDA's "
        "ScaledObject resource is served; 'off' always runs fixed replicas.",
    )
    keda_check_interval: float = Field(
        default=60.0, gt=0, description="Seconds between checks whether KEDA's ScaledObject resource is served."
    )
    nats_monitoring_port: int = Field(
        default=8222, ge=1, le=65535,
        description="Port of the NATS monitoring endpoint that KEDA's nats-jetstream scaler reads, on the host "
        "of the bus's first server, unless the EventBus annotation eventrails.dev/nats-monitoring-endpoint says otherwise.",
    )

    kube_api_server: str | None = Field(
        default=None,
        description="Talk to this Kubernetes API URL without credentials (such as `kubectl proxy` on "
        "http://127.0.0.1:8001) instead of the in-cluster service account or kubeconfig.",
    )
    nats_connect_timeout: float = Field(default=5.0, gt=0, description="Seconds to wait for a NATS connection.")
    nats_request_timeout: float = Field(default=5.0, gt=0, description="Seconds to wait for a JetStream API reply.")

    @field_validator("default_nats_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("liveness_endpoint", "peering_name", "kube_api_server", "peering_priority", "worker_limit",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("event_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def event_level_number(self) -> int:
        return int(logging.getLevelName(self.event_level.upper()))
