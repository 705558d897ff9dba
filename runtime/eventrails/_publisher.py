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
import functools
import itertools
import json
import json.encoder
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventrails import _naming, _schedule, _tracing
from eventrails._wire import Wire
from eventrails._connect import connect
from eventrails._contract import Contract, ContractCache
from eventrails._errors import ConfigurationError, NatsError, PayloadError, is_temporary, translate
from eventrails._resources import DEFAULT_TENANCY_KEYS, NAME_PATTERN
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.publisher")

DEFAULT_EVENTS_TOPIC = "domain-events"

# Header names; the Nats-* ones are understood by the server.
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
NAME_HEADER = "Eventrails-Name"
PUBLISHED_AT_HEADER = "Eventrails-Published-At"

# PubAcks that enqueue_many awaits at once by default.
DEFAULT_MAX_PENDING = 256

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

T = TypeVar("T")


class _EventsTopicSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTRAILS_", extra="ignore")

    events_topic: str = DEFAULT_EVENTS_TOPIC


class PublishReceipt(BaseModel):
    """Where JetStream stored a message: its stream, sequence and message id.

    ``duplicate`` is true when JetStream had already stored a message with this id within
    the topic's duplicate window. ``seq`` is then the sequence of that earlier message.
    For a delayed or debounced task ``due`` is when it is delivered, and ``seq`` is that
    of the schedule message, which the server removes when the task lands on its subject.
    """

    model_config = ConfigDict(frozen=True)

    stream: str
    seq: int
    msg_id: str
    duplicate: bool = False
    due: datetime | None = None


@dataclass(slots=True)
class Outgoing:
    """One message ready to send: where it goes, what it carries, and its ids.

    Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, which
    made building one cost more than encoding its payload.
    """

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


class PublishIncomplete(NatsError):
    """``enqueue_many`` got no PubAck for some of its messages within the deadline.

    ``receipts`` has one entry per payload, in order: the receipt of each stored message
    and None for the others. ``msg_ids`` has every message's id: publishing the missing
    ones again with these ids as dedupe keys stores each message once.
    """

    def __init__(self, message: str, receipts: list[PublishReceipt | None], msg_ids: list[str]) -> None:
        super().__init__(message)
        self.receipts = receipts
        self.msg_ids = msg_ids


class _MessageIds:
    """Message ids: 32 hex digits, a random prefix of this process and a counter.

    They cost less than a uuid4 per message (no system call) and are as unique. The prefix
    carries 80 random bits, and a forked child draws a new one, so parent and child never
    share ids: JetStream would drop the second of two messages with one id as a duplicate.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


_message_ids = _MessageIds()


def new_msg_id() -> str:
    """Return a fresh message id (32 hex digits), unique across processes."""
    return _message_ids.next()


# The publish time header, ISO 8601 in UTC to the millisecond: the text up to the seconds
# is formatted once a second, and the milliseconds are appended per message.
_second: tuple[int, str] = (-1, "")


def _published_at() -> str:
    global _second
    millis = int(time.time() * 1000)
    seconds, fraction = divmod(millis, 1000)
    if _second[0] != seconds:
        _second = (seconds, datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{fraction:03d}+00:00"


_tenancy_headers: dict[str, str] = {}


def tenancy_header(key: str) -> str:
    """Return the header that carries payload key ``key``: organizationId -> Eventrails-Organization-Id."""
    header = _tenancy_headers.get(key)
    if header is None:
        words = _CAMEL_BOUNDARY.sub("-", key).replace("_", "-").split("-")
        header = "Eventrails-" + "-".join(word[:1].upper() + word[1:].lower() for word in words if word)
        _tenancy_headers[key] = header
    return header


@functools.lru_cache(maxsize=256)
def _header_keys(required_keys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Return the payload keys copied into headers, each with its header name."""
    return tuple((key, tenancy_header(key)) for key in dict.fromkeys((*DEFAULT_TENANCY_KEYS, *required_keys)))


