"""Every outbox writer against a real database: the row commits and rolls back with the caller's
transaction, a bad row fails that transaction, and misuse is refused with a clear error."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from eventrails import (
    AioSQLiteOutbox,
    AsyncpgOutbox,
    AsyncPsycopgOutbox,
    AsyncSQLAlchemyOutbox,
    ContractRegistry,
    OutboxError,
    OutboxMessage,
    PayloadError,
    PsycopgOutbox,
    SQLAlchemyOutbox,
    SQLiteOutbox,
    apply_outbox_schema,
    migrate_outbox,
)
from eventrails._manifests import parse_resource
from eventrails._resources import API_VERSION, Topic

pytestmark = pytest.mark.integration

TENANCY = {"organizationId": "org_1", "projectId": "prj_1"}
BUSINESS_TABLE = "CREATE TABLE orders (id TEXT PRIMARY KEY)"


def _topic(name: str, **spec: Any) -> Topic:
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}
    topic = parse_resource(body)
    assert isinstance(topic, Topic)
    return topic


CONTRACTS = ContractRegistry.from_topics([
    _topic("orders", tasks=["send-email", "refresh-cache"], payload={"exempt": ["refresh-cache"]}),
    _topic("domain-events", events=["OrderPlaced"]),
])

# Writes one order row and the outbox row(s) `act` adds, in one transaction, then commits
# or rolls back. `act` gets the writer and returns what the writer returned.
Act = Callable[[Any], Awaitable[OutboxMessage]]


@dataclass
class Database:
    """One driver's way into a test database, plus plain reads to check what committed."""

    driver: str
    dialect: str
    location: str
    transact: Callable[[str, Act, bool], Awaitable[OutboxMessage]]

    def outbox_rows(self) -> list[dict[str, Any]]:
        query = "SELECT id, topic, name, payload, headers, aggregate_key, attempts, published_at FROM eventrails_outbox"
        if self.dialect == "sqlite":
            with sqlite3.connect(self.location) as connection:
                rows = connection.execute(query + " ORDER BY seq").fetchall()
            return [
                {"id": r[0], "topic": r[1], "name": r[2], "payload": json.loads(r[3]), "headers": json.loads(r[4]),
                 "aggregate_key": r[5], "attempts": r[6], "published_at": r[7]}
                for r in rows
            ]
        with psycopg.connect(self.location) as connection:
            rows = connection.execute(query.encode() + b" ORDER BY seq").fetchall()
        return [
            {"id": str(r[0]), "topic": r[1], "name": r[2], "payload": r[3], "headers": r[4], "aggregate_key": r[5],
             "attempts": r[6], "published_at": r[7]}
            for r in rows
        ]

    def orders(self) -> list[str]:
        if self.dialect == "sqlite":
            with sqlite3.connect(self.location) as connection:
                return [row[0] for row in connection.execute("SELECT id FROM orders ORDER BY id")]
        with psycopg.connect(self.location) as connection:
            return [row[0] for row in connection.execute(b"SELECT id FROM orders ORDER BY id")]


def _prepare_postgres(dsn: str) -> None:
    migrate_outbox(dsn)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(BUSINESS_TABLE.encode())


def _prepare_sqlite(path: Path) -> str:
    connection = sqlite3.connect(path)
    apply_outbox_schema(connection)
    connection.execute(BUSINESS_TABLE)
    connection.commit()
    connection.close()
    return str(path)


def _psycopg(dsn: str) -> Database:
    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        with psycopg.connect(dsn) as connection:
            try:
                connection.execute(b"INSERT INTO orders (id) VALUES (%s)", (order_id,))
                message = await act(PsycopgOutbox(connection, CONTRACTS))
            except BaseException:
                connection.rollback()
                raise
            connection.commit() if commit else connection.rollback()
            return message

    return Database("psycopg", "postgresql", dsn, transact)


