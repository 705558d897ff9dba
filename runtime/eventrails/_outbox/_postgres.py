"""PostgreSQL writers: psycopg 3 (sync and async) and asyncpg, each inserting into the caller's transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eventrails._outbox._contracts import ContractRegistry
from eventrails._outbox._dberrors import translate_write_error
from eventrails._outbox._port import DEFAULT_TABLE, AsyncOutboxWriter, OutboxError, OutboxMessage, OutboxWriter

if TYPE_CHECKING:
    import asyncpg
    import psycopg

_NO_TRANSACTION = (
    "{driver} connection is in autocommit mode with no transaction open, so the outbox row would "
    "commit on its own, apart from your business write; {fix}"
)


def _psycopg_insert(table: str) -> str:
    return (
        f"INSERT INTO {table} (id, topic, name, payload, headers, aggregate_key) "
        "VALUES (%s, %s, %s, %s::jsonb, %s::jsonb, %s)"
    )


def _params(message: OutboxMessage) -> tuple[Any, ...]:
    return (message.id, message.topic, message.name, message.payload_json(), message.headers_json(), message.aggregate_key)


def _check_psycopg_transaction(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    from psycopg.pq import TransactionStatus

    if connection.autocommit and connection.info.transaction_status == TransactionStatus.IDLE:
        raise OutboxError(_NO_TRANSACTION.format(
            driver="the psycopg", fix="write inside `with conn.transaction():` (or `async with`)",
        ))


class PsycopgOutbox(OutboxWriter):
    """Writes outbox rows with a psycopg 3 ``Connection``, in its current transaction.

    The connection's transaction is the caller's to commit or roll back; the row commits with it.
    """

    def __init__(
        self, connection: psycopg.Connection[Any], contracts: ContractRegistry, *, table: str = DEFAULT_TABLE,
    ) -> None:
        super().__init__(contracts, table)
        self._connection = connection
        self._sql = _psycopg_insert(self.table)

    def _insert(self, message: OutboxMessage) -> None:
        import psycopg

        _check_psycopg_transaction(self._connection)
        try:
            self._connection.execute(self._sql.encode(), _params(message))
        except psycopg.Error as error:
            raise translate_write_error(error, self.table) from error


class AsyncPsycopgOutbox(AsyncOutboxWriter):
    """Writes outbox rows with a psycopg 3 ``AsyncConnection``, in its current transaction."""

    def __init__(
        self, connection: psycopg.AsyncConnection[Any], contracts: ContractRegistry, *, table: str = DEFAULT_TABLE,
    ) -> None:
        super().__init__(contracts, table)
        self._connection = connection
        self._sql = _psycopg_insert(self.table)

    async def _insert(self, message: OutboxMessage) -> None:
        import psycopg

        _check_psycopg_transaction(self._connection)
        try:
            await self._connection.execute(self._sql.encode(), _params(message))
        except psycopg.Error as error:
            raise translate_write_error(error, self.table) from error


class AsyncpgOutbox(AsyncOutboxWriter):
    """Writes outbox rows with an asyncpg ``Connection`` inside ``async with conn.transaction():``.

    asyncpg commits every statement outside a transaction block, so writing without one
    raises OutboxError instead of committing the row apart from the business write.
    """

    def __init__(self, connection: asyncpg.Connection, contracts: ContractRegistry, *, table: str = DEFAULT_TABLE) -> None:
        super().__init__(contracts, table)
        self._connection = connection
        self._sql = (
            f"INSERT INTO {self.table} (id, topic, name, payload, headers, aggregate_key) "
            "VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6)"
        )

    async def _insert(self, message: OutboxMessage) -> None:
        import asyncpg

        if not self._connection.is_in_transaction():
            raise OutboxError(
                "the asyncpg connection has no transaction open, so the outbox row would commit on its own, "
                "apart from your business write; write inside `async with conn.transaction():`"
            )
        try:
            await self._connection.execute(self._sql, *_params(message))
        except asyncpg.PostgresError as error:
            raise translate_write_error(error, self.table) from error
