"""The example app's database: SQLite, shared by the process that publishes and the workers.

Workers re-fetch what a message points at instead of trusting the message, so a task for
a customer deleted after it was enqueued is skipped. The file is ``EXAMPLE_APP_DB``, or
``example-app.sqlite3`` in the system's temporary directory; ``connect`` creates the tables
and the sample rows when they are missing.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from eventrails import apply_outbox_schema

ORGANIZATION = "org-1"
PROJECT = "proj-1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS invoices (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    amount_cents INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    charge_attempts INTEGER NOT NULL DEFAULT 0,
    -- How many charge attempts the card gateway times out before it answers: a flaky gateway.
    gateway_timeouts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS emails (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL,
    template TEXT NOT NULL,
    invoice_id TEXT
);
CREATE TABLE IF NOT EXISTS purges (
    customer_id TEXT PRIMARY KEY
);
"""

# cus-3 was deleted after work for it had been queued; inv-2's gateway times out once.
_SAMPLE = """
INSERT OR IGNORE INTO customers (id, email, deleted) VALUES
    ('cus-1', 'ada@example.com', 0),
    ('cus-2', 'grace@example.com', 0),
    ('cus-3', 'edsger@example.com', 1);
INSERT OR IGNORE INTO invoices (id, customer_id, amount_cents, status, gateway_timeouts) VALUES
    ('inv-1', 'cus-1', 4200, 'open', 0),
    ('inv-2', 'cus-2', 1999, 'open', 1);
"""


@dataclass(frozen=True)
class Customer:
    id: str
    email: str
    deleted: bool


@dataclass(frozen=True)
class Invoice:
    id: str
    customer_id: str
    amount_cents: int
    status: str


def database_path() -> Path:
    configured = os.environ.get("EXAMPLE_APP_DB")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "example-app.sqlite3"


def connect(path: Path | None = None) -> sqlite3.Connection:
    """Open the database, creating the tables and sample rows when they are missing."""
    connection = sqlite3.connect(path or database_path(), timeout=10, isolation_level=None)
    # Several processes open a new file at once. Switching it to WAL can fail with "database
    # is locked" without waiting for the busy timeout, so the setup is tried again for a while.
    for attempt in range(50):
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA + _SAMPLE)
            apply_outbox_schema(connection)  # the outbox table, written by app.signup and read by the relay
            return connection
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 49:
                connection.close()
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def get_customer(connection: sqlite3.Connection, customer_id: str) -> Customer | None:
    row = connection.execute("SELECT id, email, deleted FROM customers WHERE id = ?", (customer_id,)).fetchone()
    return Customer(row[0], row[1], bool(row[2])) if row else None


def get_invoice(connection: sqlite3.Connection, invoice_id: str) -> Invoice | None:
    row = connection.execute(
        "SELECT id, customer_id, amount_cents, status FROM invoices WHERE id = ?", (invoice_id,)
    ).fetchone()
    return Invoice(*row) if row else None


def record_charge_attempt(connection: sqlite3.Connection, invoice_id: str) -> bool:
    """Count one attempt to charge the invoice; return False when the gateway timed out on it."""
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        attempts, timeouts = connection.execute(
            "SELECT charge_attempts, gateway_timeouts FROM invoices WHERE id = ?", (invoice_id,)
        ).fetchone()
        connection.execute("UPDATE invoices SET charge_attempts = ? WHERE id = ?", (attempts + 1, invoice_id))
    return attempts >= timeouts


def mark_paid(connection: sqlite3.Connection, invoice_id: str) -> None:
    connection.execute("UPDATE invoices SET status = 'paid' WHERE id = ?", (invoice_id,))


def record_email(connection: sqlite3.Connection, customer_id: str, template: str, invoice_id: str | None) -> None:
    connection.execute(
        "INSERT INTO emails (customer_id, template, invoice_id) VALUES (?, ?, ?)", (customer_id, template, invoice_id)
    )


def record_purge(connection: sqlite3.Connection, customer_id: str) -> bool:
    """Record that the customer's data was purged; return False when it already was."""
    cursor = connection.execute("INSERT OR IGNORE INTO purges (customer_id) VALUES (?)", (customer_id,))
    return cursor.rowcount == 1
