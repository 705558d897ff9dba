"""Dispatcher throughput: a no-op handler behind the eventrails Dispatcher against its peers.

Each run stores the same 100-byte tasks in a workqueue stream (file storage) and times
how long one consumer process takes to drain them. The clock runs from the start of
consuming until the stream is empty, which in a workqueue stream means that JetStream
has every acknowledgement.
Every variant acks each message after its handler returned, on a fresh durable consumer.

    raw        nats-py fetch(100) and msg.ack() in a loop
    inbox      the Dispatcher's way of pulling with nothing else: pull requests for 64
               messages on an inbox of its own, and msg.ack() in the inbox's callback
    faststream FastStream's JetStream pull subscriber (batches of 64, handled concurrently)
    eventrails Dispatcher with concurrency 16 (the default) and 64: validation, routing,
               outcome, metrics, heartbeat timer, tracing hooks, ack
    nats bench `nats bench js consume` (natscli, Go): what the server sustains

A second table gives the processor time this process spent per message for each Python
variant (time.process_time over the run, divided by the messages): the cost of the
variant itself, which moves less with the machine's load than the rates do.

    .venv/bin/python bench/dispatcher.py [--messages 20000] [--runs 5] [--loop uvloop] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import nats.errors

from _common import (
    CONSUMER,
    NAMESPACE,
    STREAM,
    TOPIC,
    Table,
    apply,
    client,
    drained,
    fill,
    fresh_consumer,
    load,
    loop_choices,
    nats_bench,
    natscli,
    run,
    start_server,
    write_section,
)
from eventrails import Context, Worker, WorkerSettings
from eventrails._dispatcher import Dispatcher
from eventrails._metrics import Metrics

worker = Worker()


class Tally:
    """Counts handled messages; ``done`` is set once the run's last one was handled.

    The benchmark polls the stream (to see every ack arrive) only after that, so its own
    polling does not share the event loop with the variant while the variant runs.
    """

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()

    def reset(self, target: int) -> None:
        self.count, self.target = 0, target
        self.done = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()


tally = Tally()


@worker.task("send-email")
async def noop(payload: dict[str, Any], ctx: Context) -> None:
    tally.add()


async def raw_loop(url: str, count: int) -> float:
    nc = await nats.connect(url)
    try:
        subscription = await nc.jetstream().pull_subscribe_bind(CONSUMER, stream=STREAM)
        started = time.perf_counter()
        handled = 0
        while handled < count:
            try:
                messages = await subscription.fetch(100, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in messages:
                await msg.ack()
            handled += len(messages)
        await drained(nc)
        return time.perf_counter() - started
    finally:
        await nc.close()


async def inbox_loop(url: str, count: int, window: int = 64) -> float:
    """Consume with the Dispatcher's technique and nothing else: pull requests on an inbox, an ack per message.

    Up to ``window`` messages are requested at a time, and a new request goes out once a
    quarter of them arrived. No payload is decoded and no task is made: the callback acks.
    """
    nc = await nats.connect(url)
    handled = 0
    since_request = 0
    more = asyncio.Event()
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"
    request = b'{"batch":%d,"expires":1000000000}'

    async def on_message(msg: Any) -> None:
        nonlocal handled, since_request
        if not msg.reply:
            more.set()  # a status: the request ended
            return
        await msg.ack()
        handled += 1
        since_request += 1
        if since_request >= window // 4 or handled >= count:
            more.set()

    try:
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_message)
        started = time.perf_counter()
        outstanding = 0
        while handled < count:
            outstanding -= since_request
            since_request = 0
            if outstanding < window:
                await nc.publish(next_subject, request % (window - outstanding), reply=inbox)
                outstanding = window
            more.clear()
            try:
                await asyncio.wait_for(more.wait(), timeout=1.5)
            except TimeoutError:
                outstanding = 0  # the request expired: ask again
        await drained(nc)
        return time.perf_counter() - started
    finally:
        await nc.close()


async def dispatcher_run(url: str, count: int, concurrency: int) -> float:
    nc = await nats.connect(url)
    settings = WorkerSettings(
        nats_servers=[url], namespace=NAMESPACE, topic=TOPIC, consumer=CONSUMER, concurrency=concurrency,
        health_port=0,
    )
    dispatcher = Dispatcher(worker, settings, nc, metrics=Metrics())
    tally.reset(count)
    try:
        started = time.perf_counter()
        task = asyncio.create_task(dispatcher.run())
        await asyncio.wait_for(tally.done.wait(), timeout=300)
        await drained(nc)
        elapsed = time.perf_counter() - started
        dispatcher.stop()
        await task
        return elapsed
    finally:
        await nc.close()


async def faststream_run(url: str, count: int, watch: Any) -> float:
    import peers_faststream

    return await peers_faststream.consume(url, count, 64, watch)


async def main(messages: int, runs: int, loop: str, write: bool, only: str | None = None) -> Table:
    logging.getLogger("eventrails").setLevel(logging.WARNING)
    server = start_server()
    table = Table(f"Dispatcher throughput, no-op handler, {messages:,} messages of 100 B per run, {loop} loop", "msg/s")
    # Processor time of this process per message: it moves less with the machine's load than the rate does.
    cpu_table = Table("Processor time of the consuming process per message", "µs")
    baseline, faststream = "nats-py fetch(100) + ack", "FastStream pull subscriber, batch 64"
    natsbench = "nats bench js consume (natscli, Go)"
    floor = "nats-py pull requests on an inbox + ack, 64 requested"
    variants: dict[str, Any] = {
        baseline: lambda nc: raw_loop(server.url, messages),
        floor: lambda nc: inbox_loop(server.url, messages),
        faststream: lambda nc: faststream_run(server.url, messages, nc),
        "eventrails Dispatcher, concurrency 16": lambda nc: dispatcher_run(server.url, messages, 16),
        "eventrails Dispatcher, concurrency 64": lambda nc: dispatcher_run(server.url, messages, 64),
    }
    if only:
        variants = {name: variant for name, variant in variants.items() if only in name}

    try:
        nc = await client(server)
        await apply(nc, server)
        load_before = load()
        for round_index in range(runs + 1):  # the first round warms up and is not counted
            for name, variant in variants.items():
                await fresh_consumer(nc, server)
                await fill(nc, messages)
                cpu_started = time.process_time()
                elapsed = await variant(nc)
                cpu = time.process_time() - cpu_started
                if round_index:
                    table.add(name, messages / elapsed)
                    cpu_table.add(name, cpu / messages * 1_000_000)

            # natscli's consumer runs in its own process, on the same consumer and messages.
            if natscli() is not None and not only:
                await fresh_consumer(nc, server)
                await fill(nc, messages)
                rate = nats_bench(
                    server.url, "js", "consume", "--stream", STREAM, "--consumer", CONSUMER, "--msgs", str(messages),
                    "--batch", "500",
                )
                await drained(nc)
                if round_index:
                    table.add(natsbench, rate)
        await nc.close()
    finally:
        server.cleanup()

    for name in table.rows:
        if name.startswith("eventrails"):
            table.compare(name, faststream)
            table.compare(name, baseline)
            table.compare(name, natsbench)
            table.compare(name, floor)
    table.print()
    cpu_table.print()
    print(f"load average before {load_before}, after {load()}")
    if write and not only:
        write_section(f"dispatcher-{loop}", f"{table.markdown()}\n\n{cpu_table.title}:\n\n{cpu_table.markdown()}\n\nLoad average (1, 5, 15 "
                      f"min) before the runs {load_before}, after {load()}.")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loop", choices=loop_choices(), default="asyncio")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--only", help="run only the variants whose name contains this text (for profiling)")
    arguments = parser.parse_args()
    run(main(arguments.messages, arguments.runs, arguments.loop, arguments.write, arguments.only), arguments.loop)