def payload_object(name: str, payload: object) -> dict[str, Any]:
    """Return the payload as a JSON-ready dict; raise PayloadError for anything but a mapping or model."""
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json", by_alias=True)
    if isinstance(payload, Mapping):
        return dict(payload)
    raise PayloadError(
        f"payload of {name!r} must be a JSON object (a dict or a pydantic model), got {type(payload).__name__}"
    )


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _compact_encoder() -> Callable[[Any], str]:
    """Return a function that encodes like ``_ENCODER.encode``.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs more than
    encoding a small payload. This one is built once. It has no check for circular
    references, so a payload that contains itself fails with RecursionError instead of
    ValueError.
    """
    make = json.encoder.c_make_encoder
    if make is None:  # a Python built without the C accelerator
        return _ENCODER.encode
    encoder = make(
        None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False,
    )
    return lambda payload: "".join(encoder(payload, 0))


_encode = _compact_encoder()


def encode_payload(name: str, payload: Mapping[str, Any]) -> bytes:
    try:
        return _encode(payload).encode()
    except RecursionError as error:
        raise PayloadError(f"payload of {name!r} contains itself or nests too deeply; send IDs and plain values") from error
    except (TypeError, ValueError) as error:
        raise PayloadError(f"payload of {name!r} is not JSON-serialisable ({error}); send IDs and plain values") from error


