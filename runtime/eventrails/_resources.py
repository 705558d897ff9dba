"""Custom resources of the eventrails.dev API: the one source of their schemas.

The pydantic models below validate manifests in local mode and in the operator, and
``eventrails._crdgen`` renders the CustomResourceDefinitions in ``crds/`` from them.
Rules that the API server checks with CEL are declared next to the fields they guard
(``_cel``) and mirrored by pydantic validators, so a manifest is rejected with the
same rule whichever way it arrives.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from eventrails._durations import Duration, parse_duration

GROUP = "eventrails.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes object names of eventrails kinds are DNS labels, because they become
# parts of JetStream stream, consumer and subject names (which forbid dots).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 63
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
TASK_NAME_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
EVENT_NAME_PATTERN = r"^[A-Z][a-zA-Z0-9]*$"
HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
SUBJECT_TOKEN_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
PAYLOAD_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
DEFAULT_TENANCY_KEYS = ("organizationId", "projectId")

TaskName = Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN, max_length=63)]
EventName = Annotated[str, StringConstraints(pattern=EVENT_NAME_PATTERN, max_length=63)]
PayloadKey = Annotated[str, StringConstraints(pattern=PAYLOAD_KEY_PATTERN, max_length=253)]
ServerUrl = Annotated[str, StringConstraints(pattern=r"^(nats|tls|ws|wss)://.+")]


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    validation = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True, validate_default=True)


# --- EventBus --------------------------------------------------------------------------------


class CredentialsKind(str, enum.Enum):
    creds = "creds"
    nkey = "nkey"
    user_password = "userPassword"


class BusCredentials(_Model):
    """How workers authenticate to NATS, from a Secret in the bus's namespace."""

    secret_name: str = Field(
        alias="secretName", pattern=SUBDOMAIN_PATTERN,
        description="Name of the Secret that holds the credentials.",
    )
    kind: CredentialsKind = Field(
        description="Credential form: 'creds' (a JWT creds file under key 'creds'), 'nkey' "
        "(a seed under key 'seed') or 'userPassword' (keys 'username' and 'password').",
    )


class EventBusSpec(_Model):
    """Connection settings for a NATS JetStream system."""

    servers: list[ServerUrl] = Field(
        min_length=1, description="NATS server URLs, such as nats://nats.nats.svc:4222."
    )
    credentials: BusCredentials | None = Field(
        default=None, description="Secret with the credentials workers and the operator use; none for an open server."
    )
    tls_secret: str | None = Field(
        default=None, alias="tlsSecret", pattern=SUBDOMAIN_PATTERN,
        description="Name of a Secret with 'ca.crt' and optionally 'tls.crt' and 'tls.key' for TLS to NATS.",
    )
    jetstream_domain: str | None = Field(
        default=None, alias="jetstreamDomain", pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream domain to address, for leaf-node setups; empty for the default domain.",
    )
    subject_prefix: str = Field(
        default="eventrails", alias="subjectPrefix", pattern=SUBJECT_TOKEN_PATTERN,
        description="First subject token(s) of every subject eventrails derives on this bus.",
    )


# --- Topic -----------------------------------------------------------------------------------


class Retention(str, enum.Enum):
    workqueue = "workqueue"
    limits = "limits"
    interest = "interest"


class Storage(str, enum.Enum):
    file = "file"
    memory = "memory"


class DeletionPolicy(str, enum.Enum):
    retain = "Retain"
    delete = "Delete"


class TopicLimits(_Model):
    """Retention limits of the stream; an unset limit means unlimited."""

    max_age: Duration | None = Field(
        default=None, alias="maxAge",
        description="Oldest message age kept, such as '168h' or '7d'.",
    )
    max_bytes: int | None = Field(default=None, alias="maxBytes", ge=1, description="Stream size limit in bytes.")
    max_messages: int | None = Field(default=None, alias="maxMessages", ge=1, description="Message count limit.")


class DeadLetterSettings(_Model):
    """The companion stream that keeps messages which could not be handled."""

    enabled: bool = Field(default=True, description="Create the dead-letter stream for this topic.")
    max_age: Duration = Field(
        default="14d", alias="maxAge",
        description="How long dead-lettered messages are kept.",
    )


