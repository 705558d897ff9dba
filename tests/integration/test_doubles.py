"""One set of scenarios, run against the in-memory broker and against a real nats-server.

Each test takes the ``bus`` fixture, which is parametrized over both. Every scenario
drives the real Publisher and Dispatcher and checks what the server side did through the
same JetStream calls, so the in-memory double cannot drift from nats-server unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import pytest

from eventrails import ConfigurationError, Context, PayloadError, Publisher, Retry, Worker, WorkerSettings
from eventrails._dlq import DeadLetters
from eventrails._resources import Consumer, Topic
from eventrails.testing import InMemoryBroker
from eventrails_operator._desired import BusConnection
from tests.integration.test_runtime import (
    NAMESPACE,
    WAIT,
    Outcomes,
    Rails,
    SendEmail,
    consumer_resource,
    email,
    eventually,
    running,
    topic_resource,
)
from tests.integration.test_runtime_dispatch import email_worker

pytestmark = pytest.mark.integration


@dataclass
class Bus:
    """What a scenario needs from either backend."""

    kind: str
    nc: Any
    outcomes: Outcomes
    apply: Callable[[Topic, Consumer | None], Awaitable[WorkerSettings | None]]
    publisher: Callable[[], Publisher]
    running: Callable[[Worker, WorkerSettings], contextlib.AbstractAsyncContextManager[Any]]
    advance: Callable[[float], Awaitable[None]]

    @property
    def js(self) -> Any:
        return self.nc.jetstream()

    async def stored(self, stream: str) -> int:
        return (await self.js.stream_info(stream)).state.messages

    async def settled(self, settings: WorkerSettings) -> None:
        async def empty() -> bool:
            info = await self.js.consumer_info(settings.stream, settings.consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(empty, f"consumer {settings.consumer} to have nothing left on the {self.kind} bus")


@contextlib.asynccontextmanager
async def memory_bus() -> AsyncIterator[Bus]:
    broker = InMemoryBroker(namespace=NAMESPACE)
    nc = broker.connection()
    outcomes = Outcomes()
    await nc.subscribe(f"eventrails.outcomes.{NAMESPACE}.>", cb=outcomes.on_message)

    async def apply(topic: Topic, consumer: Consumer | None) -> WorkerSettings | None:
        broker.add_topic(topic)
        if consumer is None:
            return None
        return broker.add_consumer(consumer, topic, publish_outcomes=True, drain_timeout=5.0)

    async def advance(seconds: float) -> None:
        broker.advance(seconds)

    yield Bus("memory", nc, outcomes, apply, broker.publisher, broker.running, advance)


@contextlib.asynccontextmanager
async def server_bus(rails: Rails) -> AsyncIterator[Bus]:
    async def apply(topic: Topic, consumer: Consumer | None) -> WorkerSettings | None:
        await rails.apply_topic(topic)
        return await rails.apply_consumer(consumer, topic) if consumer is not None else None

    yield Bus("nats", rails.nc, rails.outcomes, apply, rails.publisher, running, asyncio.sleep)


@pytest.fixture(params=["memory", "nats"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        async with memory_bus() as memory:
            yield memory
        return
    server = request.getfixturevalue("nats_server")
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    outcomes = Outcomes()
    await nc.subscribe(f"eventrails.outcomes.{NAMESPACE}.>", cb=outcomes.on_message)
    rails = Rails(server, nc, nc.jetstream(), BusConnection(servers=(server.url,)), outcomes)
    try:
        async with server_bus(rails) as real:
            yield real
    finally:
        await nc.close()


async def setup(bus: Bus, topic: dict[str, Any] | None = None, **consumer_spec: Any) -> WorkerSettings:
    settings = await bus.apply(
        topic_resource(**(topic or {})), consumer_resource(names=["send-email"], **consumer_spec)
    )
    assert settings is not None
    return settings


async def test_enqueue_handled_once(bus: Bus) -> None:
    settings = await setup(bus)
    seen: list[tuple[int, str, int]] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        seen.append((payload.emailId, ctx.msg_id, ctx.delivery))

    async with bus.running(email_worker(handle), settings):
        receipt = await bus.publisher().enqueue("orders", "send-email", email(4), dedupe_key="email-4")
        again = await bus.publisher().enqueue("orders", "send-email", email(4), dedupe_key="email-4")
        announced = await bus.outcomes.next()
        await bus.settled(settings)

    assert (receipt.stream, receipt.seq, receipt.duplicate) == ("shop_orders", 1, False)
    assert (again.seq, again.duplicate) == (1, True)
    assert (announced["outcome"], announced["msgId"], announced["streamSeq"]) == ("done", "email-4", 1)
    assert seen == [(4, "email-4", 1)]
    assert await bus.stored("shop_orders") == 0, "workqueue retention drops acknowledged messages"


async def test_retry_redelivers_with_delay(bus: Bus) -> None:
    settings = await setup(bus)
    deliveries: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    async def handle(payload: SendEmail, ctx: Context) -> Retry | None:
        deliveries.append((ctx.delivery, loop.time()))
        return Retry(0.5, "not yet") if ctx.delivery == 1 else None

    async with bus.running(email_worker(handle), settings):
        await bus.publisher().enqueue("orders", "send-email", email())
        announced = await bus.outcomes.until("done")

    assert [item["outcome"] for item in announced] == ["retry", "done"]
    assert [delivery for delivery, _ in deliveries] == [1, 2]
    assert deliveries[1][1] - deliveries[0][1] >= 0.4


async def test_failures_dead_letter_after_max_deliver(bus: Bus) -> None:
    settings = await setup(bus, backoff=["100ms"])  # maxDeliver 3

    async def handle(payload: SendEmail, ctx: Context) -> None:
        raise RuntimeError("smtp refused")

    async with bus.running(email_worker(handle), settings):
        await bus.publisher().enqueue("orders", "send-email", email(9), dedupe_key="email-9")
        announced = await bus.outcomes.until("dead_letter")

    assert [(item["outcome"], item["delivery"]) for item in announced] == [
        ("retry", 1), ("retry", 2), ("dead_letter", 3),
    ]
    [entry] = await DeadLetters(bus.nc, settings, "orders").list()
    assert (entry.reason, entry.error_type, entry.error) == ("handler failed on all 3 deliveries", "RuntimeError", "smtp refused")
    assert (entry.original_msg_id, entry.delivery, entry.original_seq) == ("email-9", 3, 1)
    assert json.loads(entry.data) == email(9)
    await bus.settled(settings)


async def test_poison_dead_lettered_at_once(bus: Bus) -> None:
    settings = await setup(bus)

    async def handle(payload: SendEmail, ctx: Context) -> None:
        raise AssertionError("poison must not reach the handler")

    async with bus.running(email_worker(handle), settings):
        await bus.js.publish("eventrails.shop.orders.send-email", b"[1]", headers={"Nats-Msg-Id": "poison"})
        [announced] = await bus.outcomes.until("dead_letter")

    assert (announced["delivery"], announced["reason"]) == (1, "payload is not a JSON object")
    assert await bus.stored("shop_orders_dlq") == 1


async def test_ack_wait_expiry_redelivers(bus: Bus) -> None:
    settings = await setup(bus, ackWait="1s")
    await bus.publisher().enqueue("orders", "send-email", email(), dedupe_key="email-1")
    # A worker takes the message and dies without settling it.
    subscription = await bus.js.pull_subscribe_bind(settings.consumer, stream=settings.stream)
    [lost] = await subscription.fetch(1, timeout=5)
    await subscription.unsubscribe()
    assert lost.metadata.num_delivered == 1
    info = await bus.js.consumer_info(settings.stream, settings.consumer)
    assert info.num_ack_pending == 1
    deliveries: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        deliveries.append(ctx.delivery)

    await bus.advance(1.2)
    async with bus.running(email_worker(handle), settings):
        announced = await bus.outcomes.next()
        await bus.settled(settings)

    assert (announced["outcome"], announced["delivery"]) == ("done", 2)
    assert deliveries == [2]


async def test_past_max_deliver_dead_lettered(bus: Bus) -> None:
    settings = await setup(bus, maxDeliver=2, backoff=["100ms"])  # the consumer allows one delivery more
    await bus.publisher().enqueue("orders", "send-email", email())
    subscription = await bus.js.pull_subscribe_bind(settings.consumer, stream=settings.stream)
    for _ in range(2):
        [msg] = await subscription.fetch(1, timeout=5)
        await msg.nak()
    await subscription.unsubscribe()

    async def handle(payload: SendEmail, ctx: Context) -> None:
        raise AssertionError("a message past maxDeliver must not reach the handler")

    async with bus.running(email_worker(handle), settings):
        [announced] = await bus.outcomes.until("dead_letter")
        await bus.settled(settings)

    assert announced["delivery"] == 3
    [entry] = await DeadLetters(bus.nc, settings, "orders").list()
    assert entry.error_type == "MaxDeliverExceeded"


async def test_heartbeat_keeps_slow_handler(bus: Bus) -> None:
    settings = await setup(bus, ackWait="1s")
    deliveries: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        deliveries.append(ctx.delivery)
        await asyncio.sleep(2.0)

    async with bus.running(email_worker(handle), settings):
        await bus.publisher().enqueue("orders", "send-email", email())
        announced = await bus.outcomes.next()

    assert announced["outcome"] == "done"
    assert deliveries == [1]
    assert (await bus.js.consumer_info(settings.stream, settings.consumer)).num_redelivered == 0


async def test_debounce_latest_wins(bus: Bus) -> None:
    settings = await setup(bus, topic={"delayedDelivery": True})
    handled: list[tuple[int, str]] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append((payload.emailId, ctx.msg_id))

    publisher = bus.publisher()
    async with bus.running(email_worker(handle), settings):
        receipts = [
            await publisher.enqueue("orders", "send-email", email(n), debounce=0.5, debounce_key="cart-1")
            for n in range(5)
        ]
        info = await bus.js.stream_info("shop_orders", subjects_filter="eventrails.sched.>")
        assert info.state.subjects == {"eventrails.sched.shop.orders.send-email.cart-1": 1}
        assert (await bus.outcomes.next())["outcome"] == "done"
        await bus.settled(settings)

    assert handled == [(4, receipts[-1].msg_id)]


async def test_schedules_need_delayed_delivery(bus: Bus) -> None:
    await setup(bus)
    with pytest.raises(ConfigurationError, match="set spec.delayedDelivery: true on Topic 'orders'"):
        await bus.publisher().enqueue("orders", "send-email", email(), delay=1)
    assert await bus.stored("shop_orders") == 0


async def test_contract_checked_before_sending(bus: Bus) -> None:
    await setup(bus)
    with pytest.raises(PayloadError, match="lacks required key"):
        await bus.publisher().enqueue("orders", "send-email", {"organizationId": "org_1"})
    with pytest.raises(PayloadError, match="is not declared by topic 'orders'"):
        await bus.publisher().enqueue("orders", "send-mail", email())
    assert await bus.stored("shop_orders") == 0


async def test_dead_letter_replayed(bus: Bus) -> None:
    settings = await setup(bus)
    attempts: list[str] = []

    async def handle(payload: SendEmail, ctx: Context) -> Any:
        attempts.append(ctx.msg_id)
        if len(attempts) == 1:
            from eventrails import DeadLetter

            return DeadLetter("address bounced")
        return None

    async with bus.running(email_worker(handle), settings):
        await bus.publisher().enqueue("orders", "send-email", email(), dedupe_key="email-1")
        assert (await bus.outcomes.next())["outcome"] == "dead_letter"
        dead = DeadLetters(bus.nc, settings, "orders")
        [entry] = await dead.list()
        replay = await dead.replay(entry.seq)
        assert (await bus.outcomes.next(timeout=WAIT))["outcome"] == "done"

    assert (replay.duplicate, replay.removed) == (False, True)
    assert attempts == ["email-1", f"email-1-replay-{entry.seq}"]
    assert await bus.stored("shop_orders_dlq") == 0
