"""Failure drills on real nats-servers: restarts, a lost cluster node, SIGTERM under load, poison floods,
slow handlers and backoff. Each drill checks that no acknowledged message is lost and that
nothing loops hot; every wait is bounded.

The module-level ``drill_worker`` is the handler object the worker subprocesses import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from eventrails import Context, NatsSettings, NatsUnavailable, Publisher, Worker
from eventrails._connect import connect
from eventrails._dispatcher import Dispatcher
from eventrails._natsserver import NatsServer, free_port
from eventrails_operator._desired import BusConnection
from eventrails_operator._reconcile import reconcile_consumer, reconcile_topic
from tests.integration.test_runtime import (
    NAMESPACE,
    WAIT,
    Rails,
    SendEmail,
    consumer_resource,
    email,
    eventually,
    rails,
    running,
    topic_resource,
)
from tests.integration.test_runtime_dispatch import email_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVENTRAILS = str(Path(sys.executable).parent / "eventrails")
HANDLER = "tests.integration.test_drills:drill_worker"

drill_worker = Worker()


@drill_worker.task("send-email")
async def slow_send(payload: SendEmail, ctx: Context) -> None:
    """Take a second, then record the message id in the file named by DRILL_LOG."""
    await asyncio.sleep(float(os.environ.get("DRILL_HANDLER_SECONDS", "1")))
    with open(os.environ["DRILL_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{ctx.msg_id}\n")


async def publish_until_stored(publisher: Publisher, email_id: int, give_up: float = 60.0) -> str:
    """Enqueue one email, retrying the same dedupe key until a PubAck arrives, as a careful producer would."""
    deadline = time.monotonic() + give_up
    while True:
        try:
            receipt = await publisher.enqueue("orders", "send-email", email(email_id), dedupe_key=f"email-{email_id}")
            return receipt.msg_id
        except NatsUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- a server restart mid-traffic ------------------------------------------------------------


async def test_server_restart_mid_traffic(rails: Rails) -> None:
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic, concurrency=8)
    handled: Counter[str] = Counter()

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled[ctx.msg_id] += 1

    total = 300
    acknowledged: list[str] = []
    publisher_nc = await connect(rails.settings, name="drill-publisher", deadline=10)
    publisher = Publisher(publisher_nc, rails.settings, publish_deadline=2.0, attempt_timeout=0.5)
    try:
        async with running(email_worker(handle), settings) as dispatcher:
            async def produce() -> None:
                for email_id in range(total):
                    acknowledged.append(await publish_until_stored(publisher, email_id))
                    await asyncio.sleep(0.002)

            producing = asyncio.create_task(produce())
            await eventually(lambda: _true(len(acknowledged) >= total // 3), "a third of the traffic to be stored")
            rails.server.stop()
            await asyncio.sleep(0.5)
            rails.server.start()
            await asyncio.wait_for(producing, 60)

            await eventually(lambda: _true(set(acknowledged) <= set(handled)), "every stored message to be handled", 30)
            assert dispatcher.ready, "the dispatcher resumed on its own"
    finally:
        await publisher_nc.close()

    assert len(acknowledged) == total
    assert set(handled) == set(acknowledged)
    # At-least-once: an ack lost in the restart may bring a message back once more.
    assert max(handled.values()) <= 2


async def _true(value: bool) -> bool:
    return value


# --- a cluster node lost ------------------------------------------------------------------------


async def test_cluster_node_killed(nats_cluster: list[NatsServer]) -> None:
    urls = [server.url for server in nats_cluster]
    bus = BusConnection(servers=tuple(urls))
    settings = NatsSettings(nats_servers=urls, namespace=NAMESPACE)
    topic = topic_resource(replicas=3)
    consumer = consumer_resource(names=["send-email"])
    admin = await nats.connect(urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = admin.jetstream()

        # The cluster elects its meta leader first; until then JetStream requests fail.
        async def applied() -> bool:
            topic_result = await reconcile_topic(js, topic, bus)
            if topic_result.error is not None:
                return False
            return (await reconcile_consumer(js, consumer, topic, bus=bus)).error is None

        await eventually(applied, "the R3 stream and its consumer to be created", timeout=30)
        from eventrails_operator._desired import worker_settings

        worker_env = worker_settings(consumer, topic, bus).model_copy(
            update={"health_port": 0, "health_host": "127.0.0.1", "drain_timeout": 5.0}
        )
        handled: Counter[str] = Counter()

        async def handle(payload: SendEmail, ctx: Context) -> None:
            handled[ctx.msg_id] += 1

        publisher_nc = await connect(settings, name="drill-publisher", deadline=10)
        publisher = Publisher(publisher_nc, settings, publish_deadline=15.0, attempt_timeout=1.0)
        acknowledged: list[str] = []
        try:
            async with running(email_worker(handle), worker_env):
                for email_id in range(50):
                    acknowledged.append(await publish_until_stored(publisher, email_id))

                # Kill the node that leads the stream, as a crash would.
                info = await js.stream_info(worker_env.stream)
                leader = info.cluster.leader if info.cluster else None
                victim = next(server for server in nats_cluster if server.server_name == leader)
                victim.kill()

                for email_id in range(50, 100):
                    acknowledged.append(await publish_until_stored(publisher, email_id))
                await eventually(
                    lambda: _true(set(acknowledged) <= set(handled)), "every stored message to be handled", 45,
                )
        finally:
            await publisher_nc.close()
    finally:
        await admin.close()

    assert len(acknowledged) == 100
    assert set(handled) == set(acknowledged)


# --- SIGTERM to a busy worker process --------------------------------------------------------


async def _start_worker(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            EVENTRAILS, "worker", HANDLER, cwd=ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )


async def _ready(process: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
    async def answered() -> bool:
        if process.returncode is not None:
            pytest.fail(f"worker exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(answered, "the worker's /readyz to answer 200", timeout=30)


@contextlib.asynccontextmanager
async def worker_process(rails: Rails, tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"], handler=HANDLER)
    await rails.apply_topic(topic)
    port = free_port()
    settings = await rails.apply_consumer(consumer, topic, health_port=port, **overrides)
    env = {**os.environ, **settings.to_env(), "DRILL_LOG": str(tmp_path / "handled.log")}
    log_path = tmp_path / "worker.log"
    process = await _start_worker(env, log_path)
    try:
        await _ready(process, port, log_path)
        yield process, {"log": str(log_path), "handled": env["DRILL_LOG"], "port": str(port)}
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_busy_worker_finishes_in_flight(rails: Rails, tmp_path: Path) -> None:
    publisher = rails.publisher()
    async with worker_process(rails, tmp_path, concurrency=4) as (process, paths):
        ids = [await publish_until_stored(publisher, email_id) for email_id in range(12)]
        # The worker takes 4 at a time and each handler takes a second: stop it mid-flight.
        await asyncio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), WAIT)
    output = Path(paths["log"]).read_text()
    assert returncode == 0, output
    first_run = Path(paths["handled"]).read_text().split()
    assert len(first_run) == 4, f"the 4 in-flight handlers finish during the drain, got {first_run}\n{output}"

    # A second worker takes the rest; across both, every message is handled exactly once.
    topic = topic_resource()
    settings = rails.worker_settings(consumer_resource(names=["send-email"], handler=HANDLER), topic, concurrency=8)
    os.environ["DRILL_LOG"] = paths["handled"]
    os.environ["DRILL_HANDLER_SECONDS"] = "0"
    try:
        async with running(drill_worker, settings):
            await eventually(
                lambda: _true(len(Path(paths["handled"]).read_text().split()) >= 12), "the rest to be handled",
            )
            await asyncio.sleep(0.3)
    finally:
        del os.environ["DRILL_LOG"], os.environ["DRILL_HANDLER_SECONDS"]

    counts = Counter(Path(paths["handled"]).read_text().split())
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, f"handled twice: {[key for key, count in counts.items() if count > 1]}"


async def test_idle_worker_stops_promptly(rails: Rails, tmp_path: Path) -> None:
    async with worker_process(rails, tmp_path) as (process, paths):
        await asyncio.sleep(1.5)  # idle, with a pull request waiting on the server
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), WAIT)
        stopped_in = time.monotonic() - started

    output = Path(paths["log"]).read_text()
    assert returncode == 0, output
    assert "waiting up to 1.0s for the fetch under way to return" in output
    # Pulls expire after a second while idle; the old five-second pulls made this take five.
    assert stopped_in < 4.0, f"idle worker took {stopped_in:.1f}s to stop"


# --- poison floods, slow handlers and backoff -------------------------------------------------


async def test_hundred_poison_messages(rails: Rails) -> None:
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)

    async def handle(payload: SendEmail, ctx: Context) -> None:
        raise AssertionError("poison must not reach the handler")

    async with running(email_worker(handle), settings):
        for index in range(100):
            await rails.js.publish(
                "eventrails.shop.orders.send-email", b"{" * (index % 3 + 1), headers={"Nats-Msg-Id": f"poison-{index}"},
            )

        async def all_dead() -> bool:
            return await rails.stream_messages("shop_orders_dlq") == 100

        await eventually(all_dead, "100 dead letters", timeout=30)

    info = await rails.js.consumer_info(settings.stream, settings.consumer)
    # One delivery each: poison goes to the dead-letter stream at once, without retries.
    assert info.delivered is not None and info.delivered.consumer_seq == 100
    assert info.num_redelivered == 0
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    reasons = set()
    for seq in range(1, 101):
        headers = (await rails.js.get_msg("shop_orders_dlq", seq)).headers or {}
        reasons.add((headers["Eventrails-Dlq-Reason"], headers["Eventrails-Delivery"]))
    assert reasons == {("payload is not valid JSON", "1")}


async def test_slow_handler_on_two_workers_handled_once(rails: Rails) -> None:
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"], ackWait="1s")
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    handled: Counter[int] = Counter()

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled[payload.emailId] += 1
        await asyncio.sleep(3.0)  # three times the ack wait

    async with running(email_worker(handle), settings), running(email_worker(handle), settings):
        for email_id in range(4):
            await rails.publisher().enqueue("orders", "send-email", email(email_id))
        outcomes = [await rails.outcomes.next(timeout=10) for _ in range(4)]

    assert {item["outcome"] for item in outcomes} == {"done"}
    assert handled == {0: 1, 1: 1, 2: 1, 3: 1}
    info = await rails.js.consumer_info(settings.stream, settings.consumer)
    assert info.num_redelivered == 0


async def test_backoff_followed_per_message(rails: Rails) -> None:
    backoff = [0.2, 0.6, 1.0]
    topic = topic_resource()
    consumer = consumer_resource(names=["send-email"], maxDeliver=4, backoff=[f"{int(b * 1000)}ms" for b in backoff])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    loop = asyncio.get_running_loop()
    seen: dict[int, list[float]] = defaultdict(list)

    async def handle(payload: SendEmail, ctx: Context) -> None:
        seen[payload.emailId].append(loop.time())
        raise RuntimeError("downstream keeps failing")

    async with running(email_worker(handle), settings):
        for email_id in range(3):
            await rails.publisher().enqueue("orders", "send-email", email(email_id))

        async def dead() -> bool:
            return await rails.stream_messages("shop_orders_dlq") == 3

        await eventually(dead, "all three to be dead-lettered", timeout=20)

    for email_id, times in seen.items():
        assert len(times) == 4, f"email {email_id} was delivered {len(times)} times, not maxDeliver 4"
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        for gap, expected in zip(gaps, backoff):
            # Loose bounds: not before the backoff entry, and not stuck far behind it.
            assert expected * 0.8 <= gap <= expected + 2.0, f"email {email_id}: gaps {gaps} for backoff {backoff}"
