"""The transactional outbox: writers that insert rows in the caller's transaction, and the relay.

Public names are re-exported by ``eventrails``; the modules here are internal.
"""

from eventrails._outbox._contracts import ContractRegistry
from eventrails._outbox._port import AsyncOutboxWriter, OutboxError, OutboxMessage, OutboxWriter
from eventrails._outbox._postgres import AsyncpgOutbox, AsyncPsycopgOutbox, PsycopgOutbox
from eventrails._outbox._relay import OutboxRelay, OutboxRelaySettings, RelayMetrics
from eventrails._outbox._schema import apply_outbox_schema, migrate_outbox, outbox_ddl
from eventrails._outbox._sqlalchemy import AsyncSQLAlchemyOutbox, SQLAlchemyOutbox
from eventrails._outbox._sqlite import AioSQLiteOutbox, SQLiteOutbox

__all__ = [
    "AioSQLiteOutbox",
    "AsyncOutboxWriter",
    "AsyncPsycopgOutbox",
    "AsyncSQLAlchemyOutbox",
    "AsyncpgOutbox",
    "ContractRegistry",
    "OutboxError",
    "OutboxMessage",
    "OutboxRelay",
    "OutboxRelaySettings",
    "OutboxWriter",
    "PsycopgOutbox",
    "RelayMetrics",
    "SQLAlchemyOutbox",
    "SQLiteOutbox",
    "apply_outbox_schema",
    "migrate_outbox",
    "outbox_ddl",
]