def _psycopg_async(dsn: str) -> Database:
    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            try:
                async with connection.transaction():
                    await connection.execute(b"INSERT INTO orders (id) VALUES (%s)", (order_id,))
                    message = await act(AsyncPsycopgOutbox(connection, CONTRACTS))
                    if not commit:
                        raise _Rollback()
            except _Rollback:
                pass
            return message

    return Database("psycopg-async", "postgresql", dsn, transact)


def _asyncpg(dsn: str) -> Database:
    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        connection = await asyncpg.connect(dsn)
        try:
            transaction = connection.transaction()
            await transaction.start()
            try:
                await connection.execute("INSERT INTO orders (id) VALUES ($1)", order_id)
                message = await act(AsyncpgOutbox(connection, CONTRACTS))
            except BaseException:
                await transaction.rollback()
                raise
            await (transaction.commit() if commit else transaction.rollback())
            return message
        finally:
            await connection.close()

    return Database("asyncpg", "postgresql", dsn, transact)


def _sqlalchemy(url: str, location: str, dialect: str) -> Database:
    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        engine = create_engine(url)
        try:
            with Session(engine) as session:
                try:
                    session.execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": order_id})
                    message = await act(SQLAlchemyOutbox(session, CONTRACTS))
                except BaseException:
                    session.rollback()
                    raise
                session.commit() if commit else session.rollback()
                return message
        finally:
            engine.dispose()

    return Database(f"sqlalchemy-{dialect}", dialect, location, transact)


def _sqlalchemy_async(url: str, location: str, dialect: str) -> Database:
    from sqlalchemy.ext.asyncio import AsyncSession

    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        engine = create_async_engine(url)
        try:
            async with AsyncSession(engine) as session:
                try:
                    await session.execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": order_id})
                    message = await act(AsyncSQLAlchemyOutbox(session, CONTRACTS))
                except BaseException:
                    await session.rollback()
                    raise
                await (session.commit() if commit else session.rollback())
                return message
        finally:
            await engine.dispose()

    return Database(f"sqlalchemy-async-{dialect}", dialect, location, transact)


def _sqlite3(path: str) -> Database:
    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        connection = sqlite3.connect(path)
        try:
            try:
                connection.execute("INSERT INTO orders (id) VALUES (?)", (order_id,))
                message = await act(SQLiteOutbox(connection, CONTRACTS))
            except BaseException:
                connection.rollback()
                raise
            connection.commit() if commit else connection.rollback()
            return message
        finally:
            connection.close()

    return Database("sqlite3", "sqlite", path, transact)


def _aiosqlite(path: str) -> Database:
    async def transact(order_id: str, act: Act, commit: bool) -> OutboxMessage:
        async with aiosqlite.connect(path) as connection:
            try:
                await connection.execute("INSERT INTO orders (id) VALUES (?)", (order_id,))
                message = await act(AioSQLiteOutbox(connection, CONTRACTS))
            except BaseException:
                await connection.rollback()
                raise
            await (connection.commit() if commit else connection.rollback())
            return message

    return Database("aiosqlite", "sqlite", path, transact)


class _Rollback(Exception):
    """Leaves a transaction block by rolling it back."""


DRIVERS = [
    "psycopg", "psycopg-async", "asyncpg", "sqlalchemy-postgresql", "sqlalchemy-async-postgresql",
    "sqlite3", "aiosqlite", "sqlalchemy-sqlite", "sqlalchemy-async-sqlite",
]


