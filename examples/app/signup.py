"""Signing up a customer: the customer row and the welcome email's outbox row commit together.

This is the outbox rule in its smallest form. The use case never sends the email itself
and never talks to NATS: it writes its business row and an outbox row in one
transaction and returns. The relay (``eventrails outbox relay``, or local mode with
``--outbox-dsn``) publishes the row afterwards, and the jobs worker sends the email. If
the transaction rolls back, neither the customer nor the email exists.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

from eventrails import ContractRegistry, SQLiteOutbox

from app import db
from app.models import SendEmail

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


@functools.cache
def contracts() -> ContractRegistry:
    """The Topic contracts the outbox checks rows against, read once from the app's manifests."""
    return ContractRegistry.from_manifests([MANIFESTS])


def sign_up(connection: sqlite3.Connection, customer_id: str, email: str) -> str:
    """Create the customer and queue its welcome email; return the outbox row id (the task's message id)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute("INSERT INTO customers (id, email) VALUES (?, ?)", (customer_id, email))
        welcome = SendEmail(organizationId=db.ORGANIZATION, projectId=db.PROJECT, customerId=customer_id,
                            template="welcome")
        row = SQLiteOutbox(connection, contracts()).enqueue("jobs", "send-email", welcome, aggregate_key=customer_id)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return row.msg_id
