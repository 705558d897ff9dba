"""The outbox table, for PostgreSQL and SQLite, and the functions that create it.

``outbox_ddl(dialect)`` returns the statements, for your own migrations (Alembic's
``op.execute``); ``apply_outbox_schema(connection)`` runs them on a psycopg or sqlite3 connection;
``migrate_outbox(dsn)`` (``eventrails outbox migrate --dsn ...``) connects and runs them. Every
statement is idempotent, so running them again changes nothing.

Columns:

- ``seq``: insertion order, used to publish the rows of one aggregate in order;
- ``id``: the row id, a UUID, which is also the message id (``Nats-Msg-Id``);
- ``topic``, ``name``, ``payload`` (a JSON object), ``headers`` (a JSON object of strings:
  trace context and the tenancy keys), ``aggregate_key`` (optional, for ordering);
- ``created_at``, ``available_at`` (not published before), ``published_at`` (set only
  after the PubAck), ``parked_at`` (set when the relay gave up on the row);
- ``attempts`` and ``last_error`` of failed publishes;
- ``claimed_by`` and ``claimed_until``: the relay working on the row and its lease.

On PostgreSQL a statement-level trigger calls ``pg_notify`` after each INSERT statement
with a constant payload; PostgreSQL folds identical notifications of one transaction into
one, so a relay is woken at most once per committing transaction, however many rows it wrote.
SQLite timestamps are UTC text in one fixed format (``2025-01-31T12:00:00.123Z``), so
they compare correctly as strings.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, Literal

from eventrails._outbox._port import DEFAULT_TABLE, check_table

logger = logging.getLogger("eventrails.outbox")

Dialect = Literal["postgresql", "sqlite"]

_POSTGRES = [
    """CREATE TABLE IF NOT EXISTS {table} (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id uuid PRIMARY KEY,
    topic text NOT NULL,
    name text NOT NULL,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL DEFAULT '{{}}',
    aggregate_key text,
    created_at timestamptz NOT NULL DEFAULT now(),
    available_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    parked_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    claimed_by text,
    claimed_until timestamptz
)""",
    "CREATE INDEX IF NOT EXISTS {base}_pending ON {table} (seq) WHERE published_at IS NULL AND parked_at IS NULL",
    "CREATE INDEX IF NOT EXISTS {base}_aggregate ON {table} (aggregate_key, seq) "
    "WHERE published_at IS NULL AND aggregate_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS {base}_published ON {table} (published_at) WHERE published_at IS NOT NULL",
    """CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END
$body$""",
    "CREATE OR REPLACE TRIGGER {base}_notify AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
]

_SQLITE = [
    """CREATE TABLE IF NOT EXISTS {table} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    headers TEXT NOT NULL DEFAULT '{{}}',
    aggregate_key TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    available_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    published_at TEXT,
    parked_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    claimed_by TEXT,
    claimed_until TEXT
)""",
    "CREATE INDEX IF NOT EXISTS {base}_pending ON {table} (seq) WHERE published_at IS NULL AND parked_at IS NULL",
    "CREATE INDEX IF NOT EXISTS {base}_aggregate ON {table} (aggregate_key, seq) "
    "WHERE published_at IS NULL AND aggregate_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS {base}_published ON {table} (published_at) WHERE published_at IS NOT NULL",
]


def notify_channel(table: str = DEFAULT_TABLE) -> str:
    """Return the LISTEN/NOTIFY channel of the outbox ``table`` (PostgreSQL)."""
    return check_table(table).replace(".", "_")


def outbox_ddl(dialect: Dialect = "postgresql", table: str = DEFAULT_TABLE) -> list[str]:
    """Return the statements that create the outbox ``table`` and its indexes (and, on PostgreSQL, the trigger).

    The statements contain no bind-parameter markers, so ``op.execute`` in an Alembic
    migration and any driver run them as they are.
    """
    check_table(table)
    schema, _, base = table.rpartition(".")
    if dialect == "postgresql":
        function = f"{schema + '.' if schema else ''}{base}_notify"
        values = {"table": table, "base": base, "function": function, "channel": notify_channel(table)}
        return [statement.format(**values) for statement in _POSTGRES]
    if dialect == "sqlite":
        if schema:
            raise ValueError(f"SQLite outbox tables have no schema: use {base!r} instead of {table!r}")
        return [statement.format(table=table, base=base) for statement in _SQLITE]
    raise ValueError(f"unknown dialect {dialect!r}: use 'postgresql' or 'sqlite'")


def apply_outbox_schema(connection: Any, table: str = DEFAULT_TABLE) -> None:
    """Create the outbox table with a psycopg (sync) or sqlite3 connection.

    On psycopg it runs in a transaction of its own, which commits, or in a savepoint when
    the caller's transaction is open, which then commits or rolls back with it; an advisory
    lock serialises concurrent runs (several relays starting at once). On sqlite3 it commits.
    """
    if isinstance(connection, sqlite3.Connection):
        # One statement at a time: executescript would commit the caller's open transaction first.
        for statement in outbox_ddl("sqlite", table):
            connection.execute(statement)
        connection.commit()
        return
    import psycopg

    if not isinstance(connection, psycopg.Connection):
        raise TypeError(
            f"apply_outbox_schema takes a psycopg or sqlite3 connection, got {type(connection).__name__}; "
            "with other drivers run the statements of outbox_ddl() yourself"
        )
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"eventrails-outbox-schema:{table}",))
        for statement in outbox_ddl("postgresql", table):
            connection.execute(statement.encode())


def migrate_outbox(dsn: str, table: str = DEFAULT_TABLE) -> None:
    """Connect to ``dsn`` (PostgreSQL or ``sqlite:///path``) and create the outbox table there."""
    from eventrails._outbox._dsn import parse_dsn

    target = parse_dsn(dsn)
    if target.dialect == "sqlite":
        connection = sqlite3.connect(target.path, timeout=30)
        try:
            apply_outbox_schema(connection, table)
        finally:
            connection.close()
    else:
        import psycopg

        with psycopg.connect(target.url, autocommit=True) as pg:
            apply_outbox_schema(pg, table)
    logger.info("outbox table %s is in place in %s", table, target.display)