class Publisher:
    """Publishes tasks and domain events to JetStream with contract checks and de-duplication.

    ``Publisher.connect()`` opens its own connection from ``EVENTRAILS_*`` settings and
    closes it in ``close``; ``Publisher(nc, settings)`` wraps a connection the caller owns.
    Transient failures (timeouts, no responders, a 503 during a leader election) are
    retried with backoff until ``publish_deadline`` seconds have passed. Every attempt
    carries the same message id, so JetStream stores the message once within its duplicate
    window. Concurrent calls share the connection pipelined, each awaiting its own PubAck;
    ``enqueue_many`` sends a batch that way from one call.
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
        # A nats-py client gets the pipelined path; stand-ins (the in-memory double) get js.publish.
        self._inbox = _AckInbox(nc) if isinstance(nc, NATS) else None
        self._valid_topics: set[str] = set()

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

    async def enqueue_many(
        self, topic: str, task: str, payloads: Iterable[BaseModel | Mapping[str, Any]], *,
        dedupe_keys: Sequence[str | None] | None = None, max_pending: int = DEFAULT_MAX_PENDING,
    ) -> list[PublishReceipt]:
        """Publish task ``task`` once per payload onto queue topic ``topic``; return the receipts in order.

        Every payload is checked before the first message is sent, so a bad one fails the
        call with nothing sent. The messages are pipelined: up to ``max_pending`` of them
        await their PubAck at once, and each receipt stands for that message's own PubAck.
        ``dedupe_keys``, when given, has one key (or None) per payload and works as in
        ``enqueue``. Messages whose attempt failed for a temporary reason are sent again,
        with the same message ids, until ``publish_deadline`` seconds have passed since the
        call began. Raises PublishIncomplete, which carries the receipts of the stored
        messages and every message id, when some messages got no PubAck by then or were
        rejected.
        """
        payloads = list(payloads)
        keys: list[str | None] = list(dedupe_keys) if dedupe_keys is not None else [None] * len(payloads)
        if len(keys) != len(payloads):
            raise PayloadError(
                f"enqueue_many of {task!r} got {len(payloads)} payloads but {len(keys)} dedupe keys; pass one per payload"
            )
        if max_pending < 1:
            raise ConfigurationError(f"max_pending must be at least 1, got {max_pending!r}")
        contract = await self._checked_contract(topic, task, "tasks", scheduled=False)

        # What build_outgoing does per message, with the parts shared by the batch taken once.
        subject = _naming.subject(self._settings.subject_prefix, self._settings.namespace, topic, task)
        header_keys = _header_keys(contract.required_keys)
        published_at = _published_at()
        outgoings = []
        for payload, key in zip(payloads, keys, strict=True):
            # A dict is only read from here on, so it needs no copy.
            data = payload if type(payload) is dict else payload_object(task, payload)
            contract.check_payload(task, data)
            msg_id = _key(task, "dedupe_key", key) or new_msg_id()
            headers = {MSG_ID_HEADER: msg_id, NAME_HEADER: task, PUBLISHED_AT_HEADER: published_at}
            _add_tenancy_headers(headers, data, header_keys)
            outgoings.append(Outgoing(topic, task, subject, contract.stream, encode_payload(task, data), headers, msg_id))
        if not outgoings:
            return []

        # One span for the batch; every message carries its context.
        with _tracing.publishing(outgoings[0].subject, task, outgoings[0].msg_id, outgoings[0].headers) as span:
            for outgoing in outgoings[1:]:
                _copy_trace_headers(outgoings[0].headers, outgoing.headers)
            span.set("messaging.batch.message_count", len(outgoings))
            try:
                acks = await self._send_many(outgoings, max_pending)
            except Exception as error:
                span.failed(error)
                raise
        receipts = [
            PublishReceipt(stream=stream, seq=seq, msg_id=outgoing.msg_id, duplicate=duplicate)
            for outgoing, (stream, seq, duplicate) in zip(outgoings, acks, strict=True)
        ]
        logger.debug("published %d x %s on topic %s", len(receipts), task, topic)
        return receipts

    async def _checked_contract(self, topic: str, name: str, expected_kind: str, *, scheduled: bool) -> Contract:
        if topic not in self._valid_topics:
            if not re.fullmatch(NAME_PATTERN, topic):
                raise ConfigurationError(
                    f"topic {topic!r} is not a Topic name: use the metadata.name of a Topic resource"
                )
            self._valid_topics.add(topic)
        contract = await self._contracts.get(topic, name, schedules=scheduled)
        self._check_kind(contract, name, expected_kind)
        contract.check_name(name)
        return contract

    async def _publish(
        self, topic: str, name: str, payload: BaseModel | Mapping[str, Any], dedupe_key: str | None,
        expected_kind: str, delay: float | timedelta | None = None, debounce: float | timedelta | None = None,
        debounce_key: str | None = None,
    ) -> PublishReceipt:
        # Everything that can be wrong with the call is checked before anything is sent.
        dedupe_key = _key(name, "dedupe_key", dedupe_key)
        scheduled = delay is not None or debounce is not None
        delay_seconds = debounce_seconds = None
        if scheduled or debounce_key is not None:
            debounce_key = _key(name, "debounce_key", debounce_key)
            delay_seconds = _schedule.seconds(delay, "delay")
            debounce_seconds = _schedule.seconds(debounce, "debounce")
            if delay_seconds is not None and debounce_seconds is not None:
                raise PayloadError(f"enqueue of {name!r} got both delay and debounce; pass one of them")
            if debounce_key is not None and debounce_seconds is None:
                raise PayloadError(
                    f"enqueue of {name!r} got debounce_key without debounce; pass the debounce window too"
                )
            if debounce_seconds is not None and not (debounce_key or dedupe_key):
                raise PayloadError(
                    f"debounce of {name!r} needs the entity it is keyed by: pass debounce_key (or dedupe_key)"
                )
            scheduled = delay_seconds is not None or debounce_seconds is not None
        data = payload_object(name, payload)
        contract = await self._checked_contract(topic, name, expected_kind, scheduled=scheduled)
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
                stream, seq, duplicate = await self._send(outgoing)
            except Exception as error:
                span.failed(error)
                raise
            span.set("messaging.nats.stream_seq", seq)
        receipt = PublishReceipt(stream=stream, seq=seq, msg_id=outgoing.msg_id, duplicate=duplicate, due=outgoing.due)
        if duplicate:
            logger.info(
                "%s on topic %s with msg id %s is a duplicate of stream %s seq %d; nothing new was stored",
                name, topic, outgoing.msg_id, stream, seq,
            )
        elif outgoing.due is not None:
            logger.debug(
                "scheduled %s on topic %s msg id %s for %s on %s (stream %s seq %d)",
                name, topic, outgoing.msg_id, outgoing.due, outgoing.schedule_subject, stream, seq,
            )
        else:
            logger.debug("published %s on topic %s msg id %s as stream %s seq %d", name, topic, outgoing.msg_id, stream, seq)
        return receipt

    async def _send(self, outgoing: Outgoing) -> _Ack:
        """Publish one message and return its PubAck, retrying within the publish deadline."""
        inbox = self._inbox
        if inbox is None:
            ack = await publish_with_retry(
                self._nc, self._js, outgoing.destination, outgoing.body, outgoing.headers, stream=outgoing.stream,
                description=outgoing.describe(), deadline=self._publish_deadline, attempt_timeout=self._attempt_timeout,
            )
            return ack.stream, ack.seq, bool(ack.duplicate)
        headers = {**outgoing.headers, EXPECTED_STREAM_HEADER: outgoing.stream}
        subject, body = outgoing.destination, outgoing.body

        async def attempt(timeout: float) -> _Ack:
            return await inbox.request(subject, body, headers, timeout)

        return await _retrying(self._nc, attempt, outgoing.describe, self._publish_deadline, self._attempt_timeout)

    async def _send_many(self, outgoings: list[Outgoing], max_pending: int) -> list[_Ack]:
        """Publish all messages pipelined and return their PubAcks in order; see ``enqueue_many``."""
        if self._inbox is None:
            return [await self._send(outgoing) for outgoing in outgoings]
        inbox = self._inbox
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._publish_deadline
        acks: list[_Ack | None] = [None] * len(outgoings)
        rejected: dict[int, BaseException] = {}
        todo = list(range(len(outgoings)))
        pause, passes = 0.1, 0
        while True:
            passes += 1
            timeout = max(min(self._attempt_timeout, give_up_at - loop.time()), 0.05)
            collector = _Collector(len(outgoings))
            failed: dict[int, BaseException] = {}
            for index in todo:
                if not self._nc.is_connected:
                    closed = self._nc.is_closed
                    failed[index] = (
                        nats.errors.ConnectionClosedError() if closed else nats.errors.ConnectionReconnectingError()
                    )
                    continue
                outgoing = outgoings[index]
                # The headers were built for this call alone, so they take the expected stream in place.
                headers = outgoing.headers
                headers[EXPECTED_STREAM_HEADER] = outgoing.stream
                if collector.pending >= max_pending:
                    await collector.wait_below(max_pending)
                collector.pending += 1
                try:
                    await inbox.send(outgoing.destination, outgoing.body, headers, timeout, collector, index)
                except Exception as error:  # noqa: BLE001 - sorted below like a failed PubAck
                    collector.pending -= 1
                    failed[index] = error
            await collector.wait_below(1)

            for index, ack in enumerate(collector.acks):
                if ack is not None:
                    acks[index] = ack
            failed.update(collector.errors)
            todo = []
            for index, error in failed.items():
                closed = isinstance(error, nats.errors.ConnectionClosedError)
                if is_temporary(error) and not closed:
                    todo.append(index)
                else:
                    rejected[index] = error
            todo.sort()
            if not todo or loop.time() + pause >= give_up_at:
                break
            wait = pause * random.uniform(0.5, 1.0)
            logger.warning(
                "%d of %d messages to %s got no PubAck on pass %d (%s); sending them again in %.2fs with the same "
                "msg ids", len(todo), len(outgoings), outgoings[todo[0]].destination, passes,
                type(failed[todo[0]]).__name__, wait,
            )
            await asyncio.sleep(wait)
            pause = min(pause * 2, 2.0)

        missing = sorted({*todo, *rejected})
        if not missing:
            return acks  # type: ignore[return-value]
        first = missing[0]
        error = rejected.get(first) or failed[first]
        translated = translate(error, outgoings[first].describe())
        receipts = [
            None if ack is None else PublishReceipt(stream=ack[0], seq=ack[1], msg_id=outgoing.msg_id, duplicate=ack[2])
            for outgoing, ack in zip(outgoings, acks, strict=True)
        ]
        raise PublishIncomplete(
            f"{len(missing)} of {len(outgoings)} messages were not stored ({translated}); publish them again "
            "with their msg ids as dedupe keys (see the error's receipts and msg_ids)",
            receipts, [outgoing.msg_id for outgoing in outgoings],
        ) from error

    @staticmethod
    def _check_kind(contract: Contract, name: str, expected_kind: str) -> None:
        if contract.kind == expected_kind:
            return
        if expected_kind == "tasks":
            raise PayloadError(
                f"topic {contract.topic!r} carries domain events, not tasks; publish {name!r} with publish_event"
            )
        raise PayloadError(f"topic {contract.topic!r} carries tasks, not domain events; send {name!r} with enqueue")



def _add_tenancy_headers(headers: dict[str, str], data: Mapping[str, Any], keys: tuple[tuple[str, str], ...]) -> None:
    for key, header in keys:
        value = data.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            headers[header] = str(value)


def _copy_trace_headers(source: Mapping[str, str], target: dict[str, str]) -> None:
    for header in (_tracing.TRACEPARENT_HEADER, _tracing.TRACESTATE_HEADER, "baggage"):
        value = source.get(header)
        if value is not None:
            target[header] = value


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
        msg_id = new_msg_id()
    else:
        msg_id = dedupe_key or new_msg_id()
    wait = delay if delay is not None else debounce
    if now is None and wait is not None:
        now = datetime.now(timezone.utc)
    headers = {
        MSG_ID_HEADER: msg_id,
        NAME_HEADER: name,
        PUBLISHED_AT_HEADER: now.isoformat(timespec="milliseconds") if now is not None else _published_at(),
    }
    _add_tenancy_headers(headers, data, _header_keys(contract.required_keys))

    if wait is None:
        return Outgoing(topic, name, subject, contract.stream, body, headers, msg_id)
    assert now is not None
    due = _schedule.due_at(wait, now)
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
    the message if its subject belongs to another stream. Retries as ``_retrying``
    describes. ``description`` names the message and subject in the error and in the logs.
    """

    async def attempt(timeout: float) -> PubAck:
        # nats-py adds the expected-stream header to the dict it is given, so pass a copy.
        return await js.publish(subject, body, timeout=timeout, stream=stream, headers=dict(headers))

    return await _retrying(nc, attempt, lambda: description, deadline, attempt_timeout)


