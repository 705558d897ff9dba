"""The relay's side of the outbox table: claim, mark, fail, park, purge and count rows.

Claims are leases: a claimed row carries ``claimed_by`` and ``claimed_until``, and no relay
claims a row whose lease is still running. A relay that dies leaves its rows claimed until
the lease runs out; then any relay takes them. The claim never uses an "id greater than
the last one seen" cursor: every cycle selects the oldest pending rows, so a row that
commits after rows with a higher ``seq`` is still found.

Rows with an ``aggregate_key`` are claimed only when no earlier row of the same key is
still unpublished (pending, in flight, backing off or parked). So the rows of one
aggregate are published in ``seq`` order, one at a time, while different aggregates go in
parallel. On PostgreSQL the claim takes row locks with ``FOR UPDATE SKIP LOCKED``, so
relays running side by side never wait on each other and never claim the same row. On
SQLite the claim is one UPDATE statement, which SQLite runs under its single write lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

from eventrails._outbox._dberrors import describe
from eventrails._outbox._dsn import OutboxDsn
from eventrails._outbox._port import DEFAULT_TABLE, check_table
from eventrails._outbox._schema import notify_channel
from eventrails._outbox._sqlite import parse_sqlite_time, sqlite_time

logger = logging.getLogger("eventrails.outbox")

T = TypeVar("T")

# How long a relay waits before opening its LISTEN connection again after losing it.
_LISTEN_RETRY_MAX = 30.0
# Rows deleted per statement when purging, so one purge never holds locks for long.
_PURGE_CHUNK = 5000
_ERROR_LIMIT = 2000


@dataclass(frozen=True)
class ClaimedRow:
    """A row a relay has claimed and now publishes."""

    id: str
    seq: int
    topic: str
    name: str
    payload: dict[str, Any]
    headers: dict[str, str]
    aggregate_key: str | None
    attempts: int
    created_at: datetime

    @property
    def msg_id(self) -> str:
        return self.id

    def describe(self) -> str:
        key = f" aggregate {self.aggregate_key}" if self.aggregate_key else ""
        return f"outbox row {self.id} ({self.topic}/{self.name}{key})"


@dataclass(frozen=True)
class ParkedRow:
    id: str
    topic: str
    name: str
    aggregate_key: str | None
    attempts: int
    last_error: str | None
    parked_at: datetime


@dataclass(frozen=True)
class OutboxStats:
    """Counts for the relay's gauges: rows waiting to be published, the oldest one's age, parked rows."""

    pending: int
    oldest_pending_age: float
    parked: int


class RelayStore(Protocol):
    """The relay's operations on the database that contains the outbox table."""

    display: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, relay_id: str, limit: int, lease: float) -> list[ClaimedRow]: ...

    async def mark_published(self, ids: Sequence[str]) -> int: ...

    async def record_failure(self, row_id: str, relay_id: str, error: str, retry_in: float, park: bool) -> None: ...

    async def release(self, ids: Sequence[str], relay_id: str, error: str) -> None: ...

    async def purge(self, retention: float) -> int: ...

    async def stats(self) -> OutboxStats: ...

    async def parked_rows(self, limit: int) -> list[ParkedRow]: ...

    async def unpark(self, ids: Sequence[str] | None) -> int: ...

    async def listen(self, wake: asyncio.Event, stopping: asyncio.Event) -> None: ...


def _clip(error: str) -> str:
    return error if len(error) <= _ERROR_LIMIT else error[: _ERROR_LIMIT - 3] + "..."


# --- PostgreSQL ------------------------------------------------------------------------------


