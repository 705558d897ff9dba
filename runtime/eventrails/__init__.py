"""eventrails: Kubernetes-native rails for background jobs and domain events on NATS JetStream.

The public API is what ``__all__`` lists: a ``Publisher`` that enqueues tasks and publishes
domain events, a ``Worker`` that registers handlers by name, the handler ``Context`` and
outcomes, the transactional outbox (writers per database driver, the contract registry they
check rows against, and the relay), the settings that processes read from ``EVENTRAILS_*``
variables, and the exceptions. Test helpers live in ``eventrails.testing``; modules starting
with ``_`` are internal.
"""

from eventrails._errors import (
    ConfigurationError,
    EventrailsError,
    JetStreamNotFound,
    JetStreamRejected,
    NatsError,
    NatsUnavailable,
    PayloadError,
)
from eventrails._outbox import (
    AioSQLiteOutbox,
    AsyncOutboxWriter,
    AsyncpgOutbox,
    AsyncPsycopgOutbox,
    AsyncSQLAlchemyOutbox,
    ContractRegistry,
    OutboxError,
    OutboxMessage,
    OutboxRelay,
    OutboxRelaySettings,
    OutboxWriter,
    PsycopgOutbox,
    SQLAlchemyOutbox,
    SQLiteOutbox,
    apply_outbox_schema,
    migrate_outbox,
    outbox_ddl,
)
from eventrails._outcomes import DeadLetter, Done, Outcome, Retry, Skip
from eventrails._publisher import PublishIncomplete, PublishReceipt, Publisher
from eventrails._settings import NatsSettings, WorkerSettings
from eventrails._worker import Context, Worker

__all__ = [
    "AioSQLiteOutbox",
    "AsyncOutboxWriter",
    "AsyncPsycopgOutbox",
    "AsyncSQLAlchemyOutbox",
    "AsyncpgOutbox",
    "ConfigurationError",
    "Context",
    "ContractRegistry",
    "DeadLetter",
    "Done",
    "EventrailsError",
    "JetStreamNotFound",
    "JetStreamRejected",
    "NatsError",
    "NatsSettings",
    "NatsUnavailable",
    "OutboxError",
    "OutboxMessage",
    "OutboxRelay",
    "OutboxRelaySettings",
    "OutboxWriter",
    "Outcome",
    "PayloadError",
    "PsycopgOutbox",
    "PublishIncomplete",
    "PublishReceipt",
    "Publisher",
    "Retry",
    "SQLAlchemyOutbox",
    "SQLiteOutbox",
    "Skip",
    "Worker",
    "WorkerSettings",
    "apply_outbox_schema",
    "migrate_outbox",
    "outbox_ddl",
]
