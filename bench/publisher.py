"""Publisher throughput: eventrails against raw nats-py and `nats bench` on the same server.

Every variant publishes 100-byte JSON payloads to the same workqueue stream (file storage)
and waits for every PubAck. The variants run in turn within each round, so they share the
machine's state; the stream is purged before each.

    js.publish             nats-py, one message at a time (awaits each PubAck)
    enqueue                eventrails, one at a time
    js.publish_async       nats-py, up to 256 PubAcks pending, with a message id only, and again
                           with the headers eventrails sends (name, publish time, tenancy keys,
                           expected stream)
    enqueue_many           eventrails, one call for the whole run, up to 256 PubAcks pending
    enqueue x64            eventrails, 64 concurrent callers of enqueue
    nats bench             `nats bench js pub async --batch 256` (natscli, Go): the server's limit

eventrails also checks the contract, and sends a message id, the name, publish time and
the tenancy keys as headers on every message (the raw variants send a message id only).

    .venv/bin/python bench/publisher.py [--messages 20000] [--runs 5] [--loop uvloop] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

from _common import (
    NAMESPACE,
    STREAM,
    SUBJECT,
    TASK,
    TOPIC,
    Table,
    apply,
    client,
    encode,
    load,
    loop_choices,
    nats_bench,
    natscli,
    payload,
    run,
    start_server,
    stored,
    write_section,
)
from eventrails import NatsSettings, Publisher

PENDING = 256
CALLERS = 64


def _ids() -> Callable[[], str]:
    prefix = os.urandom(8).hex()
    counter = iter(range(1 << 62))
    return lambda: f"{prefix}{next(counter):x}"


async def raw_publish(nc: NATS, count: int) -> None:
    js = nc.jetstream()
    body, next_id = encode(payload()), _ids()
    for _ in range(count):
        await js.publish(SUBJECT, body, headers={"Nats-Msg-Id": next_id()})


async def raw_publish_async(nc: NATS, count: int) -> None:
    js = nc.jetstream(publish_async_max_pending=PENDING)
    body, next_id = encode(payload()), _ids()
    futures = [await js.publish_async(SUBJECT, body, headers={"Nats-Msg-Id": next_id()}) for _ in range(count)]
    await asyncio.gather(*futures)


async def raw_publish_async_headers(nc: NATS, count: int) -> None:
    """publish_async with the headers eventrails sends, to tell eventrails' own cost from the headers'."""
    js = nc.jetstream(publish_async_max_pending=PENDING)
    body, next_id = encode(payload()), _ids()
    headers = {
        "Eventrails-Name": TASK, "Eventrails-Published-At": "2026-01-01T00:00:00.000+00:00",
        "Eventrails-Organization-Id": "org_1", "Eventrails-Project-Id": "prj_1",
    }
    futures = [
        await js.publish_async(SUBJECT, body, stream=STREAM, headers={"Nats-Msg-Id": next_id(), **headers})
        for _ in range(count)
    ]
    await asyncio.gather(*futures)


async def eventrails_enqueue(nc: NATS, count: int) -> None:
    publisher = Publisher(nc, NatsSettings(namespace=NAMESPACE))
    data = payload()
    for _ in range(count):
        await publisher.enqueue(TOPIC, TASK, data)


async def eventrails_enqueue_many(nc: NATS, count: int) -> None:
    publisher = Publisher(nc, NatsSettings(namespace=NAMESPACE))
    receipts = await publisher.enqueue_many(TOPIC, TASK, [payload()] * count, max_pending=PENDING)
    assert len(receipts) == count


async def eventrails_enqueue_concurrent(nc: NATS, count: int) -> None:
    publisher = Publisher(nc, NatsSettings(namespace=NAMESPACE))
    data = payload()
    remaining = iter(range(count))

    async def caller() -> None:
        for _ in remaining:
            await publisher.enqueue(TOPIC, TASK, data)

    await asyncio.gather(*(caller() for _ in range(CALLERS)))


SEQUENTIAL = "nats-py js.publish, one at a time"
PIPELINED = f"nats-py js.publish_async, {PENDING} pending"
PIPELINED_HEADERS = f"nats-py js.publish_async, {PENDING} pending, eventrails' headers"
NATS_BENCH = f"nats bench js pub async, batch {PENDING} (natscli, Go)"

# Name, function, share of --messages it sends (one-at-a-time variants are slower).
VARIANTS: list[tuple[str, Callable[[NATS, int], Awaitable[None]], float]] = [
    (SEQUENTIAL, raw_publish, 0.25),
    ("eventrails enqueue, one at a time", eventrails_enqueue, 0.25),
    (PIPELINED, raw_publish_async, 1.0),
    (PIPELINED_HEADERS, raw_publish_async_headers, 1.0),
    (f"eventrails enqueue_many, {PENDING} pending", eventrails_enqueue_many, 1.0),
    (f"eventrails enqueue, {CALLERS} concurrent callers", eventrails_enqueue_concurrent, 1.0),
]


async def main(messages: int, runs: int, loop: str, write: bool) -> Table:
    server = start_server()
    table = Table(f"Publisher throughput, 100 B messages, {loop} loop", "msg/s")
    variants = [variant for variant in VARIANTS if variant[1] is not eventrails_enqueue_many
                or hasattr(Publisher, "enqueue_many")]
    try:
        nc = await client(server)
        await apply(nc, server)
        js = nc.jetstream()
        load_before = load()
        for round_index in range(runs + 1):  # the first round warms up and is not counted
            for name, variant, share in variants:
                count = max(int(messages * share), 1)
                await js.purge_stream(STREAM)
                started = time.perf_counter()
                await variant(nc, count)
                elapsed = time.perf_counter() - started
                assert await stored(nc) == count, f"{name} stored {await stored(nc)} of {count}"
                if round_index:
                    table.add(name, count / elapsed)
            if natscli() is not None:
                await js.purge_stream(STREAM)
                rate = nats_bench(
                    server.url, "js", "pub", "async", SUBJECT, "--stream", STREAM, "--msgs", str(messages),
                    "--size", "100B", "--batch", str(PENDING), "--dedup",
                )
                if round_index:
                    table.add(NATS_BENCH, rate)
        await nc.close()
    finally:
        server.cleanup()
    for name, _, share in variants:
        if name.startswith("eventrails"):
            table.compare(name, SEQUENTIAL if share < 1 else PIPELINED)
    for name, _, share in variants:
        if name.startswith("eventrails") and share == 1:
            table.compare(name, PIPELINED_HEADERS)
    for name, _, share in variants:
        if name.startswith("eventrails") and share == 1 and NATS_BENCH in table.rows:
            table.compare(name, NATS_BENCH)
    if NATS_BENCH in table.rows:
        table.compare(PIPELINED, NATS_BENCH)
    table.print()
    print(f"load average before {load_before}, after {load()}")
    if write:
        write_section(f"publisher-{loop}", f"{table.markdown()}\n\nLoad average (1, 5, 15 min) before the runs "
                      f"{load_before}, after {load()}.")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loop", choices=loop_choices(), default="asyncio")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    arguments = parser.parse_args()
    run(main(arguments.messages, arguments.runs, arguments.loop, arguments.write), arguments.loop)
