"""The JetStream publisher: tasks onto queue topics and domain events onto the events topic.

Every publish checks the topic's payload contract first, so a bad payload fails in the
caller with a PayloadError instead of reaching a worker. Nothing counts as published
until JetStream acknowledges it with a PubAck. A PubAck that reports a duplicate (the
same ``Nats-Msg-Id`` within the topic's duplicate window) is returned as such.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventrails import _naming
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
    """

    model_config = ConfigDict(frozen=True)

    stream: str
    seq: int
    msg_id: str
    duplicate: bool = False


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
        self, topic: str, task: str, payload: BaseModel | Mapping[str, Any], dedupe_key: str | None = None
    ) -> PublishReceipt:
        """Publish task ``task`` onto queue topic ``topic``.

        ``dedupe_key`` becomes the message id, so enqueueing the same key twice within the
        topic's duplicate window stores one message. Raises PayloadError when the task is
        not declared by the topic or a required key is missing or empty. Raises
        NatsUnavailable when no PubAck arrived within the publish deadline. The message may
        still have been stored then, so publish again with the same ``dedupe_key``.
        """
        return await self._publish(topic, task, payload, dedupe_key, expected_kind="tasks")

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
        expected_kind: str,
    ) -> PublishReceipt:
        # Everything that can be wrong with the call is checked before anything is sent.
        if not re.fullmatch(NAME_PATTERN, topic):
            raise ConfigurationError(f"topic {topic!r} is not a Topic name: use the metadata.name of a Topic resource")
        if dedupe_key is not None and (not isinstance(dedupe_key, str) or not dedupe_key.strip()):
            raise PayloadError(f"dedupe_key of {name!r} must be a non-empty string, got {dedupe_key!r}")
        data = payload_object(name, payload)
        contract = await self._contracts.get(topic, name)
        self._check_kind(contract, name, expected_kind)
        contract.check_name(name)
        contract.check_payload(name, data)
        body = encode_payload(name, data)

        settings = self._settings
        subject = _naming.subject(settings.subject_prefix, settings.namespace, topic, name)
        msg_id = dedupe_key.strip() if dedupe_key else uuid.uuid4().hex
        headers = self._headers(contract, name, msg_id, data)

        ack = await publish_with_retry(
            self._nc, self._js, subject, body, headers, stream=contract.stream,
            description=f"publish {name} (msg id {msg_id}) to {subject}",
            deadline=self._publish_deadline, attempt_timeout=self._attempt_timeout,
        )
        receipt = PublishReceipt(stream=ack.stream, seq=ack.seq, msg_id=msg_id, duplicate=bool(ack.duplicate))
        if receipt.duplicate:
            logger.info(
                "%s on topic %s with msg id %s is a duplicate of stream %s seq %d; nothing new was stored",
                name, topic, msg_id, receipt.stream, receipt.seq,
            )
        else:
            logger.debug("published %s on topic %s msg id %s as stream %s seq %d", name, topic, msg_id, receipt.stream, receipt.seq)
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

    @staticmethod
    def _headers(contract: Contract, name: str, msg_id: str, data: Mapping[str, Any]) -> dict[str, str]:
        headers = {
            MSG_ID_HEADER: msg_id,
            NAME_HEADER: name,
            PUBLISHED_AT_HEADER: datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        }
        for key in dict.fromkeys((*DEFAULT_TENANCY_KEYS, *contract.required_keys)):
            value = data.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                headers[tenancy_header(key)] = str(value)
        # NOTE: W3C trace context (traceparent) is not propagated yet.
        return headers


async def publish_with_retry(
    nc: NATS, js: JetStreamContext, subject: str, body: bytes, headers: Mapping[str, str], *, stream: str,
    description: str, deadline: float = 10.0, attempt_timeout: float = 2.0,
) -> PubAck:
    """Publish to JetStream and return the PubAck, retrying temporary failures within ``deadline`` seconds.

    Callers always set ``Nats-Msg-Id``, so a retry of a message that was stored after all
    comes back as a duplicate instead of a second copy. ``stream`` makes the server refuse
    the message if its subject belongs to another stream. While the client is reconnecting
    nothing is sent, because nats-py would buffer the request and deliver it after the
    caller received the failure. Raises the translated error of the last attempt.
    ``description`` names the message and subject in that error and in the logs.
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
            logger.warning(
                "%s failed on attempt %d: %s; retrying in %.1fs with the same msg id",
                description, attempt, type(error).__name__, pause,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