class PostgresStore:
    """The outbox table on PostgreSQL, through psycopg 3 (asyncio).

    One connection in autocommit mode runs the relay's statements, each its own transaction,
    so no row lock outlives a statement. A second connection LISTENs for the insert trigger's
    notifications.
    """

    def __init__(self, dsn: OutboxDsn, table: str = DEFAULT_TABLE) -> None:
        self._dsn = dsn
        self.display = dsn.display
        self.table = t = check_table(table)
        self._channel = notify_channel(table)
        self._connection: Any = None
        self._lock = asyncio.Lock()
        self._sql_claim = f"""
            WITH candidates AS (
                SELECT o.id FROM {t} o
                WHERE o.published_at IS NULL AND o.parked_at IS NULL
                  AND o.available_at <= now()
                  AND (o.claimed_until IS NULL OR o.claimed_until < now())
                  AND (o.aggregate_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM {t} p
                      WHERE p.aggregate_key = o.aggregate_key AND p.published_at IS NULL AND p.seq < o.seq))
                ORDER BY o.seq
                LIMIT %(limit)s
                FOR UPDATE OF o SKIP LOCKED
            )
            UPDATE {t} r SET claimed_by = %(relay)s, claimed_until = now() + make_interval(secs => %(lease)s)
            FROM candidates c WHERE r.id = c.id
            RETURNING r.id, r.seq, r.topic, r.name, r.payload, r.headers, r.aggregate_key, r.attempts, r.created_at"""
        self._sql_mark = f"""
            UPDATE {t} SET published_at = now(), claimed_by = NULL, claimed_until = NULL
            WHERE id = ANY(%(ids)s::uuid[]) AND published_at IS NULL"""
        self._sql_fail = f"""
            UPDATE {t} SET attempts = attempts + 1, last_error = %(error)s, claimed_by = NULL, claimed_until = NULL,
                available_at = now() + make_interval(secs => %(retry_in)s),
                parked_at = CASE WHEN %(park)s THEN now() END
            WHERE id = %(id)s::uuid AND published_at IS NULL AND claimed_by = %(relay)s"""
        self._sql_release = f"""
            UPDATE {t} SET last_error = %(error)s, claimed_by = NULL, claimed_until = NULL
            WHERE id = ANY(%(ids)s::uuid[]) AND published_at IS NULL AND claimed_by = %(relay)s"""
        self._sql_purge = f"""
            DELETE FROM {t} WHERE id IN (
                SELECT id FROM {t} WHERE published_at < now() - make_interval(secs => %(retention)s) LIMIT %(chunk)s)"""
        self._sql_stats = f"""
            SELECT count(*) FILTER (WHERE parked_at IS NULL),
                   coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL)), 0),
                   count(*) FILTER (WHERE parked_at IS NOT NULL)
            FROM {t} WHERE published_at IS NULL"""

    async def open(self) -> None:
        await self._connect()

    async def _connect(self) -> Any:
        import psycopg

        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(self._dsn.url, autocommit=True)
        return self._connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _execute(self, sql: str, params: dict[str, Any]) -> Any:
        import psycopg

        async with self._lock:
            connection = await self._connect()
            try:
                return await connection.execute(sql.encode(), params)
            except psycopg.OperationalError:
                # A broken connection is replaced on the next statement.
                if connection.broken:
                    await connection.close()
                raise

    async def claim(self, relay_id: str, limit: int, lease: float) -> list[ClaimedRow]:
        cursor = await self._execute(self._sql_claim, {"limit": limit, "relay": relay_id, "lease": lease})
        rows = [
            ClaimedRow(
                id=str(row[0]), seq=row[1], topic=row[2], name=row[3], payload=row[4], headers=row[5] or {},
                aggregate_key=row[6], attempts=row[7], created_at=row[8],
            )
            for row in await cursor.fetchall()
        ]
        rows.sort(key=lambda row: row.seq)
        return rows

    async def mark_published(self, ids: Sequence[str]) -> int:
        cursor = await self._execute(self._sql_mark, {"ids": list(ids)})
        return int(cursor.rowcount)

    async def record_failure(self, row_id: str, relay_id: str, error: str, retry_in: float, park: bool) -> None:
        await self._execute(
            self._sql_fail, {"id": row_id, "relay": relay_id, "error": _clip(error), "retry_in": retry_in, "park": park},
        )

    async def release(self, ids: Sequence[str], relay_id: str, error: str) -> None:
        await self._execute(self._sql_release, {"ids": list(ids), "relay": relay_id, "error": _clip(error)})

    async def purge(self, retention: float) -> int:
        total = 0
        while True:
            cursor = await self._execute(self._sql_purge, {"retention": retention, "chunk": _PURGE_CHUNK})
            total += int(cursor.rowcount)
            if cursor.rowcount < _PURGE_CHUNK:
                return total

    async def stats(self) -> OutboxStats:
        cursor = await self._execute(self._sql_stats, {})
        pending, oldest, parked = await cursor.fetchone()
        return OutboxStats(pending=int(pending), oldest_pending_age=float(oldest), parked=int(parked))

    async def parked_rows(self, limit: int) -> list[ParkedRow]:
        cursor = await self._execute(
            f"SELECT id, topic, name, aggregate_key, attempts, last_error, parked_at FROM {self.table} "
            "WHERE parked_at IS NOT NULL AND published_at IS NULL ORDER BY seq LIMIT %(limit)s",
            {"limit": limit},
        )
        return [ParkedRow(str(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in await cursor.fetchall()]

    async def unpark(self, ids: Sequence[str] | None) -> int:
        condition = "" if ids is None else "AND id = ANY(%(ids)s::uuid[])"
        cursor = await self._execute(
            f"UPDATE {self.table} SET parked_at = NULL, attempts = 0, available_at = now() "
            f"WHERE parked_at IS NOT NULL AND published_at IS NULL {condition}",
            {"ids": list(ids or [])},
        )
        return int(cursor.rowcount)

    async def listen(self, wake: asyncio.Event, stopping: asyncio.Event) -> None:
        """Set ``wake`` on every notification until ``stopping`` is set, reconnecting after failures.

        While the LISTEN connection is down the relay still polls, so nothing is missed; a
        new connection also sets ``wake``, for rows inserted while it was away.
        """
        import psycopg

        pause = 1.0
        while not stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn.url, autocommit=True) as connection:
                    await connection.execute(f"LISTEN {self._channel}".encode())
                    logger.debug("listening for new outbox rows on channel %s in %s", self._channel, self.display)
                    pause = 1.0
                    wake.set()
                    while not stopping.is_set():
                        async for _ in connection.notifies(timeout=1.0):
                            wake.set()
            except psycopg.Error as error:
                logger.warning(
                    "LISTEN %s on %s failed: %s; polling meanwhile and listening again in %.0fs",
                    self._channel, self.display, describe(error), pause,
                )
                try:
                    await asyncio.wait_for(stopping.wait(), pause)
                except TimeoutError:
                    pass
                pause = min(pause * 2, _LISTEN_RETRY_MAX)


# --- SQLite ----------------------------------------------------------------------------------


class SQLiteStore:
    """The outbox table in a SQLite file, through sqlite3 in a worker thread.

    SQLite has no LISTEN/NOTIFY, so the relay polls. Every statement is a transaction of its
    own; several relays on one file serialise on SQLite's write lock and share the work
    through the same leases.
    """

    def __init__(self, dsn: OutboxDsn, table: str = DEFAULT_TABLE, *, busy_timeout: float = 10.0) -> None:
        self._path = dsn.path
        self.display = dsn.display
        self.table = t = check_table(table)
        self._busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None
        self._thread_lock = threading.Lock()
        self._sql_claim = f"""
            UPDATE {t} SET claimed_by = :relay, claimed_until = :until
            WHERE id IN (
                SELECT o.id FROM {t} o
                WHERE o.published_at IS NULL AND o.parked_at IS NULL
                  AND o.available_at <= :now
                  AND (o.claimed_until IS NULL OR o.claimed_until < :now)
                  AND (o.aggregate_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM {t} p
                      WHERE p.aggregate_key = o.aggregate_key AND p.published_at IS NULL AND p.seq < o.seq))
                ORDER BY o.seq
                LIMIT :limit)
            RETURNING id, seq, topic, name, payload, headers, aggregate_key, attempts, created_at"""

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._thread_lock:
            if self._connection is None:
                self._connection = sqlite3.connect(
                    self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False,
                )
                self._connection.execute("PRAGMA journal_mode=WAL")
            return work(self._connection)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._run, work)

    async def open(self) -> None:
        await self._call(lambda connection: None)

    async def close(self) -> None:
        def close() -> None:
            with self._thread_lock:
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None

        await asyncio.to_thread(close)

    @staticmethod
    def _later(seconds: float) -> str:
        return sqlite_time(datetime.now(timezone.utc) + timedelta(seconds=seconds))

    @staticmethod
    def _ids(ids: Sequence[str]) -> str:
        # Row ids are UUIDs the relay read back; parse them, so nothing else reaches the SQL text.
        return ",".join(f"'{uuid.UUID(row_id)}'" for row_id in ids)

    async def claim(self, relay_id: str, limit: int, lease: float) -> list[ClaimedRow]:
        params = {"relay": relay_id, "now": sqlite_time(), "until": self._later(lease), "limit": limit}
        rows = await self._call(lambda c: c.execute(self._sql_claim, params).fetchall())
        claimed = [
            ClaimedRow(
                id=row[0], seq=row[1], topic=row[2], name=row[3], payload=json.loads(row[4]),
                headers=json.loads(row[5] or "{}"), aggregate_key=row[6], attempts=row[7],
                created_at=parse_sqlite_time(row[8]),
            )
            for row in rows
        ]
        claimed.sort(key=lambda row: row.seq)
        return claimed

    async def mark_published(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        sql = (
            f"UPDATE {self.table} SET published_at = ?, claimed_by = NULL, claimed_until = NULL "
            f"WHERE id IN ({self._ids(ids)}) AND published_at IS NULL"
        )
        return await self._call(lambda c: c.execute(sql, (sqlite_time(),)).rowcount)

    async def record_failure(self, row_id: str, relay_id: str, error: str, retry_in: float, park: bool) -> None:
        now = sqlite_time()
        sql = (
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?, claimed_by = NULL, "
            "claimed_until = NULL, available_at = ?, parked_at = ? "
            "WHERE id = ? AND published_at IS NULL AND claimed_by = ?"
        )
        params = (_clip(error), self._later(retry_in), now if park else None, row_id, relay_id)
        await self._call(lambda c: c.execute(sql, params))

    async def release(self, ids: Sequence[str], relay_id: str, error: str) -> None:
        if not ids:
            return
        sql = (
            f"UPDATE {self.table} SET last_error = ?, claimed_by = NULL, claimed_until = NULL "
            f"WHERE id IN ({self._ids(ids)}) AND published_at IS NULL AND claimed_by = ?"
        )
        await self._call(lambda c: c.execute(sql, (_clip(error), relay_id)))

    async def purge(self, retention: float) -> int:
        sql = (
            f"DELETE FROM {self.table} WHERE id IN "
            f"(SELECT id FROM {self.table} WHERE published_at < ? LIMIT {_PURGE_CHUNK})"
        )
        cutoff = self._later(-retention)
        total = 0
        while True:
            deleted = await self._call(lambda c: c.execute(sql, (cutoff,)).rowcount)
            total += deleted
            if deleted < _PURGE_CHUNK:
                return total

    async def stats(self) -> OutboxStats:
        sql = (
            "SELECT count(CASE WHEN parked_at IS NULL THEN 1 END), min(CASE WHEN parked_at IS NULL THEN created_at END), "
            f"count(parked_at) FROM {self.table} WHERE published_at IS NULL"
        )
        pending, oldest, parked = await self._call(lambda c: c.execute(sql).fetchone())
        age = (datetime.now(timezone.utc) - parse_sqlite_time(oldest)).total_seconds() if oldest else 0.0
        return OutboxStats(pending=int(pending), oldest_pending_age=max(age, 0.0), parked=int(parked))

    async def parked_rows(self, limit: int) -> list[ParkedRow]:
        sql = (
            f"SELECT id, topic, name, aggregate_key, attempts, last_error, parked_at FROM {self.table} "
            "WHERE parked_at IS NOT NULL AND published_at IS NULL ORDER BY seq LIMIT ?"
        )
        rows = await self._call(lambda c: c.execute(sql, (limit,)).fetchall())
        return [ParkedRow(r[0], r[1], r[2], r[3], r[4], r[5], parse_sqlite_time(r[6])) for r in rows]

    async def unpark(self, ids: Sequence[str] | None) -> int:
        condition = "" if ids is None else f"AND id IN ({self._ids(ids)})"
        sql = (
            f"UPDATE {self.table} SET parked_at = NULL, attempts = 0, available_at = ? "
            f"WHERE parked_at IS NOT NULL AND published_at IS NULL {condition}"
        )
        return await self._call(lambda c: c.execute(sql, (sqlite_time(),)).rowcount)

    async def listen(self, wake: asyncio.Event, stopping: asyncio.Event) -> None:
        """SQLite cannot notify: return at once and let the relay poll."""


def open_store(dsn: OutboxDsn, table: str = DEFAULT_TABLE) -> RelayStore:
    """Return the store for ``dsn``'s database (not yet opened)."""
    if dsn.dialect == "sqlite":
        return SQLiteStore(dsn, table)
    return PostgresStore(dsn, table)
