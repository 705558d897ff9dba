"""Operator settings, read from ``EVENTRAILS_OPERATOR_*`` environment variables."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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
        default="ghcr.io/eventrails/eventrails:latest",
        description="Image of worker pods whose Consumer names none.",
    )
    resync_interval: float = Field(
        default=60.0, gt=0,
        description="Seconds between periodic reconciles that repair drift and refresh status figures.",
    )
    retry_delay_min: float = Field(default=5.0, gt=0, description="First retry delay after a temporary error.")
    retry_delay_max: float = Field(default=300.0, gt=0, description="Longest retry delay after temporary errors.")
    peering_name: str | None = Field(
        default=None,
        description="kopf peering object shared by operator replicas so that one acts; standalone when unset.",
    )
    post_events: bool = Field(default=True, description="Post Kubernetes Events about reconciles.")
    liveness_endpoint: str | None = Field(
        default="http://0.0.0.0:8080/healthz", description="kopf liveness endpoint; empty to disable."
    )
    metrics_port: int = Field(
        default=9090, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 disables it."
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

    @field_validator("liveness_endpoint", "peering_name", "kube_api_server", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value
