"""Failure drills of the outbox relay, on PostgreSQL and SQLite: relays killed with SIGKILL while rows
flow, marking that keeps failing after the PubAck, and nats-server restarted while the relay publishes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrails import Worker
from eventrails._natsserver import free_port
from eventrails._outbox._store import ClaimedRow, RelayStore
from tests.integration.test_outbox_relay import (
    Outbox,
    handled_by,
    outbox,
    relaying,
    stream_msg_ids,
    wait_until,
)
from tests.integration.test_runtime import Rails, consumer_resource, email, eventually, rails, running, topic_resource

pytestmark = pytest.mark.integration

__all__ = ["outbox", "rails"]  # fixtures, imported for pytest


class CountingStore:
    """Passes every call to a real store and counts the claims, to show the relay never spins."""

    def __init__(self, store: RelayStore) -> None:
        self._store = store
        self.claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(self, relay_id: str, limit: int, lease: float) -> list[ClaimedRow]:
        self.claims += 1
        return await self._store.claim(relay_id, limit, lease)


async def write_steadily(outbox: Outbox, total: int, per_transaction: int = 5, pause: float = 0.02) -> list[str]:
    """Write ``total`` rows, a few per transaction, while other things happen; return their ids."""
    ids: list[str] = []
    for start in range(0, total, per_transaction):
        rows = [("send-email", email(start + index), None) for index in range(per_transaction)]
        ids += await asyncio.to_thread(outbox.write, rows)
        await asyncio.sleep(pause)
    return ids


# --- kill -9 -------------------------------------------------------------------------------------


class RelayProcess:
    """``eventrails outbox relay`` as a child process, the way a Deployment runs it."""

    def __init__(self, rails: Rails, outbox: Outbox, log: Path, index: int) -> None:
        self.health_port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("EVENTRAILS_")}
        env.update({
            "EVENTRAILS_NATS_SERVERS": rails.server.url,
            "EVENTRAILS_NAMESPACE": rails.settings.namespace,
            "EVENTRAILS_OUTBOX_DSN": outbox.dsn,
            "EVENTRAILS_OUTBOX_POLL_INTERVAL": "0.1",
            "EVENTRAILS_OUTBOX_LEASE": "1s",
            "EVENTRAILS_OUTBOX_BATCH_SIZE": "10",
            "EVENTRAILS_OUTBOX_STATS_INTERVAL": "0.2",
            "EVENTRAILS_OUTBOX_HEALTH_HOST": "127.0.0.1",
            "EVENTRAILS_OUTBOX_HEALTH_PORT": str(self.health_port),
            "EVENTRAILS_OUTBOX_RELAY_ID": f"relay-{index}",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]),
        })
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "eventrails", "outbox", "relay", "--log-level", "info"],
                env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


@contextlib.contextmanager
def cleanup(processes: list[RelayProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.kill()


async def test_killed_relays_lose_nothing(
    rails: Rails, outbox: Outbox, tmp_path: Path,
) -> None:
    topic = topic_resource()
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer_resource(), topic)
    seen: Counter[str] = Counter()
    log = tmp_path / "relays.log"
    processes: list[RelayProcess] = []

    with cleanup(processes):
        async with running(handled_by(Worker(), seen), settings):
            writing = asyncio.create_task(write_steadily(outbox, 300))
            # Kill each relay once it has published something (or after a few seconds), mid-flow.
            for index in range(5):
                processes.append(RelayProcess(rails, outbox, log, index))
                before = len(outbox.published_ids())
                deadline = time.monotonic() + 8.0
                while time.monotonic() < deadline and len(outbox.published_ids()) < before + 15:
                    await asyncio.sleep(0.05)
                processes[-1].kill()
            ids = await asyncio.wait_for(writing, 60)

            survivor = RelayProcess(rails, outbox, log, 5)
            processes.append(survivor)
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{survivor.health_port}"

                async def ready() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{base}/readyz") as response:
                            return response.status == 200
                    return False

                await eventually(ready, "the last relay to report ready", 20)
                ids += await write_steadily(outbox, 20)
                await wait_until(lambda: outbox.published_ids() == set(ids), "the last relay to publish every row", 40)
                await wait_until(lambda: sum(seen.values()) >= len(ids), "the consumer to handle every row", 20)
                metrics = ""

                async def nothing_pending() -> bool:
                    nonlocal metrics
                    async with session.get(f"{base}/metrics") as response:
                        metrics = await response.text()
                    return "eventrails_outbox_pending_rows 0.0" in metrics

                await eventually(nothing_pending, "the pending-rows gauge to reach zero", 10)
            assert survivor.terminate() == 0, log.read_text()[-3000:]

    assert set(seen) == set(ids)
    assert [msg_id for msg_id, count in seen.items() if count != 1] == [], "a row was handled twice"
    info = await rails.js.stream_info("shop_orders")
    assert info.state.last_seq == len(ids), "the stream stored every row exactly once"
    [published] = [line for line in metrics.splitlines() if line.startswith("eventrails_outbox_published_total{")]
    assert published.startswith('eventrails_outbox_published_total{topic="orders"} ')
    assert float(published.split()[-1]) >= 20, "the last relay published at least the rows written after it started"
    assert log.read_text().count(" started on ") == 6, "every relay process started"


# --- publish succeeds, marking fails -------------------------------------------------------------


def refuse_marking(outbox: Outbox) -> None:
    """Make the database refuse to mark charge-card rows published, as a full disk or a bug would."""
    if outbox.dialect == "sqlite":
        outbox.execute(
            "CREATE TRIGGER refuse_mark BEFORE UPDATE OF published_at ON eventrails_outbox "
            "WHEN NEW.published_at IS NOT NULL AND NEW.name = 'charge-card' "
            "BEGIN SELECT RAISE(ABORT, 'disk full while marking a charge'); END",
        )
        return
    outbox.execute(
        "CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.published_at IS NOT NULL AND NEW.name = 'charge-card' THEN "
        "RAISE EXCEPTION 'disk full while marking a charge'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER refuse_mark BEFORE UPDATE ON eventrails_outbox FOR EACH ROW EXECUTE FUNCTION refuse_mark()",
    )


async def test_mark_failures_park_the_row(
    rails: Rails, outbox: Outbox, caplog: pytest.LogCaptureFixture,
) -> None:
    await rails.apply_topic(topic_resource())
    refuse_marking(outbox)
    caplog.set_level(logging.INFO, logger="eventrails")
    first, charge, second = outbox.write([
        ("send-email", email(1), None),
        ("charge-card", {"organizationId": "org_1", "projectId": "prj_1", "invoiceId": "inv-1"}, None),
        ("send-email", email(2), None),
    ])
    store = CountingStore(outbox.store())
    started = time.monotonic()
    async with relaying(rails, outbox, store=store, max_attempts=3, backoff=0.3, backoff_max=2.0) as relay:
        await wait_until(lambda: any(row.parked for row in outbox.rows()), "the charge row to be parked")
        parked_after = time.monotonic() - started
        await asyncio.sleep(0.5)

    rows = {row.id: row for row in outbox.rows()}
    assert rows[first].published and rows[second].published, "the other rows of the batch were marked one by one"
    assert rows[charge].parked and not rows[charge].published
    assert rows[charge].attempts == 3
    assert "but marking the row failed" in (rows[charge].last_error or "")
    assert "disk full while marking a charge" in (rows[charge].last_error or "")
    assert sorted(await stream_msg_ids(rails, "shop_orders")) == sorted([first, charge, second]), (
        "the stream holds the charge once: each re-publish was a duplicate"
    )
    assert relay.metrics.failures.labels("orders", "mark")._value.get() == 3
    assert relay.metrics.parked_total.labels("orders")._value.get() == 1
    # Two backoffs of about 0.3s and 0.6s (jitter 0.8 to 1.2) came between the three attempts.
    assert parked_after >= 0.7, f"parked after {parked_after:.2f}s: the attempts did not back off"
    assert store.claims < 5 * (parked_after + 0.5) / 0.2 + 10, f"{store.claims} claims: the relay spun"
    parked_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"parked outbox row {charge}")]
    assert len(parked_lines) == 1
    assert "after 3 attempt(s)" in parked_lines[0]


# --- nats-server restarted -----------------------------------------------------------------------


async def test_nats_restart_loses_nothing(
    rails: Rails, outbox: Outbox, caplog: pytest.LogCaptureFixture,
) -> None:
    await rails.apply_topic(topic_resource())
    caplog.set_level(logging.WARNING, logger="eventrails.outbox")
    async with relaying(rails, outbox, publish_timeout=1.0, batch_size=20) as relay:
        writing = asyncio.create_task(write_steadily(outbox, 200, pause=0.03))
        await wait_until(lambda: len(outbox.published_ids()) >= 20, "the relay to publish the first rows")

        await asyncio.to_thread(rails.server.stop)
        # Publishes in flight at the stop fail within the publish timeout; after that nothing is marked.
        await asyncio.sleep(1.5)
        during = outbox.published_ids()
        await asyncio.sleep(1.5)
        assert outbox.published_ids() == during, "rows were marked published while NATS was down"
        assert not relay.ready
        await asyncio.to_thread(rails.server.start)

        ids = await asyncio.wait_for(writing, 60)
        await wait_until(lambda: outbox.published_ids() == set(ids), "every row to be published after the restart", 40)

    waiting = [r.getMessage() for r in caplog.records if "is not connected to NATS" in r.getMessage()]
    assert waiting, "the relay noticed the outage and waited for NATS instead of claiming rows"
    stored = await stream_msg_ids(rails, "shop_orders")
    assert len(stored) == len(ids) == 200, "the stream holds each row exactly once"
    assert set(stored) == set(ids)
    assert all(row.attempts == 0 and not row.parked for row in outbox.rows()), "an outage never counts against rows"


async def test_missing_pubacks_back_off(
    rails: Rails, outbox: Outbox, caplog: pytest.LogCaptureFixture,
) -> None:
    await rails.apply_topic(topic_resource())
    caplog.set_level(logging.WARNING, logger="eventrails.outbox")
    pid = rails.server.pid
    assert pid is not None
    async with relaying(rails, outbox, publish_timeout=0.5) as relay:
        first = outbox.write([("send-email", email(n), None) for n in range(5)])
        await wait_until(lambda: outbox.published_ids() == set(first), "the first rows to be published")

        # A frozen server keeps the connection open but sends nothing back, so no PubAck arrives.
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = outbox.write([("send-email", email(10 + n), None) for n in range(5)])
            await asyncio.sleep(3.0)
            assert outbox.published_ids() == set(first), "a row was marked published without a PubAck"
            assert not relay.ready
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_until(lambda: outbox.published_ids() == set(first + frozen), "the frozen rows to be published")

    pauses = [
        float(r.getMessage().rsplit("claiming again in ", 1)[1].rstrip("s"))
        for r in caplog.records if "did not acknowledge" in r.getMessage()
    ]
    assert len(pauses) >= 2, f"too few pauses: {pauses}"
    assert pauses == sorted(pauses), f"no growing backoff: {pauses}"
    assert pauses[-1] > pauses[0], f"no growing backoff: {pauses}"
    assert relay.metrics.failures.labels("orders", "unavailable")._value.get() >= 5
    assert all(row.attempts == 0 and not row.parked for row in outbox.rows()), "an outage never counts against rows"
    stored = await stream_msg_ids(rails, "shop_orders")
    assert sorted(stored) == sorted(first + frozen), "each row is stored once despite the repeated publishes"
