"""Reconcile Topics and Consumers against JetStream: the core shared by kopf and local mode.

These coroutines take validated resources and a JetStream manager, apply the desired
state through ``_jetstream`` and return what changed plus the status to record. They
never touch the Kubernetes API, so local mode runs the very same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.js.manager import JetStreamManager

from eventrails import _naming
from eventrails_operator import _conditions, _desired, _jetstream
from eventrails_operator._desired import BusConnection
from eventrails_operator._jetstream import Change, ReconcileError
from eventrails._resources import Consumer, Topic


@dataclass
class Result:
    """Changes made by one reconcile and the status fields it computed."""

    changes: list[Change] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    error: ReconcileError | None = None

    @property
    def ready(self) -> bool:
        return self.error is None

    @property
    def writes(self) -> list[Change]:
        return [change for change in self.changes if change.action not in ("unchanged", "absent")]


def _previous_conditions(resource: Topic | Consumer) -> list[dict[str, Any]]:
    if resource.status is None:
        return []
    return [condition.model_dump(by_alias=True, exclude_none=True) for condition in resource.status.conditions]


def failed_status(resource: Topic | Consumer, error: ReconcileError) -> dict[str, Any]:
    """Return the status of a resource whose reconcile failed with ``error``."""
    message = error.message
    if error.err_code is not None and f"err_code {error.err_code}" not in message:
        message = f"{message} (err_code {error.err_code})"
    if error.field and error.field not in message:
        message = f"{error.field}: {message}"
    generation = resource.metadata.generation
    return {
        "conditions": _conditions.failed_conditions(
            _previous_conditions(resource), error.reason, message, generation, temporary=error.temporary
        ),
    }


async def reconcile_topic(jsm: JetStreamManager, topic: Topic, bus: BusConnection) -> Result:
    """Ensure the Topic's stream and dead-letter stream; return the changes and status."""
    result = Result()
    desired = _desired.topic_streams(topic, bus)
    try:
        change, info = await _jetstream.ensure_stream(jsm, desired.stream)
        result.changes.append(change)
        dead_lettered = None
        if desired.dead_letter is not None:
            dead_change, dead_info = await _jetstream.ensure_stream(jsm, desired.dead_letter)
            result.changes.append(dead_change)
            dead_lettered = dead_info.state.messages
    except ReconcileError as error:
        result.error = error
        result.status = failed_status(topic, error)
        return result

    generation = topic.metadata.generation
    result.status = {
        "observedGeneration": generation,
        "stream": desired.stream.name,
        "deadLetterStream": desired.dead_letter.name if desired.dead_letter else None,
        "subjects": desired.subjects,
        "messages": info.state.messages,
        "deadLettered": dead_lettered,
        "conditions": _conditions.ready_conditions(
            _previous_conditions(topic), f"stream {desired.stream.name} is in sync", generation
        ),
    }
    return result


async def reconcile_consumer(jsm: JetStreamManager, consumer: Consumer, topic: Topic | None, bus: BusConnection) -> Result:
    """Ensure the Consumer's durable consumer exists on its Topic's stream.

    A missing Topic, or names the Topic does not declare, are reported in the status and
    create nothing.
    """
    result = Result()
    namespace = consumer.metadata.namespace
    if topic is None:
        result.error = ReconcileError(
            "TopicNotFound",
            f"spec.topic: Topic {consumer.spec.topic!r} not found in namespace {namespace!r}; "
            "apply the Topic or fix spec.topic",
            field="spec.topic", temporary=True,
        )
        result.status = failed_status(consumer, result.error)
        return result
    unknown = _desired.unknown_names(consumer, topic)
    if unknown:
        result.error = ReconcileError(
            "UnknownNames",
            f"spec.names: {unknown} are not declared by Topic {topic.metadata.name!r} "
            f"(it declares {topic.spec.names}); remove them or add them to the Topic",
            field="spec.names",
        )
        result.status = failed_status(consumer, result.error)
        return result

    stream = _naming.stream_name(namespace, topic.metadata.name)
    try:
        change, info = await _jetstream.ensure_consumer(jsm, stream, _desired.consumer_config(consumer, topic, bus))
    except ReconcileError as error:
        result.error = error
        result.status = failed_status(consumer, error)
        return result
    result.changes.append(change)

    generation = consumer.metadata.generation
    result.status = {
        "observedGeneration": generation,
        "stream": stream,
        "consumer": info.name,
        "pending": info.num_pending,
        "ackPending": info.num_ack_pending,
        "redelivered": info.num_redelivered,
        "replicas": consumer.spec.effective_replicas,
        "conditions": _conditions.ready_conditions(
            _previous_conditions(consumer), f"consumer {info.name} on stream {stream} is in sync", generation
        ),
    }
    return result


async def delete_topic(jsm: JetStreamManager, topic: Topic) -> list[Change]:
    """Delete the Topic's streams when its deletionPolicy is Delete; keep them otherwise."""
    if topic.spec.deletion_policy != "Delete":
        return []
    namespace, name = topic.metadata.namespace, topic.metadata.name
    changes = [await _jetstream.delete_stream(jsm, _naming.stream_name(namespace, name))]
    changes.append(await _jetstream.delete_stream(jsm, _naming.dead_letter_stream_name(namespace, name)))
    return changes


async def delete_consumer(jsm: JetStreamManager, consumer: Consumer) -> Change:
    """Delete the Consumer's durable consumer from its Topic's stream."""
    stream = _naming.stream_name(consumer.metadata.namespace, consumer.spec.topic)
    return await _jetstream.delete_consumer(jsm, stream, _naming.consumer_name(consumer.metadata.name))
