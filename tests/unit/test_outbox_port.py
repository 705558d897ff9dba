"""The outbox's pure parts: row checks, the contract registry, DSNs, the DDL, settings and error mapping."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy.exc
from pydantic import BaseModel

from eventrails import ConfigurationError, ContractRegistry, OutboxError, PayloadError, outbox_ddl
from eventrails._contract import Contract
from eventrails._manifests import parse_resource
from eventrails._outbox._contracts import contract_of, is_event_name
from eventrails._outbox._dberrors import describe, is_missing_table, translate_write_error
from eventrails._outbox._dsn import parse_dsn
from eventrails._outbox._port import build_message, check_table
from eventrails._outbox._relay import OutboxRelaySettings
from eventrails._outbox._sqlite import parse_sqlite_time, sqlite_time
from eventrails._resources import API_VERSION, Topic
from eventrails_operator._desired import BusConnection, topic_streams

EXAMPLE_MANIFESTS = Path(__file__).resolve().parents[2] / "examples" / "manifests"
TENANCY = {"organizationId": "org_1", "projectId": "prj_1"}


def _topic(name: str, **spec: Any) -> Topic:
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}
    topic = parse_resource(body)
    assert isinstance(topic, Topic)
    return topic


@pytest.fixture()
def registry() -> ContractRegistry:
    return ContractRegistry.from_topics([
        _topic("orders", tasks=["send-email", "refresh-cache"], payload={"exempt": ["refresh-cache"]}),
        _topic("domain-events", events=["OrderPlaced"]),
    ])


class SendEmail(BaseModel):
    organizationId: str
    projectId: str
    emailId: int


# --- rows ------------------------------------------------------------------------------------------


def test_task_row_carries_id_payload_and_tenancy_headers(registry: ContractRegistry) -> None:
    message = build_message(
        registry, "tasks", "orders", "send-email", SendEmail(emailId=7, **TENANCY), aggregate_key="order-1",
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, msg_id=None,
    )
    assert isinstance(message.id, uuid.UUID)
    assert message.msg_id == str(message.id)
    assert message.payload == {**TENANCY, "emailId": 7}
    assert message.headers == {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "Eventrails-Organization-Id": "org_1",
        "Eventrails-Project-Id": "prj_1",
    }
    assert message.aggregate_key == "order-1"


def test_given_msg_id_is_the_row_id(registry: ContractRegistry) -> None:
    row_id = uuid.uuid4()
    message = build_message(
        registry, "tasks", "orders", "refresh-cache", {}, aggregate_key=None, headers=None, msg_id=row_id,
    )
    assert message.id == row_id
    assert message.headers == {}, "an exempt name without tenancy keys gets no tenancy headers"


@pytest.mark.parametrize(
    ("kind", "topic", "name", "payload", "expected"),
    [
        ("tasks", "orders", "send-email", {"projectId": "p", "emailId": 1}, "lacks required key(s) 'organizationId'"),
        ("tasks", "orders", "send-email", {**TENANCY, "organizationId": " "}, "'organizationId'"),
        ("tasks", "orders", "send-sms", TENANCY, "'send-sms' is not declared by topic 'orders'"),
        ("tasks", "orders", "send-email", ["not", "an", "object"], "must be a JSON object"),
        ("tasks", "orders", "send-email", {**TENANCY, "at": datetime.now()}, "not JSON-serialisable"),
        ("tasks", "domain-events", "OrderPlaced", TENANCY, "carries domain events, not tasks"),
        ("events", "orders", "send-email", TENANCY, "carries tasks, not domain events"),
    ],
)
def test_bad_rows_raise_payload_error(
    registry: ContractRegistry, kind: Any, topic: str, name: str, payload: Any, expected: str,
) -> None:
    with pytest.raises(PayloadError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_message(registry, kind, topic, name, payload, aggregate_key=None, headers=None, msg_id=None)


@pytest.mark.parametrize(
    ("headers", "aggregate_key", "expected"),
    [
        ({"Nats-Msg-Id": "x"}, None, "set by eventrails or NATS"),
        ({"X-Request-Id": "r1"}, None, "only trace context headers are forwarded \\(baggage, traceparent, tracestate\\)"),
        ({"eventrails-name": "x"}, None, "set by eventrails or NATS"),
        ({"bad header": "x"}, None, "not a valid header token"),
        ({"traceparent": "a\r\nInjected: 1"}, None, "one-line string"),
        (None, "", "aggregate_key"),
        (None, "k" * 201, "aggregate_key"),
    ],
)
def test_bad_headers_and_aggregate_keys_raise_payload_error(
    registry: ContractRegistry, headers: Any, aggregate_key: Any, expected: str,
) -> None:
    with pytest.raises(PayloadError, match=expected):
        build_message(
            registry, "tasks", "orders", "send-email", {**TENANCY, "emailId": 1}, aggregate_key=aggregate_key,
            headers=headers, msg_id=None,
        )


def test_unknown_topic_names_the_known_ones(registry: ContractRegistry) -> None:
    with pytest.raises(ConfigurationError, match=r"topic 'billing' is not in the outbox contract registry \(it knows "
                       r"domain-events, orders\)"):
        build_message(registry, "tasks", "billing", "send-email", TENANCY, aggregate_key=None, headers=None, msg_id=None)


def test_table_names_are_plain_identifiers() -> None:
    assert check_table("app.outbox") == "app.outbox"
    for bad in ("outbox; DROP TABLE x", "a.b.c", "1outbox", ""):
        with pytest.raises(OutboxError, match="not a plain identifier"):
            check_table(bad)


# --- contracts -------------------------------------------------------------------------------------


def test_contract_of_a_topic_matches_the_stream_metadata() -> None:
    topic = _topic("orders", tasks=["send-email", "refresh-cache"],
                   payload={"requiredKeys": ["tenantId"], "exempt": ["refresh-cache"]}, delayedDelivery=True)
    streams = topic_streams(topic, BusConnection(servers=("nats://127.0.0.1:4222",)))
    from_stream = Contract.from_metadata("orders", streams.stream.name or "", streams.stream.metadata, schedules=True)
    assert contract_of(topic) == from_stream


def test_registry_from_the_example_manifests() -> None:
    registry = ContractRegistry.from_manifests([EXAMPLE_MANIFESTS])
    assert registry.topics == ["domain-events", "jobs"]
    assert registry.get("jobs").kind == "tasks"
    assert registry.get("domain-events").names == ("InvoicePaid", "CustomerDeleted")
    assert registry.events_topic == "domain-events"


def test_registry_refuses_missing_and_invalid_manifests(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        ContractRegistry.from_manifests([tmp_path / "missing"])
    (tmp_path / "shop.yaml").write_text(
        f"apiVersion: {API_VERSION}\nkind: Topic\nmetadata: {{name: orders, namespace: shop}}\nspec: {{tasks: [a]}}\n"
    )
    with pytest.raises(ConfigurationError, match="no Topic manifests of namespace 'other'"):
        ContractRegistry.from_manifests([tmp_path], namespace="other")
    assert ContractRegistry.from_manifests([tmp_path], namespace="shop").topics == ["orders"]
    (tmp_path / "topic.yaml").write_text(
        f"apiVersion: {API_VERSION}\nkind: Topic\nmetadata: {{name: orders}}\nspec: {{tasks: [Not_Kebab]}}\n"
    )
    with pytest.raises(ConfigurationError, match="invalid manifests"):
        ContractRegistry.from_manifests([tmp_path])


def test_registry_refuses_a_topic_twice() -> None:
    topic = _topic("orders", tasks=["send-email"])
    with pytest.raises(ConfigurationError, match="given twice"):
        ContractRegistry.from_topics([topic, topic])


def test_event_and_task_names_are_told_apart() -> None:
    assert is_event_name("InvoicePaid")
    assert not is_event_name("send-email")
    assert not is_event_name("x")


# --- DSNs, DDL, timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "dialect", "url_or_path"),
    [
        ("postgresql://app@db:5432/shop", "postgresql", "postgresql://app@db:5432/shop"),
        ("postgres://app@db/shop", "postgresql", "postgres://app@db/shop"),
        ("postgresql+psycopg://app@db/shop", "postgresql", "postgresql://app@db/shop"),
        ("postgresql+asyncpg://app@db/shop", "postgresql", "postgresql://app@db/shop"),
        ("host=db dbname=shop user=app", "postgresql", "host=db dbname=shop user=app"),
        ("sqlite:///app.db", "sqlite", "app.db"),
        ("sqlite:////var/lib/app.db", "sqlite", "/var/lib/app.db"),
    ],
)
def test_dsns(dsn: str, dialect: str, url_or_path: str) -> None:
    parsed = parse_dsn(dsn)
    assert parsed.dialect == dialect
    assert (parsed.path if dialect == "sqlite" else parsed.url) == url_or_path


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("", "no outbox database given"),
        ("sqlite://host/app.db", "names a host"),
        ("sqlite:///:memory:", "names no file"),
        ("mysql://root:hunter2@db/shop", "neither PostgreSQL nor SQLite"),
    ],
)
def test_bad_dsns(dsn: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected) as raised:
        parse_dsn(dsn)
    assert "hunter2" not in str(raised.value)


def test_display_hides_passwords() -> None:
    assert parse_dsn("postgresql://app:s3cret@db/shop").display == "postgresql://app:***@db/shop"
    assert parse_dsn("host=db password=s3cret dbname=shop").display == "host=db password=*** dbname=shop"


def test_ddl_without_bind_markers() -> None:
    for dialect in ("postgresql", "sqlite"):
        statements = outbox_ddl(dialect, "app_outbox")  # type: ignore[arg-type]
        assert statements[0].startswith("CREATE TABLE IF NOT EXISTS app_outbox")
        for statement in statements:
            # SQLAlchemy's text() would read ":name" as a bind parameter.
            assert ":" not in statement.replace("%H:%M:%f", ""), statement
    postgres = outbox_ddl("postgresql", "app.outbox")
    assert any("pg_notify('app_outbox', '')" in statement for statement in postgres)
    assert any("FOR EACH STATEMENT" in statement for statement in postgres)
    with pytest.raises(ValueError, match="no schema"):
        outbox_ddl("sqlite", "app.outbox")


def test_sqlite_ddl_runs_twice() -> None:
    connection = sqlite3.connect(":memory:")
    for _ in range(2):
        for statement in outbox_ddl("sqlite"):
            connection.execute(statement)
    columns = [row[1] for row in connection.execute("PRAGMA table_info(eventrails_outbox)")]
    assert columns == [
        "seq", "id", "topic", "name", "payload", "headers", "aggregate_key", "created_at", "available_at",
        "published_at", "parked_at", "attempts", "last_error", "claimed_by", "claimed_until",
    ]


def test_sqlite_time_format() -> None:
    start = datetime(2025, 1, 31, 12, 0, 0, 999999, tzinfo=timezone.utc)
    times = [start + timedelta(milliseconds=step) for step in (0, 1, 1000, 86_400_000)]
    texts = [sqlite_time(moment) for moment in times]
    assert texts[0] == "2025-01-31T12:00:00.999Z"
    assert texts == sorted(texts)
    assert parse_sqlite_time(texts[0]) == start.replace(microsecond=999000)
    default = sqlite3.connect(":memory:").execute("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')").fetchone()[0]
    assert len(default) == len(texts[0])
    assert default[10] == "T"
    assert default.endswith("Z")


# --- settings --------------------------------------------------------------------------------------


def test_relay_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTRAILS_OUTBOX_DSN", "sqlite:///app.db")
    monkeypatch.setenv("EVENTRAILS_OUTBOX_LEASE", "45s")
    monkeypatch.setenv("EVENTRAILS_OUTBOX_RETENTION", "7d")
    monkeypatch.setenv("EVENTRAILS_OUTBOX_BACKOFF", "0.5")
    settings = OutboxRelaySettings()
    assert (settings.dsn, settings.lease, settings.retention, settings.backoff) == ("sqlite:///app.db", 45.0, 604800.0, 0.5)
    assert settings.effective_relay_id()
    monkeypatch.setenv("EVENTRAILS_OUTBOX_TABLE", "x; DROP TABLE y")
    with pytest.raises(ValueError, match="table"):
        OutboxRelaySettings()


# --- database errors -------------------------------------------------------------------------------


def _missing_table_errors() -> list[BaseException]:
    psycopg_error = psycopg.errors.UndefinedTable("relation \"eventrails_outbox\" does not exist")
    asyncpg_error = asyncpg.exceptions.UndefinedTableError("relation \"eventrails_outbox\" does not exist")
    sqlite_error = sqlite3.OperationalError("no such table: eventrails_outbox")
    wrapped = sqlalchemy.exc.ProgrammingError("INSERT ...", {}, psycopg_error)
    wrapped_sqlite = sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite_error)
    return [psycopg_error, asyncpg_error, sqlite_error, wrapped, wrapped_sqlite]


@pytest.mark.parametrize("error", _missing_table_errors(), ids=lambda e: type(e).__module__ + "." + type(e).__name__)
def test_missing_table_translated(error: BaseException) -> None:
    assert is_missing_table(error)
    translated = translate_write_error(error, "eventrails_outbox")
    assert isinstance(translated, OutboxError)
    assert "eventrails outbox migrate" in str(translated)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.UniqueViolation("duplicate key"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        sqlite3.IntegrityError("UNIQUE constraint failed"),
        sqlite3.OperationalError("database is locked"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_database_errors_pass_through(error: BaseException) -> None:
    assert not is_missing_table(error)
    assert translate_write_error(error, "eventrails_outbox") is error


def test_describe_names_the_driver_error_and_sqlstate() -> None:
    error = sqlalchemy.exc.ProgrammingError("INSERT ...", {}, psycopg.errors.UniqueViolation("duplicate\n  key"))
    assert describe(error) == "UniqueViolation: duplicate key (SQLSTATE 23505)"
    missing = describe(psycopg.errors.UndefinedTable("relation does not exist"))
    assert missing.startswith("UndefinedTable: relation does not exist (SQLSTATE 42P01); create the outbox table")
    assert describe(sqlite3.OperationalError("database is locked")) == "OperationalError: database is locked"
