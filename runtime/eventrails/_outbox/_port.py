"""The outbox writer port: what domain code calls to record a task or event in its own transaction.

An adapter is bound to one open transaction of one driver (``PsycopgOutbox(conn, contracts)``,
``SQLiteOutbox(conn, contracts)``, ...). ``enqueue`` and ``publish_event`` check the row
exactly as ``Publisher`` checks a message: the name must be declared by the topic, the
payload must be a JSON object with the required (tenancy) keys. A bad row raises
PayloadError before anything is inserted, so the caller's transaction fails and can roll
back; nothing reaches the relay.

The row id is a UUID and becomes the message's ``Nats-Msg-Id``, so JetStream drops a
re-publish after a relay crash, and the consumer gets the row id as ``ctx.msg_id``.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from eventrails._errors import EventrailsError, PayloadError
from eventrails._outbox import _trace
from eventrails._outbox._contracts import ContractRegistry
from eventrails._publisher import encode_payload, payload_object, tenancy_header
from eventrails._resources import DEFAULT_TENANCY_KEYS

DEFAULT_TABLE = "eventrails_outbox"

# A table name, optionally schema-qualified; it is spliced into SQL, so nothing else is allowed.
TABLE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?"
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# Headers eventrails and the server set themselves; a caller's header must not replace them.
_RESERVED_PREFIXES = ("nats-", "eventrails-")
_AGGREGATE_KEY_MAX = 200


class OutboxError(EventrailsError):
    """The outbox cannot be used as called: its table is missing, or no transaction is open."""


def check_table(table: str) -> str:
    """Return ``table`` when it is a plain (optionally schema-qualified) identifier; raise OutboxError otherwise."""
    if not re.fullmatch(TABLE_PATTERN, table):
        raise OutboxError(
            f"outbox table name {table!r} is not a plain identifier; use letters, digits and '_' "
            "(optionally 'schema.table')"
        )
    return table


class OutboxMessage(BaseModel):
    """One outbox row as written: the id (also the message id), where it goes, and what it carries."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    topic: str
    name: str
    payload: dict[str, Any]
    headers: dict[str, str]
    aggregate_key: str | None = None

    @property
    def msg_id(self) -> str:
        """The ``Nats-Msg-Id`` the relay publishes this row with, and the consumer's ``ctx.msg_id``."""
        return str(self.id)

    def payload_json(self) -> str:
        return encode_payload(self.name, self.payload).decode()

    def headers_json(self) -> str:
        return encode_payload(self.name, self.headers).decode()


def _check_headers(name: str, headers: Mapping[str, str] | None) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
            raise PayloadError(f"header name {key!r} of {name!r} is not a valid header token; use letters, digits and '-'")
        if key.lower().startswith(_RESERVED_PREFIXES):
            raise PayloadError(
                f"header {key!r} of {name!r} is set by eventrails or NATS; pass trace context headers only"
            )
        # NOTE: the relay publishes through Publisher, which takes no extra headers, so only
        # trace context reaches the message (as the context the relay publishes in).
        forwarded = _trace.forwarded_headers()
        if key.lower() not in forwarded:
            allowed = ", ".join(sorted(forwarded)) or "none: install opentelemetry-api to carry trace context"
            raise PayloadError(
                f"header {key!r} of {name!r} cannot travel through the outbox: only trace context headers "
                f"are forwarded ({allowed}); put other values in the payload"
            )
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise PayloadError(f"header {key!r} of {name!r} must be a one-line string, got {value!r}")
        checked[key] = value
    return checked


def build_message(
    contracts: ContractRegistry, kind: Literal["tasks", "events"], topic: str, name: str,
    payload: BaseModel | Mapping[str, Any], *, aggregate_key: str | None, headers: Mapping[str, str] | None,
    msg_id: uuid.UUID | None,
) -> OutboxMessage:
    """Check a row against its topic's contract and return it; raise PayloadError for a bad one.

    The checks are the publisher's, so a row that passes here is one ``Publisher`` accepts.
    """
    contract = contracts.get(topic)
    if contract.kind != kind:
        if kind == "tasks":
            raise PayloadError(f"topic {topic!r} carries domain events, not tasks; write {name!r} with publish_event")
        raise PayloadError(f"topic {topic!r} carries tasks, not domain events; write {name!r} with enqueue")
    data = payload_object(name, payload)
    contract.check_name(name)
    contract.check_payload(name, data)
    encode_payload(name, data)
    if aggregate_key is not None and (
        not isinstance(aggregate_key, str) or not aggregate_key.strip() or len(aggregate_key) > _AGGREGATE_KEY_MAX
    ):
        raise PayloadError(
            f"aggregate_key of {name!r} must be a non-empty string of at most {_AGGREGATE_KEY_MAX} characters, "
            f"got {aggregate_key!r}"
        )
    if msg_id is not None and not isinstance(msg_id, uuid.UUID):
        raise PayloadError(f"msg_id of {name!r} must be a uuid.UUID, got {type(msg_id).__name__}")

    all_headers = _check_headers(name, headers)
    _trace.capture(all_headers)
    for key in dict.fromkeys((*DEFAULT_TENANCY_KEYS, *contract.required_keys)):
        value = data.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            all_headers[tenancy_header(key)] = str(value)
    return OutboxMessage(
        id=msg_id or uuid.uuid4(), topic=topic, name=name, payload=data, headers=all_headers,
        aggregate_key=aggregate_key,
    )


