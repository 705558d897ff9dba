"""SQLAlchemy helpers: write outbox rows through a ``Session`` or an ``AsyncSession``.

The row joins the session's transaction (SQLAlchemy opens one on first use), so it commits
with ``session.commit()`` and disappears with ``session.rollback()``. PostgreSQL (any
driver: psycopg, asyncpg, ...) and SQLite are supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eventrails._outbox._contracts import ContractRegistry
from eventrails._outbox._dberrors import translate_write_error
from eventrails._outbox._port import DEFAULT_TABLE, AsyncOutboxWriter, OutboxError, OutboxMessage, OutboxWriter
from eventrails._outbox._sqlite import sqlite_time

if TYPE_CHECKING:
    from sqlalchemy import TextClause
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session


def _statement(dialect: Dialect, table: str) -> TextClause:
    from sqlalchemy import text

    if dialect.name == "postgresql":
        return text(
            f"INSERT INTO {table} (id, topic, name, payload, headers, aggregate_key) VALUES "
            "(CAST(:id AS uuid), :topic, :name, CAST(:payload AS jsonb), CAST(:headers AS jsonb), :aggregate_key)"
        )
    if dialect.name == "sqlite":
        return text(
            f"INSERT INTO {table} (id, topic, name, payload, headers, aggregate_key, created_at, available_at) "
            "VALUES (:id, :topic, :name, :payload, :headers, :aggregate_key, :now, :now)"
        )
    raise OutboxError(f"the outbox supports PostgreSQL and SQLite, not SQLAlchemy dialect {dialect.name!r}")


def _params(dialect: Dialect, message: OutboxMessage) -> dict[str, Any]:
    params: dict[str, Any] = {
        "id": message.id if dialect.name == "postgresql" else str(message.id),
        "topic": message.topic, "name": message.name, "payload": message.payload_json(),
        "headers": message.headers_json(), "aggregate_key": message.aggregate_key,
    }
    if dialect.name == "sqlite":
        params["now"] = sqlite_time()
    return params


class SQLAlchemyOutbox(OutboxWriter):
    """Writes outbox rows through a SQLAlchemy ``Session``, in its transaction."""

    def __init__(self, session: Session, contracts: ContractRegistry, *, table: str = DEFAULT_TABLE) -> None:
        super().__init__(contracts, table)
        self._session = session

    def _insert(self, message: OutboxMessage) -> None:
        from sqlalchemy.exc import DBAPIError

        dialect = self._session.get_bind().dialect
        try:
            self._session.execute(_statement(dialect, self.table), _params(dialect, message))
        except DBAPIError as error:
            raise translate_write_error(error, self.table) from error


class AsyncSQLAlchemyOutbox(AsyncOutboxWriter):
    """Writes outbox rows through a SQLAlchemy ``AsyncSession``, in its transaction."""

    def __init__(self, session: AsyncSession, contracts: ContractRegistry, *, table: str = DEFAULT_TABLE) -> None:
        super().__init__(contracts, table)
        self._session = session

    async def _insert(self, message: OutboxMessage) -> None:
        from sqlalchemy.exc import DBAPIError

        dialect = self._session.get_bind().dialect
        try:
            await self._session.execute(_statement(dialect, self.table), _params(dialect, message))
        except DBAPIError as error:
            raise translate_write_error(error, self.table) from error
