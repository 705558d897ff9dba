"""FastStream's JetStream pull subscriber on the benchmark's consumer, as a peer of the Dispatcher.

The subscriber binds to the same durable consumer (FastStream reads it and does not
change it), fetches batches of ``batch`` messages, runs the no-op handler on each message
of a batch concurrently, and acks each after its handler returned (FastStream's default
acknowledgement policy). Installed by the bench target, never by the tests.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.client import Client as NATS

from _common import CONSUMER, STREAM, SUBJECT, drained


async def consume(url: str, count: int, batch: int, watch: NATS) -> float:
    """Drain ``count`` stored messages with FastStream and return the seconds it took.

    ``watch`` is a connection of the benchmark's own, used to see the stream empty.
    """
    broker = NatsBroker(url, logger=None)
    handled = 0
    all_handled = asyncio.Event()

    @broker.subscriber(
        SUBJECT, stream=JStream(STREAM, declare=False), durable=CONSUMER,
        pull_sub=PullSub(batch_size=batch, timeout=1.0),
    )
    async def noop(body: dict[str, Any]) -> None:
        nonlocal handled
        handled += 1
        if handled >= count:
            all_handled.set()

    started = time.perf_counter()
    await broker.start()
    try:
        await asyncio.wait_for(all_handled.wait(), timeout=300)
        await drained(watch)
        elapsed = time.perf_counter() - started
    finally:
        await broker.stop()
    if handled < count:
        raise RuntimeError(f"FastStream handled {handled} of {count} messages")
    return elapsed
