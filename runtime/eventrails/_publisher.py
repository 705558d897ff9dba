"""The JetStream publisher: tasks onto queue topics and domain events onto the events topic.

Every publish checks the topic's payload contract first, so a bad payload fails in the
caller with a PayloadError instead of reaching a worker. Nothing counts as published
until JetStream acknowledges it with a PubAck. A PubAck that reports a duplicate (the
same ``Nats-Msg-Id`` within the topic's duplicate window) is returned as such.

Delayed and debounced tasks travel as JetStream message schedules (see ``_schedule``);
the trace context of the caller travels in W3C headers when OpenTelemetry is installed
(see ``_tracing``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventrails import _naming, _schedule, _tracing
from eventrails._connect import connect
from eventrails._contract import Contract, ContractCache
from eventrails._errors import ConfigurationError, PayloadError, is_temporary, translate
from eventrails._resources import DEFAULT_TENANCY_KEYS, NAME_PATTERN
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.publisher")

DEFAULT_EVENTS_TOPIC = "domain-events"

# Header names; the Nats-* ones are understood by the server.
MSG_ID_HEADER = "Nats-Msg-Id"
NAME_HEADER = "Eventrails-Name"
PUBLISHED_AT_HEADER = "Eventrails-Published-At"

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


class _EventsTopicSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTRAILS_", extra="ignore")

    events_topic: str = DEFAULT_EVENTS_TOPIC


class PublishReceipt(BaseModel):
    """Where JetStream stored a message: its stream, sequence and message id.

    ``duplicate`` is true when JetStream had already stored a message with this id within
    the topic's duplicate window. ``seq`` is then the sequence of that earlier message.
    For a delayed or debounced task ``due`` says when it is delivered, and ``seq`` is that
    of the schedule message, which the server removes when the task lands on its subject.
    """

    model_config = ConfigDict(frozen=True)

    stream: str
    seq: int
    msg_id: str
    duplicate: bool = False
    due: datetime | None = None


@dataclass(frozen=True)
class Outgoing:
    """One message ready to send: where it goes, what it carries, and its ids."""

    topic: str
    name: str
    subject: str
    stream: str
    body: bytes
    headers: dict[str, str]
    msg_id: str
    due: datetime | None = None
    schedule_subject: str | None = None

    @property
    def destination(self) -> str:
        """The subject the message is published to: the schedule subject of a delayed task."""
        return self.schedule_subject or self.subject

    def describe(self) -> str:
        if self.schedule_subject:
            return (
                f"schedule {self.name} (msg id {self.msg_id}) on {self.schedule_subject} for "
                f"{self.subject} at {_schedule.at_pattern(self.due or datetime.now(timezone.utc))[4:]}"
            )
        return f"publish {self.name} (msg id {self.msg_id}) to {self.subject}"


def tenancy_header(key: str) -> str:
    """Return the header that carries payload key ``key``: organizationId -> Eventrails-Organization-Id."""
    words = _CAMEL_BOUNDARY.sub("-", key).replace("_", "-").split("-")
    return "Eventrails-" + "-".join(word[:1].upper() + word[1:].lower() for word in words if word)


def payload_object(name: str, payload: object) -> dict[str, Any]:
    """Return the payload as a JSON-ready dict; raise PayloadError for anything but a mapping or model."""
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json", by_alias=True)
    if isinstance(payload, Mapping):
        return dict(payload)
    raise PayloadError(
        f"payload of {name!r} must be a JSON object (a dict or a pydantic model), got {type(payload).__name__}"
    )


def encode_payload(name: str, payload: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise PayloadError(f"payload of {name!r} is not JSON-serialisable ({error}); send IDs and plain values") from error


class Publisher:
    """Publishes tasks and domain events to JetStream with contract checks and de-duplication.

    ``Publisher.connect()`` opens its own connection from ``EVENTRAILS_*`` settings and
    closes it in ``close``; ``Publisher(nc, settings)`` wraps a connection the caller owns.
    Transient failures (timeouts, no responders, a 503 during a leader election) are
    retried with backoff until ``publish_deadline`` seconds have passed. Every attempt
    carries the same message id, so JetStream stores the message once within its duplicate
    window.
    """

    def __init__(
        self,
        nc: NATS,
        settings: NatsSettings | None = None,
        *,
        events_topic: str | None = None,
        publish_deadline: float = 10.0,
        attempt_timeout: float = 2.0,
    ) -> None:
        self._nc = nc
        self._settings = settings if settings is not None else NatsSettings()
        self._js = nc.jetstream(domain=self._settings.jetstream_domain)
        self._contracts = ContractCache(self._js, self._settings.namespace)
        self._owns_connection = False
        self.events_topic = events_topic or _EventsTopicSettings().events_topic
        self._publish_deadline = publish_deadline
        self._attempt_timeout = attempt_timeout

    @classmethod
    async def connect(
        cls, settings: NatsSettings | None = None, *, events_topic: str | None = None, connect_timeout: float = 30.0
    ) -> Publisher:
        """Connect to NATS with ``settings`` (read from the environment when None)."""
        settings = settings if settings is not None else NatsSettings()
        nc = await connect(settings, name="eventrails-publisher", deadline=connect_timeout)
        publisher = cls(nc, settings, events_topic=events_topic)
        publisher._owns_connection = True
        return publisher

    @property
    def settings(self) -> NatsSettings:
        return self._settings

    async def enqueue(
        self, topic: str, task: str, payload: BaseModel | Mapping[str, Any], dedupe_key: str | None = None,
        delay: float | timedelta | None = None, debounce: float | timedelta | None = None, *,
        debounce_key: str | None = None,
    ) -> PublishReceipt:
        """Publish task ``task`` onto queue topic ``topic``, now or later.

        ``dedupe_key`` becomes the message id, so enqueueing the same key twice within the
        topic's duplicate window stores one message.

        ``delay`` (seconds or a timedelta) delivers the task that much later. ``debounce``
        delivers it once the entity has been quiet that long: every enqueue for the same
        entity within the window replaces the pending one and starts the window again, so
        ten quick writes run the handler once, with the latest payload. The entity is
        ``debounce_key``, or ``dedupe_key`` when no debounce key is given; each debounced
        write then gets a fresh message id, since a repeated one would be dropped as a
        duplicate instead of replacing the pending write. Both need the Topic's
        ``spec.delayedDelivery: true``; without it they raise ConfigurationError.

        Transient failures (timeouts, no responders, a 503 while a stream elects a leader,
        a reconnecting client) are retried with backoff for up to ``publish_deadline``
        seconds, each attempt with the same message id. Raises PayloadError when the task
        is not declared by the topic or a required key is missing or empty, and
        NatsUnavailable when no PubAck arrived within the deadline; the message may still
        have been stored then, so publish again with the same ``dedupe_key``.
        """
        return await self._publish(
            topic, task, payload, dedupe_key, expected_kind="tasks", delay=delay, debounce=debounce,
            debounce_key=debounce_key,
        )

    async def publish_event(
        self, name: str, payload: BaseModel | Mapping[str, Any], topic: str | None = None,
        dedupe_key: str | None = None,
    ) -> PublishReceipt:
        """Publish domain event ``name`` onto ``topic`` (by default the events topic, ``domain-events``)."""
        return await self._publish(topic or self.events_topic, name, payload, dedupe_key, expected_kind="events")

    async def close(self) -> None:
        """Close the connection if this publisher opened it; a borrowed one stays open."""
        if self._owns_connection and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def _publish(
        self, topic: str, name: str, payload: BaseModel | Mapping[str, Any], dedupe_key: str | None,
        expected_kind: str, delay: float | timedelta | None = None, debounce: float | timedelta | None = None,
        debounce_key: str | None = None,
    ) -> PublishReceipt:
        # Everything that can be wrong with the call is checked before anything is sent.
        if not re.fullmatch(NAME_PATTERN, topic):
            raise ConfigurationError(f"topic {topic!r} is not a Topic name: use the metadata.name of a Topic resource")
        dedupe_key = _key(name, "dedupe_key", dedupe_key)
        debounce_key = _key(name, "debounce_key", debounce_key)
        delay_seconds = _schedule.seconds(delay, "delay")
        debounce_seconds = _schedule.seconds(debounce, "debounce")
        if delay_seconds is not None and debounce_seconds is not None:
            raise PayloadError(f"enqueue of {name!r} got both delay and debounce; pass one of them")
        if debounce_key is not None and debounce_seconds is None:
            raise PayloadError(f"enqueue of {name!r} got debounce_key without debounce; pass the debounce window too")
        if debounce_seconds is not None and not (debounce_key or dedupe_key):
            raise PayloadError(
                f"debounce of {name!r} needs the entity it is keyed by: pass debounce_key (or dedupe_key)"
            )
        scheduled = delay_seconds is not None or debounce_seconds is not None
        data = payload_object(name, payload)
        contract = await self._contracts.get(topic, name, schedules=scheduled)
        self._check_kind(contract, name, expected_kind)
        contract.check_name(name)
        contract.check_payload(name, data)
        if scheduled:
            contract.check_schedules(name, "delay" if delay_seconds is not None else "debounce")
        body = encode_payload(name, data)

        outgoing = build_outgoing(
            contract, self._settings, name, body, data, dedupe_key=dedupe_key, delay=delay_seconds,
            debounce=debounce_seconds, debounce_key=debounce_key,
        )
        with _tracing.publishing(outgoing.destination, name, outgoing.msg_id, outgoing.headers) as span:
            try:
                ack = await publish_with_retry(
                    self._nc, self._js, outgoing.destination, outgoing.body, outgoing.headers, stream=outgoing.stream,
                    description=outgoing.describe(), deadline=self._publish_deadline,
                    attempt_timeout=self._attempt_timeout,
                )
            except Exception as error:
                span.failed(error)
                raise
            span.set("messaging.nats.stream_seq", ack.seq)
        receipt = PublishReceipt(
            stream=ack.stream, seq=ack.seq, msg_id=outgoing.msg_id, duplicate=bool(ack.duplicate), due=outgoing.due,
        )
        if receipt.duplicate:
            logger.info(
                "%s on topic %s with msg id %s is a duplicate of stream %s seq %d; nothing new was stored",
                name, topic, outgoing.msg_id, receipt.stream, receipt.seq,
            )
        elif outgoing.due is not None:
            logger.debug(
                "scheduled %s on topic %s msg id %s for %s on %s (stream %s seq %d)",
                name, topic, outgoing.msg_id, outgoing.due.isoformat(), outgoing.schedule_subject, receipt.stream,
                receipt.seq,
            )
        else:
            logger.debug(
                "published %s on topic %s msg id %s as stream %s seq %d", name, topic, outgoing.msg_id, receipt.stream,
                receipt.seq,
            )
        return receipt

    @staticmethod
    def _check_kind(contract: Contract, name: str, expected_kind: str) -> None:
        if contract.kind == expected_kind:
            return
        if expected_kind == "tasks":
            raise PayloadError(
                f"topic {contract.topic!r} carries domain events, not tasks; publish {name!r} with publish_event"
            )
        raise PayloadError(f"topic {contract.topic!r} carries tasks, not domain events; send {name!r} with enqueue")



def _key(name: str, argument: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"{argument} of {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def build_outgoing(
    contract: Contract, settings: NatsSettings, name: str, body: bytes, data: Mapping[str, Any], *,
    dedupe_key: str | None = None, delay: float | None = None, debounce: float | None = None,
    debounce_key: str | None = None, now: datetime | None = None,
) -> Outgoing:
    """Return the subject, headers and ids of one checked message (no I/O).

    A delayed task is keyed by its message id, so it never replaces another one; a
    debounced task is keyed by its entity, so the newest write replaces the pending one.
    """
    topic = contract.topic
    subject = _naming.subject(settings.subject_prefix, settings.namespace, topic, name)
    entity = (debounce_key or dedupe_key) if debounce is not None else None
    if debounce is not None and debounce_key is None:
        # The dedupe key names the entity here; a fresh id per write lets the newest replace the pending one.
        msg_id = uuid.uuid4().hex
    else:
        msg_id = dedupe_key or uuid.uuid4().hex
    published = now if now is not None else datetime.now(timezone.utc)
    headers = {
        MSG_ID_HEADER: msg_id,
        NAME_HEADER: name,
        PUBLISHED_AT_HEADER: published.isoformat(timespec="milliseconds"),
    }
    for key in dict.fromkeys((*DEFAULT_TENANCY_KEYS, *contract.required_keys)):
        value = data.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            headers[tenancy_header(key)] = str(value)

    wait = delay if delay is not None else debounce
    if wait is None:
        return Outgoing(topic, name, subject, contract.stream, body, headers, msg_id)
    due = _schedule.due_at(wait, published)
    schedule_subject = _naming.schedule_subject(
        settings.subject_prefix, settings.namespace, topic, name, entity if entity is not None else msg_id
    )
    headers.update(_schedule.schedule_headers(due, subject))
    headers[_schedule.MSG_ID_HEADER] = msg_id
    headers[_schedule.DUE_HEADER] = due.isoformat(timespec="milliseconds")
    return Outgoing(topic, name, subject, contract.stream, body, headers, msg_id, due, schedule_subject)


async def publish_with_retry(
    nc: NATS, js: JetStreamContext, subject: str, body: bytes, headers: Mapping[str, str], *, stream: str,
    description: str, deadline: float = 10.0, attempt_timeout: float = 2.0,
) -> PubAck:
    """Publish to JetStream and return the PubAck, retrying temporary failures within ``deadline`` seconds.

    Callers always set ``Nats-Msg-Id``, so a retry of a message that was stored after all
    comes back as a duplicate instead of a second copy. ``stream`` makes the server refuse
    the message if its subject belongs to another stream. While the client is reconnecting
    nothing is sent, because nats-py would buffer the request and deliver it after the
    caller received the failure. Pauses between attempts grow from 0.1 s to 2 s with
    jitter, so publishers that failed together do not retry together. Raises the
    translated error of the last attempt; non-temporary errors (a rejected message, a
    closed connection) are raised at once. ``description`` names the message and subject
    in that error and in the logs.
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline
    pause = 0.1
    attempt = 0
    while True:
        attempt += 1
        timeout = max(min(attempt_timeout, give_up_at - loop.time()), 0.05)
        try:
            if not nc.is_connected:
                raise nats.errors.ConnectionClosedError() if nc.is_closed else nats.errors.ConnectionReconnectingError()
            # nats-py adds the expected-stream header to the dict it is given, so pass a copy.
            return await js.publish(subject, body, timeout=timeout, stream=stream, headers=dict(headers))
        except Exception as error:  # noqa: BLE001 - translated below
            # A closed connection never comes back; anything else temporary may.
            closed = isinstance(error, nats.errors.ConnectionClosedError)
            if not is_temporary(error) or closed or loop.time() + pause >= give_up_at:
                raise translate(error, description) from error
            wait = pause * random.uniform(0.5, 1.0)
            logger.warning(
                "%s failed on attempt %d: %s; retrying in %.2fs with the same msg id",
                description, attempt, type(error).__name__, wait,
            )
            await asyncio.sleep(wait)
            pause = min(pause * 2, 2.0)
