"""Bring JetStream streams and consumers to their desired configuration.

Each ``ensure_*`` reads the live object, compares only the fields eventrails manages, and
sends a create or update request only when they differ, so reconciling an object that is
already in sync sends no write. Changes that cannot be applied raise ``ReconcileError``
before anything is sent, or carry the server's error code when the server rejects them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from nats.js.api import ConsumerConfig, ConsumerInfo, StreamConfig, StreamInfo
from nats.js.manager import JetStreamManager

from eventrails._errors import JetStreamNotFound, JetStreamRejected, NatsError, NatsUnavailable, translate
from eventrails_operator._desired import METADATA_PREFIX

logger = logging.getLogger("eventrails.operator.jetstream")

Action = Literal["created", "updated", "unchanged", "deleted", "absent"]


@dataclass(frozen=True)
class Change:
    """What one ``ensure_*`` or ``delete_*`` call did to one JetStream object."""

    kind: Literal["stream", "consumer"]
    name: str
    action: Action
    fields: tuple[str, ...] = ()


class ReconcileError(Exception):
    """A desired state that cannot be reached; the live object is left as it was.

    ``reason`` becomes the Ready condition's reason, ``field`` names the spec field at
    fault, ``err_code`` is the JetStream error code when the server rejected the change,
    and ``temporary`` tells the caller whether retrying unchanged may succeed.
    """

    def __init__(
        self, reason: str, message: str, *, field: str | None = None, err_code: int | None = None,
        temporary: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        self.err_code = err_code
        self.temporary = temporary


# Stream fields eventrails sets, with the spec field each comes from (for error messages).
_STREAM_FIELDS = {
    "subjects": "spec.tasks/spec.events",
    "retention": "spec.retention",
    "storage": "spec.storage",
    "num_replicas": "spec.replicas",
    "max_age": "spec.limits.maxAge",
    "max_bytes": "spec.limits.maxBytes",
    "max_msgs": "spec.limits.maxMessages",
    "duplicate_window": "spec.duplicateWindow",
    "discard": "spec",
    "allow_msg_schedules": "spec.delayedDelivery",
    "description": "metadata",
    "metadata": "metadata",
}
_CONSUMER_FIELDS = {
    "ack_wait": "spec.ackWait",
    "max_deliver": "spec.maxDeliver",
    "max_ack_pending": "spec.maxAckPending",
    "filter_subjects": "spec.names",
    "ack_policy": "spec",
    "deliver_policy": "spec",
    "description": "metadata",
    "metadata": "metadata",
}


def _normalized_stream(config: StreamConfig) -> dict[str, Any]:
    return {
        "subjects": sorted(config.subjects or []),
        "retention": str(getattr(config.retention, "value", config.retention)),
        "storage": str(getattr(config.storage, "value", config.storage)),
        "num_replicas": config.num_replicas or 1,
        "max_age": round(float(config.max_age or 0), 3),
        "max_bytes": config.max_bytes if config.max_bytes not in (None, 0) else -1,
        "max_msgs": config.max_msgs if config.max_msgs not in (None, 0) else -1,
        "duplicate_window": round(float(config.duplicate_window or 0), 3),
        "discard": str(getattr(config.discard, "value", config.discard)),
        "allow_msg_schedules": bool(config.allow_msg_schedules),
        "description": config.description or "",
        # The server adds its own metadata keys (such as _nats.req.level); compare only ours.
        "metadata": {k: v for k, v in (config.metadata or {}).items() if k.startswith(METADATA_PREFIX)},
    }


def _normalized_consumer(config: ConsumerConfig) -> dict[str, Any]:
    filters = list(config.filter_subjects or [])
    if config.filter_subject:
        filters.append(config.filter_subject)
    return {
        "ack_wait": round(float(config.ack_wait or 0), 3),
        "max_deliver": config.max_deliver or -1,
        "max_ack_pending": config.max_ack_pending or 0,
        "filter_subjects": sorted(filters),
        "ack_policy": str(getattr(config.ack_policy, "value", config.ack_policy)),
        "deliver_policy": str(getattr(config.deliver_policy, "value", config.deliver_policy)),
        "description": config.description or "",
        "metadata": {k: v for k, v in (config.metadata or {}).items() if k.startswith(METADATA_PREFIX)},
    }


def stream_differences(live: StreamConfig, desired: StreamConfig) -> list[str]:
    """Return the managed stream fields whose live value differs from the desired one."""
    live_values, desired_values = _normalized_stream(live), _normalized_stream(desired)
    return [name for name in _STREAM_FIELDS if live_values[name] != desired_values[name]]


# A work-queue stream delivers each subject to one consumer only.
_FILTER_NOT_UNIQUE = 10100
# JetStream's code for a missing stream; a missing consumer on an existing stream is 10014.
_STREAM_NOT_FOUND = 10059


def _filters(config: ConsumerConfig) -> list[str]:
    return sorted([*(config.filter_subjects or []), *([config.filter_subject] if config.filter_subject else [])])


def consumer_differences(live: ConsumerConfig, desired: ConsumerConfig) -> list[str]:
    """Return the managed consumer fields whose live value differs from the desired one."""
    live_values, desired_values = _normalized_consumer(live), _normalized_consumer(desired)
    return [name for name in _CONSUMER_FIELDS if live_values[name] != desired_values[name]]


def _reconcile_error(error: NatsError, action: str, name: str, field: str | None = None) -> ReconcileError:
    # translate() starts its message with what was being done; keep that prefix once.
    context = f"{action} {name}"
    text = str(error)
    message = text if text.startswith(context) else f"{context}: {text}"
    if isinstance(error, NatsUnavailable):
        return ReconcileError("NatsUnavailable", message, temporary=True)
    if isinstance(error, JetStreamRejected):
        return ReconcileError(
            "JetStreamRejected",
            f"{action} {name} was rejected by JetStream: {error.description}",
            field=field, err_code=error.err_code, temporary=False,
        )
    return ReconcileError("JetStreamError", message, field=field, temporary=True)


# Words of the server's rejection that point at one stream field, for naming the spec field.
_REJECTION_HINTS = {
    "storage": "storage", "retention": "retention", "replica": "num_replicas", "subject": "subjects",
    "duplicate": "duplicate_window", "max age": "max_age", "schedule": "allow_msg_schedules",
}


def _rejected_update(
    error: JetStreamRejected, stream: str, differences: list[str], live: dict[str, Any], desired: dict[str, Any],
) -> ReconcileError:
    """Return the error for a stream update the server rejected: the spec field, both values and the err_code."""
    # The translated error starts with what was being done; keep only the server's words.
    detail = (error.description or "").removeprefix(f"update stream {stream}: ")
    description = detail.lower()
    named = [field for hint, field in _REJECTION_HINTS.items() if hint in description and field in differences]
    fields = named[:1] or differences
    spec_fields = ", ".join(dict.fromkeys(_STREAM_FIELDS[field] for field in fields))
    changes = "; ".join(f"{_STREAM_FIELDS[field]} from {live[field]} to {desired[field]}" for field in fields)
    immutable = "can not change" in description or "cannot change" in description
    advice = (
        "create a new Topic, or delete this one with deletionPolicy Delete and apply it again"
        if immutable else "change the spec back, or make the NATS system able to apply it"
    )
    return ReconcileError(
        "ImmutableField" if immutable else "JetStreamRejected",
        f"JetStream rejected changing {changes} on stream {stream}: {detail} "
        f"(err_code {error.err_code}); the stream is unchanged; {advice}",
        field=spec_fields, err_code=error.err_code, temporary=False,
    )


async def _stream_info(jsm: JetStreamManager, name: str, subjects_filter: str | None = None) -> StreamInfo | None:
    try:
        return await jsm.stream_info(name, subjects_filter=subjects_filter)
    except Exception as error:  # noqa: BLE001 - translated below
        translated = translate(error, f"read stream {name}")
        if isinstance(translated, JetStreamNotFound):
            return None
        raise _reconcile_error(translated, "read stream", name) from error


async def _subjects_with_messages(jsm: JetStreamManager, name: str, subjects: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for subject in subjects:
        info = await _stream_info(jsm, name, subjects_filter=subject)
        if info is not None and info.state.subjects:
            counts.update({key: value for key, value in info.state.subjects.items() if value})
    return counts


async def ensure_stream(jsm: JetStreamManager, desired: StreamConfig) -> tuple[Change, StreamInfo]:
    """Create the stream or update its managed fields; send nothing when it is in sync."""
    assert desired.name is not None
    live = await _stream_info(jsm, desired.name)

    if live is None:
        try:
            info = await jsm.add_stream(desired)
        except Exception as error:  # noqa: BLE001 - translated below
            raise _reconcile_error(translate(error, f"create stream {desired.name}"), "create stream", desired.name) from error
        logger.info("created stream %s subjects=%s", desired.name, desired.subjects)
        return Change("stream", desired.name, "created"), info

    differences = stream_differences(live.config, desired)
    if not differences:
        return Change("stream", desired.name, "unchanged"), live

    # The server judges what it cannot change (storage type, retention to or from
    # workqueue, replicas beyond the cluster's size) and rejects the update whole, so the
    # condition carries its err_code. Dropping subjects that still hold messages is
    # refused here, because the server would accept it and strand those messages.
    live_values, desired_values = _normalized_stream(live.config), _normalized_stream(desired)
    if "subjects" in differences:
        removed = sorted(set(live_values["subjects"]) - set(desired_values["subjects"]))
        with_data = await _subjects_with_messages(jsm, desired.name, removed)
        if with_data:
            listed = ", ".join(f"{subject} ({count} messages)" for subject, count in sorted(with_data.items()))
            raise ReconcileError(
                "SubjectsHaveData",
                f"removing names would drop stored messages on stream {desired.name}: {listed}; "
                "drain those messages or keep the names",
                field="spec.tasks/spec.events",
            )

    # Keep server-owned metadata keys so the update does not fight the server.
    update = StreamConfig.from_response(desired.as_dict())
    server_metadata = {k: v for k, v in (live.config.metadata or {}).items() if not k.startswith(METADATA_PREFIX)}
    update.metadata = {**server_metadata, **(desired.metadata or {})}
    try:
        info = await jsm.update_stream(update)
    except Exception as error:  # noqa: BLE001 - translated below
        translated = translate(error, f"update stream {desired.name}")
        if isinstance(translated, JetStreamRejected):
            raise _rejected_update(translated, desired.name, differences, live_values, desired_values) from error
        raise _reconcile_error(translated, "update stream", desired.name, _STREAM_FIELDS.get(differences[0])) from error
    logger.info("updated stream %s fields=%s", desired.name, ",".join(differences))
    return Change("stream", desired.name, "updated", tuple(differences)), info


async def ensure_consumer(jsm: JetStreamManager, stream: str, desired: ConsumerConfig) -> tuple[Change, ConsumerInfo]:
    """Create the durable consumer or update its managed fields; send nothing when in sync."""
    name = desired.durable_name
    assert name is not None
    live: ConsumerInfo | None
    try:
        live = await jsm.consumer_info(stream, name)
    except Exception as error:  # noqa: BLE001 - translated below
        translated = translate(error, f"read consumer {stream}/{name}")
        if not isinstance(translated, JetStreamNotFound):
            raise _reconcile_error(translated, "read consumer", f"{stream}/{name}") from error
        if translated.err_code == _STREAM_NOT_FOUND:
            raise ReconcileError(
                "StreamNotFound",
                f"stream {stream} not found, so consumer {name} cannot be created yet. It is created "
                "once the Topic's stream exists; if this lasts, check the Topic's status",
                temporary=True,
            ) from error
        live = None

    if live is not None:
        differences = consumer_differences(live.config, desired)
        if not differences:
            return Change("consumer", name, "unchanged"), live
    else:
        differences = []

    # Creating and updating are the same JetStream request for a durable consumer.
    try:
        info = await jsm.add_consumer(stream, desired)
    except Exception as error:  # noqa: BLE001 - translated below
        field = _CONSUMER_FIELDS.get(differences[0]) if differences else None
        action = "update consumer" if live is not None else "create consumer"
        translated = translate(error, f"{action} {stream}/{name}")
        if isinstance(translated, JetStreamRejected) and translated.err_code == _FILTER_NOT_UNIQUE:
            raise ReconcileError(
                "OverlappingConsumers",
                f"{action} {stream}/{name} was rejected by JetStream: another consumer on this work-queue stream "
                f"already takes some of its subjects {_filters(desired)} (err_code {translated.err_code}); on a "
                "work-queue Topic each name goes to one Consumer: split them with spec.names",
                field="spec.names", err_code=translated.err_code, temporary=False,
            ) from error
        raise _reconcile_error(translated, action, f"{stream}/{name}", field) from error
    if live is None:
        logger.info("created consumer %s on stream %s", name, stream)
        return Change("consumer", name, "created"), info
    logger.info("updated consumer %s on stream %s fields=%s", name, stream, ",".join(differences))
    return Change("consumer", name, "updated", tuple(differences)), info


async def delete_stream(jsm: JetStreamManager, name: str) -> Change:
    """Delete a stream; a stream that is already gone counts as deleted."""
    try:
        await jsm.delete_stream(name)
    except Exception as error:  # noqa: BLE001 - translated below
        translated = translate(error, f"delete stream {name}")
        if isinstance(translated, JetStreamNotFound):
            return Change("stream", name, "absent")
        raise _reconcile_error(translated, "delete stream", name) from error
    logger.info("deleted stream %s", name)
    return Change("stream", name, "deleted")


async def delete_consumer(jsm: JetStreamManager, stream: str, name: str) -> Change:
    """Delete a durable consumer; one that is already gone (or whose stream is) counts as deleted."""
    try:
        await jsm.delete_consumer(stream, name)
    except Exception as error:  # noqa: BLE001 - translated below
        translated = translate(error, f"delete consumer {stream}/{name}")
        if isinstance(translated, JetStreamNotFound):
            return Change("consumer", name, "absent")
        raise _reconcile_error(translated, "delete consumer", f"{stream}/{name}") from error
    logger.info("deleted consumer %s on stream %s", name, stream)
    return Change("consumer", name, "deleted")
