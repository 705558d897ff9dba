"""Dispatcher throughput: a no-op handler behind the eventrails Dispatcher against a raw nats-py pull loop.

Each run stores the same 100-byte tasks in a workqueue stream (file storage), then times
how long the consumer takes to drain them: from the start of consuming until the stream
is empty, which in a workqueue stream means JetStream has every acknowledgement. The raw loop fetches batches of 100 and acks each
message; the Dispatcher validates, routes, runs the handler, records metrics and acks.

    .venv/bin/python bench/dispatcher.py [--messages 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publisher import (  # noqa: E402 - the benchmarks share their setup
    NAMESPACE,
    STREAM,
    SUBJECT,
    _encode,
    apply,
    client,
    payload,
    start_server,
    summarize,
)

from eventrails import Context, Worker, WorkerSettings  # noqa: E402
from eventrails._dispatcher import Dispatcher  # noqa: E402
from eventrails._metrics import Metrics  # noqa: E402

worker = Worker()


@worker.task("send-email")
async def noop(payload: dict[str, Any], ctx: Context) -> None:
    return None


async def fill(nc: NATS, count: int) -> None:
    js = nc.jetstream(publish_async_max_pending=256)
    body = _encode(payload())
    futures = [await js.publish_async(SUBJECT, body, headers={"Nats-Msg-Id": uuid.uuid4().hex}) for _ in range(count)]
    await asyncio.gather(*futures)


async def drained(nc: NATS, count: int) -> None:
    """Return once the workqueue stream is empty: JetStream removed every acknowledged message."""
    js = nc.jetstream()
    while (await js.stream_info(STREAM)).state.messages:
        await asyncio.sleep(0.005)


async def raw_loop(server_url: str, count: int, _: int) -> float:
    nc = await nats.connect(server_url)
    try:
        subscription = await nc.jetstream().pull_subscribe_bind("mailer", stream=STREAM)
        started = time.perf_counter()
        handled = 0
        while handled < count:
            try:
                messages = await subscription.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                await msg.ack()
            handled += len(messages)
        await drained(nc, count)
        return time.perf_counter() - started
    finally:
        await nc.close()


async def dispatcher_run(server_url: str, count: int, concurrency: int) -> float:
    nc = await nats.connect(server_url)
    settings = WorkerSettings(
        nats_servers=[server_url], namespace=NAMESPACE, topic="orders", consumer="mailer", concurrency=concurrency,
        health_port=0,
    )
    dispatcher = Dispatcher(worker, settings, nc, metrics=Metrics())
    try:
        started = time.perf_counter()
        task = asyncio.create_task(dispatcher.run())
        await drained(nc, count)
        elapsed = time.perf_counter() - started
        dispatcher.stop()
        await task
        return elapsed
    finally:
        await nc.close()


async def main(messages: int, runs: int) -> None:
    import logging

    logging.getLogger("eventrails").setLevel(logging.WARNING)
    server = start_server()
    variants = {
        "nats-py fetch(100) + ack": (raw_loop, 0),
        "eventrails Dispatcher, concurrency 16": (dispatcher_run, 16),
        "eventrails Dispatcher, concurrency 64": (dispatcher_run, 64),
    }
    try:
        nc = await client(server)
        await apply(nc, server, with_consumer=True)
        js = nc.jetstream()
        results: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(runs + 1):  # the first round warms up and is not counted
            for name, (variant, concurrency) in variants.items():
                # A fresh consumer per run, so each starts from an ack floor of 0.
                await js.purge_stream(STREAM)
                await js.delete_consumer(STREAM, "mailer")
                await apply(nc, server, with_consumer=True)
                await fill(nc, messages)
                elapsed = await variant(server.url, messages, concurrency)
                if round_index:
                    results[name].append(messages / elapsed)
        await nc.close()
    finally:
        server.cleanup()
    summarize(f"Dispatcher throughput, no-op handler, {messages} messages of 100 B per run", results,
              "nats-py fetch(100) + ack")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.runs))
