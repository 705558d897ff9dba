"""SQLite writers: sqlite3 (sync) and aiosqlite (async), each inserting into the caller's transaction.

SQLite keeps timestamps as UTC text in one format with milliseconds, the same as the
table's defaults, so that comparing them as strings compares the times.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from eventrails._outbox._contracts import ContractRegistry
from eventrails._outbox._dberrors import translate_write_error
from eventrails._outbox._port import DEFAULT_TABLE, AsyncOutboxWriter, OutboxError, OutboxMessage, OutboxWriter

if TYPE_CHECKING:
    import aiosqlite


def sqlite_time(moment: datetime | None = None) -> str:
    """Return ``moment`` (default: now) as the outbox's SQLite timestamp text, such as 2025-01-31T12:00:00.123Z."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_sqlite_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def sqlite_insert(table: str) -> str:
    return (
        f"INSERT INTO {table} (id, topic, name, payload, headers, aggregate_key, created_at, available_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )


def sqlite_params(message: OutboxMessage) -> tuple[Any, ...]:
    now = sqlite_time()
    return (
        str(message.id), message.topic, message.name, message.payload_json(), message.headers_json(),
        message.aggregate_key, now, now,
    )


def _check_transaction(isolation_level: str | None, in_transaction: bool) -> None:
    # With isolation_level None the module commits each statement unless the caller ran BEGIN.
    # Otherwise it opens a transaction before the INSERT by itself.
    if isolation_level is None and not in_transaction:
        raise OutboxError(
            "the sqlite connection is in autocommit mode (isolation_level=None) with no transaction open, so "
            "the outbox row would commit on its own, apart from your business write; run BEGIN first "
            "(or use `with connection:` on a connection with the default isolation level)"
        )


class SQLiteOutbox(OutboxWriter):
    """Writes outbox rows with a ``sqlite3.Connection``, in its current transaction."""

    def __init__(self, connection: sqlite3.Connection, contracts: ContractRegistry, *, table: str = DEFAULT_TABLE) -> None:
        super().__init__(contracts, table)
        self._connection = connection
        self._sql = sqlite_insert(self.table)

    def _insert(self, message: OutboxMessage) -> None:
        _check_transaction(self._connection.isolation_level, self._connection.in_transaction)
        try:
            self._connection.execute(self._sql, sqlite_params(message))
        except sqlite3.Error as error:
            raise translate_write_error(error, self.table) from error


class AioSQLiteOutbox(AsyncOutboxWriter):
    """Writes outbox rows with an ``aiosqlite.Connection``, in its current transaction."""

    def __init__(
        self, connection: aiosqlite.Connection, contracts: ContractRegistry, *, table: str = DEFAULT_TABLE,
    ) -> None:
        super().__init__(contracts, table)
        self._connection = connection
        self._sql = sqlite_insert(self.table)

    async def _insert(self, message: OutboxMessage) -> None:
        _check_transaction(self._connection.isolation_level, self._connection.in_transaction)
        try:
            await self._connection.execute(self._sql, sqlite_params(message))
        except sqlite3.Error as error:
            raise translate_write_error(error, self.table) from error