class _WriterBase:
    def __init__(self, contracts: ContractRegistry, table: str) -> None:
        self.contracts = contracts
        self.table = check_table(table)

    def _task(
        self, topic: str, task: str, payload: BaseModel | Mapping[str, Any], aggregate_key: str | None,
        headers: Mapping[str, str] | None, msg_id: uuid.UUID | None,
    ) -> OutboxMessage:
        return build_message(
            self.contracts, "tasks", topic, task, payload, aggregate_key=aggregate_key, headers=headers, msg_id=msg_id,
        )

    def _event(
        self, name: str, payload: BaseModel | Mapping[str, Any], topic: str | None, aggregate_key: str | None,
        headers: Mapping[str, str] | None, msg_id: uuid.UUID | None,
    ) -> OutboxMessage:
        return build_message(
            self.contracts, "events", topic or self.contracts.events_topic, name, payload,
            aggregate_key=aggregate_key, headers=headers, msg_id=msg_id,
        )


class OutboxWriter(_WriterBase, ABC):
    """Writes outbox rows into the caller's open transaction (synchronous drivers).

    ``aggregate_key`` orders rows: the relay publishes the rows of one key in the order they
    were written, one at a time. ``headers`` carries trace context (``traceparent``) when
    it is not the current OpenTelemetry context. ``msg_id`` sets the row id, by default a
    random UUID.
    """

    def enqueue(
        self, topic: str, task: str, payload: BaseModel | Mapping[str, Any], *, aggregate_key: str | None = None,
        headers: Mapping[str, str] | None = None, msg_id: uuid.UUID | None = None,
    ) -> OutboxMessage:
        """Record task ``task`` for queue topic ``topic``; raise PayloadError for a row the topic refuses."""
        message = self._task(topic, task, payload, aggregate_key, headers, msg_id)
        self._insert(message)
        return message

    def publish_event(
        self, name: str, payload: BaseModel | Mapping[str, Any], *, topic: str | None = None,
        aggregate_key: str | None = None, headers: Mapping[str, str] | None = None, msg_id: uuid.UUID | None = None,
    ) -> OutboxMessage:
        """Record domain event ``name`` for ``topic`` (by default the registry's events topic)."""
        message = self._event(name, payload, topic, aggregate_key, headers, msg_id)
        self._insert(message)
        return message

    @abstractmethod
    def _insert(self, message: OutboxMessage) -> None:
        """Insert the row with the caller's connection, inside its transaction."""


class AsyncOutboxWriter(_WriterBase, ABC):
    """Writes outbox rows into the caller's open transaction (asyncio drivers); see OutboxWriter."""

    async def enqueue(
        self, topic: str, task: str, payload: BaseModel | Mapping[str, Any], *, aggregate_key: str | None = None,
        headers: Mapping[str, str] | None = None, msg_id: uuid.UUID | None = None,
    ) -> OutboxMessage:
        """Record task ``task`` for queue topic ``topic``; raise PayloadError for a row the topic refuses."""
        message = self._task(topic, task, payload, aggregate_key, headers, msg_id)
        await self._insert(message)
        return message

    async def publish_event(
        self, name: str, payload: BaseModel | Mapping[str, Any], *, topic: str | None = None,
        aggregate_key: str | None = None, headers: Mapping[str, str] | None = None, msg_id: uuid.UUID | None = None,
    ) -> OutboxMessage:
        """Record domain event ``name`` for ``topic`` (by default the registry's events topic)."""
        message = self._event(name, payload, topic, aggregate_key, headers, msg_id)
        await self._insert(message)
        return message

    @abstractmethod
    async def _insert(self, message: OutboxMessage) -> None:
        """Insert the row with the caller's connection, inside its transaction."""