class PayloadContract(_Model):
    """Rules every payload on the topic must follow, checked by publishers and workers."""

    required_keys: list[PayloadKey] = Field(
        default_factory=lambda: list(DEFAULT_TENANCY_KEYS), alias="requiredKeys",
        description="Keys every payload must carry with a non-empty value (the tenancy keys).",
    )
    exempt: list[str] = Field(
        default_factory=list,
        description="Task or event names whose payloads may omit the required keys.",
    )
    schemas: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Optional JSON Schema per task or event name.",
        json_schema_extra={"additionalProperties": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )


class TopicSpec(_Model):
    """One JetStream stream carrying either tasks (a queue) or domain events."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("has(self.tasks) != has(self.events)", "set exactly one of spec.tasks or spec.events"),
                _cel(
                    "!has(self.events) || !has(self.retention) || self.retention != 'workqueue'",
                    "a domain-event topic cannot use workqueue retention: use limits or interest",
                    ".retention",
                ),
                _cel(
                    "!has(oldSelf.storage) || self.storage == oldSelf.storage",
                    "spec.storage is immutable: create a new Topic to change it",
                    ".storage",
                ),
            ]
        }
    )

    bus: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="EventBus in this namespace; defaults to the bus named 'default', then the operator's settings.",
    )
    tasks: list[TaskName] | None = Field(
        default=None, min_length=1,
        description="Task names in lower-kebab-case, such as 'send-email'. Makes this a queue topic.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    events: list[EventName] | None = Field(
        default=None, min_length=1,
        description="Event names in PascalCase, such as 'InvoicePaid'. Makes this a domain-event topic.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    retention: Retention | None = Field(
        default=None,
        description="Stream retention: workqueue (default for tasks), limits (default for events) or interest.",
    )
    storage: Storage = Field(default=Storage.file, description="file or memory; immutable.")
    replicas: int = Field(default=1, ge=1, le=5, description="Stream replicas in a NATS cluster (1 to 5).")
    limits: TopicLimits = Field(default_factory=TopicLimits, description="Retention limits.")
    duplicate_window: Duration = Field(
        default="2m", alias="duplicateWindow",
        description="Window in which a repeated Nats-Msg-Id is dropped as a duplicate.",
    )
    dead_letter: DeadLetterSettings = Field(
        default_factory=DeadLetterSettings, alias="deadLetter", description="Dead-letter stream settings."
    )
    payload: PayloadContract = Field(default_factory=PayloadContract, description="Payload contract.")
    delayed_delivery: bool = Field(
        default=False, alias="delayedDelivery",
        description="Allow delayed and debounced messages (JetStream message schedules, nats-server 2.12+).",
    )
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.retain, alias="deletionPolicy",
        description="Retain keeps the stream when the Topic is deleted; Delete removes it and its messages.",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> TopicSpec:
        if (self.tasks is None) == (self.events is None):
            raise ValueError("set exactly one of spec.tasks or spec.events")
        if self.events is not None and self.retention == Retention.workqueue.value:
            raise ValueError("a domain-event topic cannot use workqueue retention: use limits or interest")
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, found duplicates in {names}")
        unknown = sorted(set(self.payload.exempt) - set(names))
        if unknown:
            raise ValueError(f"payload.exempt names {unknown} are not declared by this topic")
        unknown = sorted(set(self.payload.schemas) - set(names))
        if unknown:
            raise ValueError(f"payload.schemas names {unknown} are not declared by this topic")
        return self

    @property
    def names(self) -> list[str]:
        return list(self.tasks or self.events or [])

    @property
    def kind(self) -> Literal["tasks", "events"]:
        return "tasks" if self.tasks is not None else "events"

    @property
    def effective_retention(self) -> str:
        if self.retention is not None:
            return str(self.retention)
        return Retention.workqueue.value if self.tasks is not None else Retention.limits.value


# --- Consumer --------------------------------------------------------------------------------


class Autoscaling(_Model):
    """Scale workers on consumer lag with KEDA when its CRDs are installed."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
            ]
        }
    )

    min_replicas: int = Field(default=0, alias="minReplicas", ge=0, le=1000, description="Fewest worker pods.")
    max_replicas: int = Field(default=10, alias="maxReplicas", ge=1, le=1000, description="Most worker pods.")
    lag_target: int = Field(
        default=100, alias="lagTarget", ge=1, description="Pending messages per pod that triggers scaling out."
    )

    @model_validator(mode="after")
    def _check_range(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        return self


class ConsumerSpec(_Model):
    """A durable pull consumer on a Topic and the workers that drain it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.topic == oldSelf.topic", "spec.topic is immutable: create a new Consumer", ".topic"),
                _cel(
                    "!has(self.backoff) || size(self.backoff) < self.maxDeliver",
                    "backoff must have fewer entries than maxDeliver",
                    ".backoff",
                ),
                _cel("!(has(self.autoscaling) && has(self.replicas))", "set replicas or autoscaling, not both"),
            ]
        }
    )

    topic: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH, description="Topic in this namespace.")
    names: list[Annotated[str, StringConstraints(max_length=63)]] | None = Field(
        default=None, min_length=1,
        description="Subset of the topic's task or event names to consume; all names when unset.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    handler: str = Field(
        pattern=HANDLER_PATTERN,
        description="Worker object as 'module:object', such as 'billing.workers:worker'.",
    )
    image: str | None = Field(default=None, description="Worker image; defaults to the operator's worker image.")
    replicas: int | None = Field(default=None, ge=0, le=1000, description="Fixed worker pod count (default 1).")
    autoscaling: Autoscaling | None = Field(default=None, description="Scale on lag instead of fixed replicas.")
    concurrency: int = Field(default=16, ge=1, le=1024, description="Messages handled at once per pod.")
    ack_wait: Duration = Field(
        default="30s", alias="ackWait",
        description="Time a worker has to acknowledge before redelivery; heartbeats extend it.",
    )
    max_deliver: int = Field(
        default=5, alias="maxDeliver", ge=1, le=100,
        description="Deliveries before a failing message is dead-lettered.",
    )
    backoff: list[Duration] = Field(
        default_factory=lambda: ["1s", "10s", "1m"],
        description="Delay before each redelivery; the last entry repeats. Fewer entries than maxDeliver.",
        json_schema_extra={"maxItems": 99},
    )
    max_ack_pending: int = Field(
        default=1000, alias="maxAckPending", ge=1, description="Unacknowledged messages allowed across all workers."
    )
    template: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod template overlay merged into the worker Deployment: resources, env, serviceAccountName, "
        "nodeSelector, tolerations, affinity, labels and annotations.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _check_delivery(self) -> ConsumerSpec:
        if len(self.backoff) >= self.max_deliver:
            raise ValueError(
                f"backoff has {len(self.backoff)} entries but maxDeliver is {self.max_deliver}: "
                "use fewer backoff entries than maxDeliver"
            )
        if self.autoscaling is not None and self.replicas is not None:
            raise ValueError("set replicas or autoscaling, not both")
        if self.backoff and max(parse_duration(item) for item in self.backoff) <= 0:
            raise ValueError("backoff delays must be positive")
        return self

    @property
    def effective_replicas(self) -> int:
        if self.replicas is not None:
            return self.replicas
        if self.autoscaling is not None:
            return max(self.autoscaling.min_replicas, 1)
        return 1


# --- Status ----------------------------------------------------------------------------------


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: str = Field(description="Ready, Reconciling or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", description="Generation the condition was computed for."
    )
    last_transition_time: str = Field(
        alias="lastTransitionTime", description="When the status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class _Status(_Model):
    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", description="Generation of the spec last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Reconciling and Degraded conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    last_handled_configuration: str | None = Field(
        default=None, alias="lastHandledConfiguration",
        description="Spec, labels and annotations the operator last handled, as JSON: "
                    "a later difference is a change to apply.",
    )


class EventBusStatus(_Status):
    """Observed state of the EventBus."""

    server_version: str | None = Field(default=None, alias="serverVersion", description="NATS server version.")


class TopicStatus(_Status):
    """Observed state of the Topic's streams."""

    stream: str | None = Field(default=None, description="JetStream stream name.")
    dead_letter_stream: str | None = Field(default=None, alias="deadLetterStream", description="Dead-letter stream.")
    subjects: list[str] | None = Field(default=None, description="Subjects the stream captures.")
    messages: int | None = Field(default=None, description="Messages stored in the stream.")
    dead_lettered: int | None = Field(default=None, alias="deadLettered", description="Messages in the dead-letter stream.")


class ConsumerStatus(_Status):
    """Observed state of the JetStream consumer and its workers."""

    stream: str | None = Field(default=None, description="JetStream stream name.")
    consumer: str | None = Field(default=None, description="Durable consumer name.")
    deployment: str | None = Field(default=None, description="Worker Deployment name.")
    pending: int | None = Field(default=None, description="Messages not yet delivered to a worker.")
    ack_pending: int | None = Field(default=None, alias="ackPending", description="Delivered, not yet acknowledged.")
    redelivered: int | None = Field(default=None, description="Messages delivered more than once.")
    replicas: int | None = Field(default=None, description="Worker replicas requested.")


# --- Resource envelope -----------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata eventrails reads."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)
    namespace: str = Field(default="default", pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class _Resource(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: Literal["eventrails.dev/v1alpha1"] = Field(alias="apiVersion")
    metadata: ObjectMeta


class EventBus(_Resource):
    kind: Literal["EventBus"]
    spec: EventBusSpec
    status: EventBusStatus | None = None


class Topic(_Resource):
    kind: Literal["Topic"]
    spec: TopicSpec
    status: TopicStatus | None = None


class Consumer(_Resource):
    kind: Literal["Consumer"]
    spec: ConsumerSpec
    status: ConsumerStatus | None = None


Resource = EventBus | Topic | Consumer


class KindInfo(BaseModel):
    """What the CRD generator needs to know about one kind."""

    kind: str
    plural: str
    singular: str
    short_names: list[str]
    spec: type[BaseModel]
    status: type[BaseModel]
    model: type[_Resource]
    description: str
    printer_columns: list[dict[str, Any]]


_READY = {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}
_REASON = {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
           "priority": 1}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

KINDS: dict[str, KindInfo] = {
    "EventBus": KindInfo(
        kind="EventBus", plural="eventbuses", singular="eventbus", short_names=["ebus"],
        spec=EventBusSpec, status=EventBusStatus, model=EventBus,
        description="EventBus tells eventrails how to reach a NATS JetStream system.",
        printer_columns=[
            _READY,
            {"name": "Servers", "type": "string", "jsonPath": ".spec.servers[0]"},
            {"name": "Version", "type": "string", "jsonPath": ".status.serverVersion"},
            _REASON, _AGE,
        ],
    ),
    "Topic": KindInfo(
        kind="Topic", plural="topics", singular="topic", short_names=["ert"],
        spec=TopicSpec, status=TopicStatus, model=Topic,
        description="Topic declares one JetStream stream carrying named tasks or domain events.",
        printer_columns=[
            _READY,
            {"name": "Stream", "type": "string", "jsonPath": ".status.stream"},
            {"name": "Messages", "type": "integer", "jsonPath": ".status.messages"},
            {"name": "Dead", "type": "integer", "jsonPath": ".status.deadLettered"},
            _REASON, _AGE,
        ],
    ),
    "Consumer": KindInfo(
        kind="Consumer", plural="consumers", singular="consumer", short_names=["erc"],
        spec=ConsumerSpec, status=ConsumerStatus, model=Consumer,
        description="Consumer declares a durable pull consumer on a Topic and the worker pods that drain it.",
        printer_columns=[
            _READY,
            {"name": "Topic", "type": "string", "jsonPath": ".spec.topic"},
            {"name": "Consumer", "type": "string", "jsonPath": ".status.consumer"},
            {"name": "Pending", "type": "integer", "jsonPath": ".status.pending"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            _REASON, _AGE,
        ],
    ),
}
