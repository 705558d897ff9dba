"""The one place that reads database driver errors for the outbox (psycopg, asyncpg, sqlite3, SQLAlchemy).

Writers leave the caller's database errors alone, because they belong to the caller's
transaction. Only a missing outbox table is turned into an OutboxError that explains how
to create it. The relay uses ``describe`` for its logs and ``last_error`` column.
"""

from __future__ import annotations

import sqlite3

from eventrails._outbox._port import OutboxError

# SQLSTATE of "undefined_table" in PostgreSQL; psycopg and asyncpg both expose it as ``sqlstate``.
_UNDEFINED_TABLE = "42P01"


def _driver_error(error: BaseException) -> BaseException:
    # SQLAlchemy wraps the driver's exception in ``orig``; asyncpg under SQLAlchemy is wrapped twice.
    seen = error
    for _ in range(3):
        inner = getattr(seen, "orig", None)
        if not isinstance(inner, BaseException):
            break
        seen = inner
    cause = seen.__cause__
    if getattr(seen, "sqlstate", None) is None and isinstance(cause, BaseException):
        return cause
    return seen


def is_missing_table(error: BaseException) -> bool:
    """Tell whether ``error`` reports a missing table, for any of the supported drivers."""
    inner = _driver_error(error)
    if getattr(inner, "sqlstate", None) == _UNDEFINED_TABLE:
        return True
    return isinstance(inner, sqlite3.OperationalError) and str(inner).startswith("no such table")


def translate_write_error(error: BaseException, table: str) -> BaseException:
    """Return an OutboxError for a missing outbox table, and ``error`` itself for anything else."""
    if is_missing_table(error):
        return OutboxError(
            f"outbox table {table!r} does not exist in this database: create it with "
            f"`eventrails outbox migrate --dsn ...` or with outbox_ddl() in your own migrations"
        )
    return error


def describe(error: BaseException) -> str:
    """Return a one-line description of a database error, with its SQLSTATE when the driver gives one.

    A missing table gets the command that creates it appended.
    """
    inner = _driver_error(error)
    text = " ".join(str(inner).split()) or type(inner).__name__
    sqlstate = getattr(inner, "sqlstate", None)
    suffix = f" (SQLSTATE {sqlstate})" if sqlstate else ""
    if is_missing_table(error):
        suffix += "; create the outbox table with `eventrails outbox migrate --dsn ...` (or relay with --migrate)"
    return f"{type(inner).__name__}: {text}{suffix}"