async def _retrying(
    nc: NATS, attempt: Callable[[float], Awaitable[T]], describe: Callable[[], str], deadline: float,
    attempt_timeout: float,
) -> T:
    """Run ``attempt(timeout)`` until it succeeds, retrying temporary failures within ``deadline`` seconds.

    While the client is reconnecting nothing is sent, because nats-py would buffer the
    request and deliver it after the caller received the failure. Pauses between attempts
    grow from 0.1 s to 2 s with jitter, so publishers that failed together do not retry
    together. Raises the translated error of the last attempt; non-temporary errors (a
    rejected message, a closed connection) are raised at once. ``describe`` is called
    only when there is something to log or raise.
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline
    pause = 0.1
    number = 0
    while True:
        number += 1
        timeout = max(min(attempt_timeout, give_up_at - loop.time()), 0.05)
        try:
            if not nc.is_connected:
                raise nats.errors.ConnectionClosedError() if nc.is_closed else nats.errors.ConnectionReconnectingError()
            return await attempt(timeout)
        except Exception as error:  # noqa: BLE001 - translated below
            # A closed connection never comes back; anything else temporary may.
            closed = isinstance(error, nats.errors.ConnectionClosedError)
            if not is_temporary(error) or closed or loop.time() + pause >= give_up_at:
                raise translate(error, describe()) from error
            wait = pause * random.uniform(0.5, 1.0)
            logger.warning(
                "%s failed on attempt %d: %s; retrying in %.2fs with the same msg id",
                describe(), number, type(error).__name__, wait,
            )
            await asyncio.sleep(wait)
            pause = min(pause * 2, 2.0)


# The content of a PubAck: the stream, its sequence, and whether the message was a duplicate.
_Ack = tuple[str, int, bool]


class _Collector:
    """Receives the outcome of each message of one enqueue_many pass, by index."""

    __slots__ = ("acks", "errors", "pending", "_wake")

    def __init__(self, size: int) -> None:
        self.acks: list[_Ack | None] = [None] * size
        self.errors: dict[int, BaseException] = {}
        self.pending = 0
        self._wake: asyncio.Future[None] | None = None

    def settle(self, index: int, ack: _Ack | None, error: BaseException | None) -> None:
        self.pending -= 1
        if error is None:
            self.acks[index] = ack
        else:
            self.errors[index] = error
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def wait_below(self, limit: int) -> None:
        """Return once fewer than ``limit`` messages of this pass await their PubAck."""
        while self.pending >= limit:
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake


class _Single:
    """Receives the outcome of one message into a future."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[_Ack]) -> None:
        self.future = future

    def settle(self, index: int, ack: _Ack | None, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(ack)  # type: ignore[arg-type]
        else:
            self.future.set_exception(error)


class _AckInbox:
    """Sends JetStream publishes and receives their PubAcks on one wildcard subscription.

    nats-py's ``js.publish`` makes a request per message, with a reply token from
    os.urandom and a timer and waiter each time, and ``publish_async`` waits on a
    semaphore per message. Here one subscription serves every publish of the publisher,
    the reply token is a counter, and one timer watches the timeouts of all messages in
    flight. Publishes from concurrent callers, and the messages of ``enqueue_many``,
    travel pipelined on the connection, each waiting for its own PubAck. The commands
    are written through ``Wire``, which encodes the headers in one step.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._wire = Wire.for_client(nc)
        self._prefix = ""
        self._subscribed = False
        self._lock = asyncio.Lock()
        self._tokens = itertools.count()
        # Reply token -> (receiver, its index, when the attempt times out); oldest first.
        self._waiting: dict[str, tuple[Any, int, float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def _subscribe(self) -> None:
        async with self._lock:
            if not self._subscribed:
                prefix = self._nc.new_inbox() + "."
                await self._nc.subscribe(prefix + "*", cb=self._on_reply)
                self._prefix = prefix
                self._subscribed = True

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str], timeout: float, receiver: Any, index: int
    ) -> str:
        """Publish one message; ``receiver.settle(index, ack, error)`` runs when its PubAck, an error or the timeout comes."""
        if not self._subscribed:
            await self._subscribe()
        token = f"{next(self._tokens):x}"
        loop = asyncio.get_running_loop()
        expires = loop.time() + timeout
        self._waiting[token] = (receiver, index, expires)
        timer = self._timer
        if timer is None or expires < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(expires, self._expire)
        try:
            if self._wire is not None:
                await self._wire.publish(subject, body, self._prefix + token, headers)
            else:
                await self._nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return token

    async def request(self, subject: str, body: bytes, headers: dict[str, str], timeout: float) -> _Ack:
        future: asyncio.Future[_Ack] = asyncio.get_running_loop().create_future()
        token = await self.send(subject, body, headers, timeout, _Single(future), 0)
        try:
            return await future
        finally:
            self._waiting.pop(token, None)

    def _expire(self) -> None:
        """Fail the attempts whose time is up, and wake again when the next one's is."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        expired = [token for token, (_, _, expires) in self._waiting.items() if expires <= now]
        for token in expired:
            receiver, index, _ = self._waiting.pop(token)
            receiver.settle(index, None, nats.errors.TimeoutError())
        if self._waiting:
            self._timer = asyncio.get_running_loop().call_at(
                min(expires for _, _, expires in self._waiting.values()), self._expire
            )

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if entry is None:
            return  # the attempt timed out already
        receiver, index, _ = entry
        ack: _Ack | None = None
        error: BaseException | None = None
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            error = nats.js.errors.NoStreamResponseError()
        else:
            try:
                # Decoding first spares json.loads its detection of the byte encoding.
                reply = json.loads(msg.data.decode())
                if "error" in reply:
                    nats.js.errors.APIError.from_error(reply["error"])  # raises the matching APIError
                ack = (reply["stream"], reply["seq"], bool(reply.get("duplicate")))
            except Exception as failure:  # noqa: BLE001 - handed to the waiting publish
                error = failure
        receiver.settle(index, ack, error)
