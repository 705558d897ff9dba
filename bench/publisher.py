"""Publisher throughput: eventrails ``Publisher.enqueue`` against raw nats-py on the same server.

Every variant publishes the same 100-byte JSON payload to the same workqueue stream (file
storage) and waits for every PubAck. The variants run in turn within each round, so they
share the machine's state; the stream is purged between them.

    .venv/bin/python bench/publisher.py [--messages 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from eventrails import NatsSettings, Publisher
from eventrails._manifests import parse_resource
from eventrails._natsserver import NatsServer
from eventrails._resources import API_VERSION, Consumer, Topic
from eventrails_operator._desired import BusConnection
from eventrails_operator._reconcile import reconcile_consumer, reconcile_topic

# --- setup shared with bench/dispatcher.py ---------------------------------------------------

NAMESPACE = "bench"
SUBJECT = f"eventrails.{NAMESPACE}.orders.send-email"
STREAM = f"{NAMESPACE}_orders"


def payload(size: int = 100) -> dict[str, Any]:
    """Return a task payload whose JSON encoding is exactly ``size`` bytes."""
    base = {"organizationId": "org_1", "projectId": "prj_1", "emailId": 1, "pad": ""}
    empty = len(_encode(base))
    base["pad"] = "x" * max(size - empty, 0)
    return base


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def topic(storage: str = "file") -> Topic:
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": "orders", "namespace": NAMESPACE},
            "spec": {"tasks": ["send-email"], "storage": storage, "retention": "workqueue"}}
    resource = parse_resource(body)
    assert isinstance(resource, Topic)
    return resource


def consumer(**spec: Any) -> Consumer:
    body = {"apiVersion": API_VERSION, "kind": "Consumer", "metadata": {"name": "mailer", "namespace": NAMESPACE},
            "spec": {"topic": "orders", "handler": "bench:worker", "ackWait": "30s", **spec}}
    resource = parse_resource(body)
    assert isinstance(resource, Consumer)
    return resource


def start_server() -> NatsServer:
    return NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="eventrails-bench-"))).start()


async def apply(nc: NATS, server: NatsServer, with_consumer: bool = False, **consumer_spec: Any) -> None:
    js = nc.jetstream()
    bus = BusConnection(servers=(server.url,))
    result = await reconcile_topic(js, topic(), bus)
    assert result.error is None, result.error
    if with_consumer:
        result = await reconcile_consumer(js, consumer(**consumer_spec), topic(), bus=bus)
        assert result.error is None, result.error


async def client(server: NatsServer) -> NATS:
    return await nats.connect(server.url)


def summarize(title: str, results: dict[str, list[float]], baseline: str, unit: str = "msg/s") -> None:
    """Print median, min and max of each row, and the ratio of medians against ``baseline``."""
    base = statistics.median(results[baseline])
    print(f"\n{title}")
    print(f"{'':<42}{'median':>10}{'min':>10}{'max':>10}  ratio to {baseline}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<42}{median:>10.0f}{min(values):>10.0f}{max(values):>10.0f}  {median / base:.2f}")
    print(f"({unit}; {len(next(iter(results.values())))} runs each; Python {platform.python_version()}, "
          f"{platform.machine()})")


# --- the variants ------------------------------------------------------------------------------

CONCURRENCY = 64


async def raw_publish(nc: NATS, count: int) -> None:
    js = nc.jetstream()
    body = _encode(payload())
    for _ in range(count):
        await js.publish(SUBJECT, body, headers={"Nats-Msg-Id": uuid.uuid4().hex})


async def raw_publish_async(nc: NATS, count: int) -> None:
    js = nc.jetstream(publish_async_max_pending=CONCURRENCY)
    body = _encode(payload())
    futures = [await js.publish_async(SUBJECT, body, headers={"Nats-Msg-Id": uuid.uuid4().hex}) for _ in range(count)]
    await asyncio.gather(*futures)


async def eventrails_enqueue(nc: NATS, count: int) -> None:
    publisher = Publisher(nc, NatsSettings(namespace=NAMESPACE))
    data = payload()
    for _ in range(count):
        await publisher.enqueue("orders", "send-email", data)


async def eventrails_enqueue_concurrent(nc: NATS, count: int) -> None:
    publisher = Publisher(nc, NatsSettings(namespace=NAMESPACE))
    data = payload()
    remaining = iter(range(count))

    async def lane() -> None:
        for _ in remaining:
            await publisher.enqueue("orders", "send-email", data)

    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))


VARIANTS: dict[str, Callable[[NATS, int], Awaitable[None]]] = {
    "nats-py js.publish (sequential)": raw_publish,
    "eventrails enqueue (sequential)": eventrails_enqueue,
    f"nats-py js.publish_async ({CONCURRENCY} pending)": raw_publish_async,
    f"eventrails enqueue ({CONCURRENCY} concurrent)": eventrails_enqueue_concurrent,
}


async def main(messages: int, runs: int) -> None:
    server = start_server()
    try:
        nc = await client(server)
        await apply(nc, server)
        js = nc.jetstream()
        for variant in VARIANTS.values():  # warm-up: contract cache, connections, server files
            await variant(nc, 200)
        results: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(runs):
            for name, variant in VARIANTS.items():
                await js.purge_stream(STREAM)
                started = time.perf_counter()
                await variant(nc, messages)
                elapsed = time.perf_counter() - started
                stored = (await js.stream_info(STREAM)).state.messages
                assert stored == messages, f"{name} stored {stored} of {messages}"
                results[name].append(messages / elapsed)
        await nc.close()
    finally:
        server.cleanup()
    summarize(f"Publisher throughput, {messages} messages of 100 B per run", results, "nats-py js.publish (sequential)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.runs))
