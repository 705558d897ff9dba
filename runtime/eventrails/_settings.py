"""Settings read from ``EVENTRAILS_*`` environment variables by the process entry points.

The operator writes these variables into worker Deployments and local mode passes the
same ones to worker processes, so ``WorkerSettings.to_env`` is the one place that
defines the contract between them.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from eventrails import _naming
from eventrails._durations import parse_duration


class NatsSettings(BaseSettings):
    """How a process connects to NATS."""

    model_config = SettingsConfigDict(env_prefix="EVENTRAILS_", extra="ignore")

    nats_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        description="Comma-separated NATS server URLs.",
    )
    nats_creds_file: str | None = Field(default=None, description="Path of a NATS JWT creds file.")
    nats_nkey_seed_file: str | None = Field(default=None, description="Path of an NKey seed file.")
    nats_user: str | None = Field(default=None, description="NATS user name.")
    nats_password: str | None = Field(default=None, description="NATS password.", repr=False)
    nats_tls_ca_file: str | None = Field(default=None, description="CA bundle that signs the NATS server certificate.")
    nats_tls_cert_file: str | None = Field(default=None, description="Client certificate for mutual TLS.")
    nats_tls_key_file: str | None = Field(default=None, description="Client key for mutual TLS.")
    jetstream_domain: str | None = Field(default=None, description="JetStream domain; empty for the default.")
    subject_prefix: str = Field(default="eventrails", description="First subject token(s) of derived subjects.")
    namespace: str = Field(default="default", description="Kubernetes namespace the topics live in.")

    @field_validator("nats_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


class WorkerSettings(NatsSettings):
    """Everything ``eventrails worker`` needs to own one consumer."""

    handler: str = Field(default="", description="Worker object as 'module:object'.")
    topic: str = Field(default="", description="Topic resource name.")
    consumer: str = Field(default="", description="Consumer resource name, which is also the durable name.")
    concurrency: int = Field(default=16, ge=1, description="Messages handled at once.")
    ack_wait: float = Field(default=30.0, gt=0, description="Ack wait in seconds.")
    max_deliver: int = Field(default=5, ge=1, description="Deliveries before dead-lettering.")
    backoff: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 10.0, 60.0], description="Redelivery delays in seconds, comma-separated."
    )
    dead_letter: bool = Field(default=True, description="Publish failed messages to the dead-letter stream.")
    health_port: int = Field(default=8080, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics; 0 picks a free port.")
    health_host: str = Field(default="0.0.0.0", description="Address the health server binds.")
    publish_outcomes: bool = Field(
        default=False, description="Announce each outcome on a core NATS subject, for local mode and tests."
    )
    drain_timeout: float = Field(default=25.0, ge=0, description="Seconds in-flight handlers get after SIGTERM.")

    @field_validator("backoff", mode="before")
    @classmethod
    def _split_backoff(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [parse_duration(item.strip()) if item.strip()[-1].isalpha() else float(item) for item in text.split(",") if item.strip()]
        return value

    @property
    def stream(self) -> str:
        return _naming.stream_name(self.namespace, self.topic)

    @property
    def dead_letter_stream(self) -> str:
        return _naming.dead_letter_stream_name(self.namespace, self.topic)

    def to_env(self) -> dict[str, str]:
        """Return the environment variables that reproduce these settings, without empty values."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None or value == "":
                continue
            key = f"EVENTRAILS_{name.upper()}"
            if isinstance(value, list):
                env[key] = ",".join(str(item) for item in value)
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
        return env
