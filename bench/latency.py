"""Publish-to-handler latency at a steady rate: Publisher.enqueue in one process, a Dispatcher in another.

A worker process runs the Dispatcher (concurrency 16, the default) on the benchmark's
consumer; its handler notes, for every message, the time since the publisher stamped the
payload just before calling ``enqueue``. The publishing process sends ``--rate`` messages
a second for ``--seconds`` seconds on a fixed schedule: each enqueue starts at its planned
moment whether or not the previous PubAck has come back, so a slow moment shows up in the
figures instead of delaying the messages after it. Both processes run on this machine and
read the same clock.

    .venv/bin/python bench/latency.py [--rate 1000] [--seconds 5] [--runs 5] [--loop uvloop] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import nats

from _common import (
    CONSUMER,
    NAMESPACE,
    TASK,
    TOPIC,
    Table,
    apply,
    client,
    fresh_consumer,
    load,
    loop_choices,
    payload,
    percentile,
    run,
    start_server,
    write_section,
)
from eventrails import Context, NatsSettings, Publisher, Worker, WorkerSettings


def _worker_process(url: str, count: int, loop: str, results: Connection) -> None:
    run(_consume(url, count, results), loop)


async def _consume(url: str, count: int, results: Connection) -> None:
    logging.getLogger("eventrails").setLevel(logging.WARNING)
    from eventrails._dispatcher import Dispatcher
    from eventrails._metrics import Metrics

    latencies: list[float] = []
    done = asyncio.Event()
    worker = Worker()

    @worker.task(TASK)
    async def note(body: dict[str, Any], ctx: Context) -> None:
        latencies.append(time.time() - body["sentAt"])
        if len(latencies) >= count:
            done.set()

    nc = await nats.connect(url)
    settings = WorkerSettings(nats_servers=[url], namespace=NAMESPACE, topic=TOPIC, consumer=CONSUMER, health_port=0)
    dispatcher = Dispatcher(worker, settings, nc, metrics=Metrics())
    task = asyncio.create_task(dispatcher.run())
    while not dispatcher.ready:
        await asyncio.sleep(0.01)
    results.send("ready")
    try:
        await asyncio.wait_for(done.wait(), timeout=120)
    finally:
        dispatcher.stop()
        await task
        await nc.close()
        results.send(latencies)


async def _publish(url: str, rate: float, seconds: float) -> int:
    nc = await nats.connect(url)
    publisher = Publisher(nc, NatsSettings(namespace=NAMESPACE))
    count = int(rate * seconds)
    base = payload(sentAt=0.0)
    pending: set[asyncio.Task[Any]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    for index in range(count):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(publisher.enqueue(TOPIC, TASK, {**base, "sentAt": time.time()}))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    await nc.close()
    return count


async def one_run(server_url: str, rate: float, seconds: float, loop: str) -> list[float]:
    count = int(rate * seconds)
    receiving, sending = multiprocessing.get_context("spawn").Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(
        target=_worker_process, args=(server_url, count, loop, sending), daemon=True
    )
    process.start()
    try:
        ready = await asyncio.to_thread(receiving.poll, 60)
        if not ready or receiving.recv() != "ready":
            raise RuntimeError("the worker process did not start within 60s")
        await _publish(server_url, rate, seconds)
        if not await asyncio.to_thread(receiving.poll, 120):
            raise RuntimeError("the worker process did not report its latencies within 120s")
        latencies: list[float] = receiving.recv()
    finally:
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()
    return latencies


async def main(rate: float, seconds: float, runs: int, loop: str, write: bool) -> Table:
    server = start_server()
    table = Table(
        f"Publish-to-handler latency at {rate:,.0f} msg/s for {seconds:g} s per run, {loop} loop", "ms"
    )
    try:
        nc = await client(server)
        await apply(nc, server)
        load_before = load()
        for round_index in range(runs + 1):  # the first round warms up and is not counted
            await fresh_consumer(nc, server)
            latencies = await one_run(server.url, rate, seconds, loop)
            if round_index:
                for label, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
                    table.add(label, percentile(latencies, fraction) * 1000)
                print(f"run {round_index}: p50 {statistics.median(latencies) * 1000:.2f} ms, "
                      f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms over {len(latencies)} messages", flush=True)
        await nc.close()
    finally:
        server.cleanup()
    table.print()
    print(f"load average before {load_before}, after {load()}")
    if write:
        write_section(f"latency-{loop}", f"{table.markdown()}\n\nLoad average (1, 5, 15 min) before the runs "
                      f"{load_before}, after {load()}.")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loop", choices=loop_choices(), default="asyncio")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    arguments = parser.parse_args()
    run(main(arguments.rate, arguments.seconds, arguments.runs, arguments.loop, arguments.write), arguments.loop)