@pytest.fixture(params=DRIVERS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    driver: str = request.param
    if driver.endswith("sqlite") or driver in ("sqlite3", "aiosqlite"):
        path = _prepare_sqlite(tmp_path / "app.db")
        return {
            "sqlite3": lambda: _sqlite3(path),
            "aiosqlite": lambda: _aiosqlite(path),
            "sqlalchemy-sqlite": lambda: _sqlalchemy(f"sqlite:///{path}", path, "sqlite"),
            "sqlalchemy-async-sqlite": lambda: _sqlalchemy_async(f"sqlite+aiosqlite:///{path}", path, "sqlite"),
        }[driver]()
    dsn: str = request.getfixturevalue("pg_dsn")
    _prepare_postgres(dsn)
    rest = dsn.removeprefix("postgresql://")
    return {
        "psycopg": lambda: _psycopg(dsn),
        "psycopg-async": lambda: _psycopg_async(dsn),
        "asyncpg": lambda: _asyncpg(dsn),
        "sqlalchemy-postgresql": lambda: _sqlalchemy(f"postgresql+psycopg://{rest}", dsn, "postgresql"),
        "sqlalchemy-async-postgresql": lambda: _sqlalchemy_async(f"postgresql+asyncpg://{rest}", dsn, "postgresql"),
    }[driver]()


async def _call(result: Any) -> Any:
    return await result if asyncio.iscoroutine(result) else result


def enqueue(payload: dict[str, Any], **options: Any) -> Act:
    async def act(writer: Any) -> OutboxMessage:
        return await _call(writer.enqueue("orders", "send-email", payload, **options))

    return act


# --- every driver ----------------------------------------------------------------------------------


async def test_writer_commit(database: Database) -> None:
    payload = {**TENANCY, "emailId": 1}
    message = await database.transact("ord-1", enqueue(payload, aggregate_key="ord-1"), True)

    assert database.orders() == ["ord-1"]
    [row] = database.outbox_rows()
    assert row["id"] == message.msg_id
    assert (row["topic"], row["name"], row["payload"], row["aggregate_key"]) == ("orders", "send-email", payload, "ord-1")
    assert row["headers"] == {"Eventrails-Organization-Id": "org_1", "Eventrails-Project-Id": "prj_1"}
    assert (row["attempts"], row["published_at"]) == (0, None)


async def test_writer_rollback(database: Database) -> None:
    await database.transact("ord-1", enqueue({**TENANCY, "emailId": 1}), False)
    assert database.orders() == []
    assert database.outbox_rows() == []


async def test_writer_bad_payload(database: Database) -> None:
    with pytest.raises(PayloadError, match="lacks required key\\(s\\) 'organizationId'"):
        await database.transact("ord-1", enqueue({"projectId": "prj_1", "emailId": 1}), True)
    assert database.orders() == [], "the business write rolled back with the refused row"
    assert database.outbox_rows() == []


async def test_writer_several_rows(database: Database) -> None:
    async def act(writer: Any) -> OutboxMessage:
        await _call(writer.enqueue("orders", "refresh-cache", {"cacheKey": "orders"}))
        return await _call(writer.publish_event("OrderPlaced", {**TENANCY, "orderId": "ord-1"}, aggregate_key="ord-1"))

    event = await database.transact("ord-1", act, True)
    rows = database.outbox_rows()
    assert [(row["topic"], row["name"]) for row in rows] == [("orders", "refresh-cache"), ("domain-events", "OrderPlaced")]
    assert rows[1]["id"] == event.msg_id


# --- misuse ----------------------------------------------------------------------------------------


async def test_writer_requires_a_transaction(pg_dsn: str, tmp_path: Path) -> None:
    _prepare_postgres(pg_dsn)
    payload = {**TENANCY, "emailId": 1}
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        with pytest.raises(OutboxError, match="autocommit mode with no transaction open"):
            PsycopgOutbox(connection, CONTRACTS).enqueue("orders", "send-email", payload)
        with connection.transaction():
            PsycopgOutbox(connection, CONTRACTS).enqueue("orders", "send-email", payload)
    connection = await asyncpg.connect(pg_dsn)
    try:
        with pytest.raises(OutboxError, match="no transaction open"):
            await AsyncpgOutbox(connection, CONTRACTS).enqueue("orders", "send-email", payload)
    finally:
        await connection.close()

    path = _prepare_sqlite(tmp_path / "app.db")
    lite = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(OutboxError, match="isolation_level=None"):
        SQLiteOutbox(lite, CONTRACTS).enqueue("orders", "send-email", payload)
    lite.execute("BEGIN")
    SQLiteOutbox(lite, CONTRACTS).enqueue("orders", "send-email", payload)
    lite.execute("COMMIT")
    lite.close()
    async with aiosqlite.connect(path, isolation_level=None) as alite:
        with pytest.raises(OutboxError, match="isolation_level=None"):
            await AioSQLiteOutbox(alite, CONTRACTS).enqueue("orders", "send-email", payload)

    with psycopg.connect(pg_dsn) as check:
        assert check.execute(b"SELECT count(*) FROM eventrails_outbox").fetchone() == (1,)
    with sqlite3.connect(path) as check_lite:
        assert check_lite.execute("SELECT count(*) FROM eventrails_outbox").fetchone() == (1,)


async def test_missing_table_error(pg_dsn: str, tmp_path: Path) -> None:
    payload = {**TENANCY, "emailId": 1}
    with psycopg.connect(pg_dsn) as connection:
        with pytest.raises(OutboxError, match="eventrails outbox migrate"):
            PsycopgOutbox(connection, CONTRACTS).enqueue("orders", "send-email", payload)
    connection = await asyncpg.connect(pg_dsn)
    try:
        async with connection.transaction():
            with pytest.raises(OutboxError, match="eventrails outbox migrate"):
                await AsyncpgOutbox(connection, CONTRACTS).enqueue("orders", "send-email", payload)
    finally:
        await connection.close()
    with sqlite3.connect(tmp_path / "empty.db") as lite:
        with pytest.raises(OutboxError, match="eventrails outbox migrate"):
            SQLiteOutbox(lite, CONTRACTS).enqueue("orders", "send-email", payload)
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with Session(engine) as session:
        with pytest.raises(OutboxError, match="eventrails outbox migrate"):
            SQLAlchemyOutbox(session, CONTRACTS).enqueue("orders", "send-email", payload)
    engine.dispose()


# --- PostgreSQL specifics --------------------------------------------------------------------------


async def test_notify_once_per_transaction(pg_dsn: str) -> None:
    _prepare_postgres(pg_dsn)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as listener:
        await listener.execute(b"LISTEN eventrails_outbox")
        with psycopg.connect(pg_dsn) as connection:
            writer = PsycopgOutbox(connection, CONTRACTS)
            for email_id in range(5):
                writer.enqueue("orders", "send-email", {**TENANCY, "emailId": email_id})
            connection.commit()
            for email_id in range(3):
                writer.enqueue("orders", "send-email", {**TENANCY, "emailId": email_id})
            connection.rollback()
        received = [notify.channel async for notify in listener.notifies(timeout=1.0)]
    assert received == ["eventrails_outbox"], "five rows in one committed transaction wake a relay once"


async def test_migrate_twice_and_in_a_transaction(pg_dsn: str, tmp_path: Path) -> None:
    migrate_outbox(pg_dsn)
    migrate_outbox(pg_dsn)
    with psycopg.connect(pg_dsn) as connection:
        connection.execute(b"SELECT 1")  # the caller's transaction is open
        apply_outbox_schema(connection, table="app_outbox")
        connection.rollback()
        tables = {row[0] for row in connection.execute(b"SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert "eventrails_outbox" in tables
    assert "app_outbox" not in tables, "apply_outbox_schema ran inside the caller's transaction, which rolled back"

    path = tmp_path / "app.db"
    migrate_outbox(f"sqlite:///{path}")
    migrate_outbox(f"sqlite:///{path}")
    with sqlite3.connect(path) as lite:
        assert lite.execute("SELECT count(*) FROM eventrails_outbox").fetchone() == (0,)


async def test_given_msg_id_is_unique(pg_dsn: str) -> None:
    _prepare_postgres(pg_dsn)
    row_id = uuid.uuid4()
    with psycopg.connect(pg_dsn) as connection:
        PsycopgOutbox(connection, CONTRACTS).enqueue("orders", "refresh-cache", {}, msg_id=row_id)
        connection.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            PsycopgOutbox(connection, CONTRACTS).enqueue("orders", "refresh-cache", {}, msg_id=row_id)

