"""The runtime against a real nats-server: publishing, and the helpers the other runtime suites share.

Streams and consumers come from the reconcile core, exactly as the operator and local mode
create them, so these tests exercise the contract the two sides share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from pydantic import BaseModel

from eventrails import (
    Context,
    JetStreamNotFound,
    NatsSettings,
    NatsUnavailable,
    PayloadError,
    Publisher,
    Worker,
    WorkerSettings,
)
from eventrails._connect import connect
from eventrails._dispatcher import Dispatcher
from eventrails._manifests import parse_resource
from eventrails._natsserver import NatsServer
from eventrails._resources import API_VERSION, Consumer, Topic
from eventrails_operator._desired import BusConnection, worker_settings
from eventrails_operator._reconcile import reconcile_consumer, reconcile_topic

pytestmark = pytest.mark.integration

NAMESPACE = "shop"
TASKS = ["send-email", "charge-card", "refresh-cache"]
WAIT = 15.0


# --- shared helpers ----------------------------------------------------------------------------


class SendEmail(BaseModel):
    """The payload model of the send-email handlers in these tests."""

    organizationId: str
    projectId: str
    emailId: int


def topic_resource(name: str = "orders", **spec: Any) -> Topic:
    spec.setdefault("tasks", TASKS)
    spec.setdefault("payload", {"exempt": ["refresh-cache"]})
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
    resource = parse_resource(body)
    assert isinstance(resource, Topic)
    return resource


def consumer_resource(name: str = "orders-worker", topic: str = "orders", **spec: Any) -> Consumer:
    spec = {"topic": topic, "handler": "tests.integration.handlers:worker", "maxDeliver": 3,
            "backoff": ["500ms", "1s"], "ackWait": "10s", **spec}
    body = {"apiVersion": API_VERSION, "kind": "Consumer", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
    resource = parse_resource(body)
    assert isinstance(resource, Consumer)
    return resource


async def eventually(check: Callable[[], Awaitable[bool]], description: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it is true, and fail naming ``description`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {description}")


@dataclass
class Outcomes:
    """Collects the outcome announcements workers publish on core NATS."""

    received: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    async def on_message(self, msg: Msg) -> None:
        await self.received.put(json.loads(msg.data))

    async def next(self, timeout: float = WAIT) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.received.get(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"no outcome announced within {timeout:.0f}s")

    async def until(self, outcome: str, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Return every announcement up to and including the first with ``outcome``."""
        seen: list[dict[str, Any]] = []
        while True:
            seen.append(await self.next(timeout))
            if seen[-1]["outcome"] == outcome:
                return seen


@dataclass
class Rails:
    """A nats-server with the test's topics and consumers, and a client connection to it."""

    server: NatsServer
    nc: NATS
    js: JetStreamContext
    bus: BusConnection
    outcomes: Outcomes

    @property
    def settings(self) -> NatsSettings:
        return NatsSettings(nats_servers=[self.server.url], namespace=NAMESPACE)

    async def apply_topic(self, topic: Topic) -> None:
        result = await reconcile_topic(self.js, topic, self.bus)
        assert result.error is None, result.error

    async def apply_consumer(self, consumer: Consumer, topic: Topic, **overrides: Any) -> WorkerSettings:
        result = await reconcile_consumer(self.js, consumer, topic, bus=self.bus)
        assert result.error is None, result.error
        return self.worker_settings(consumer, topic, **overrides)

    def worker_settings(self, consumer: Consumer, topic: Topic, **overrides: Any) -> WorkerSettings:
        values = {"health_port": 0, "health_host": "127.0.0.1", "publish_outcomes": True, "drain_timeout": 5.0}
        return worker_settings(consumer, topic, self.bus).model_copy(update={**values, **overrides})

    def publisher(self) -> Publisher:
        return Publisher(self.nc, self.settings)

    async def stream_messages(self, stream: str) -> int:
        return (await self.js.stream_info(stream)).state.messages


@pytest.fixture()
async def rails(nats_server: NatsServer) -> AsyncIterator[Rails]:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    outcomes = Outcomes()
    await nc.subscribe(f"eventrails.outcomes.{NAMESPACE}.>", cb=outcomes.on_message)
    try:
        yield Rails(nats_server, nc, nc.jetstream(), BusConnection(servers=(nats_server.url,)), outcomes)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(worker: Worker, settings: WorkerSettings, *, wait_ready: bool = True) -> AsyncIterator[Dispatcher]:
    """Run a dispatcher as a task on its own connection, as a worker process would; stop and drain it on exit."""
    nc = await connect(settings, name="test-worker", deadline=10)
    dispatcher = Dispatcher(worker, settings, nc, fetch_timeout=0.5)
    task = asyncio.create_task(dispatcher.run())
    try:
        if wait_ready:
            async def bound() -> bool:
                if task.done():
                    task.result()
                return dispatcher.ready

            await eventually(bound, "the dispatcher to bind its consumer")
        yield dispatcher
    finally:
        dispatcher.stop()
        try:
            await asyncio.wait_for(task, WAIT)
        finally:
            await nc.close()


def email(email_id: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"organizationId": "org_1", "projectId": "prj_1", "emailId": email_id, **overrides}


# --- publishing ----------------------------------------------------------------------------------


async def test_enqueue_handle_ack(rails: Rails, caplog: pytest.LogCaptureFixture) -> None:
    topic, consumer = topic_resource(), consumer_resource()
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    seen: list[tuple[SendEmail, Context]] = []
    worker = Worker()

    @worker.task("send-email")
    async def send_email(payload: SendEmail, ctx: Context) -> None:
        seen.append((payload, ctx))
        ctx.logger.info("sending email %s", payload.emailId)

    @worker.task("charge-card")
    @worker.task("refresh-cache")
    async def unused(payload: dict[str, Any], ctx: Context) -> None:
        raise AssertionError("not published in this test")

    caplog.set_level(logging.INFO, logger="eventrails.handler")
    async with running(worker, settings):
        receipt = await rails.publisher().enqueue("orders", "send-email", SendEmail(**email(42)))
        announced = await rails.outcomes.next()

        async def all_acknowledged() -> bool:
            info = await rails.js.consumer_info(settings.stream, settings.consumer)
            return info.ack_floor is not None and info.ack_floor.stream_seq == receipt.seq

        await eventually(all_acknowledged, "the consumer's ack floor to reach the message")

    info = await rails.js.consumer_info(settings.stream, settings.consumer)
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
    assert await rails.stream_messages("shop_orders") == 0, "workqueue retention removes acknowledged messages"
    assert receipt.stream == "shop_orders"
    assert not receipt.duplicate

    [(payload, ctx)] = seen
    assert payload == SendEmail(**email(42))
    assert (ctx.msg_id, ctx.name, ctx.topic, ctx.stream_seq, ctx.delivery) == (
        receipt.msg_id, "send-email", "orders", receipt.seq, 1,
    )
    assert ctx.subject == "eventrails.shop.orders.send-email"
    assert ctx.headers["Nats-Msg-Id"] == receipt.msg_id
    assert ctx.headers["Eventrails-Name"] == "send-email"
    assert ctx.headers["Eventrails-Organization-Id"] == "org_1"
    assert ctx.headers["Eventrails-Project-Id"] == "prj_1"
    assert "Eventrails-Published-At" in ctx.headers
    [record] = [record for record in caplog.records if record.name == "eventrails.handler"]
    assert record.getMessage() == f"orders/send-email msg={receipt.msg_id} seq={receipt.seq} delivery=1: sending email 42"
    assert announced == {
        "msgId": receipt.msg_id, "topic": "orders", "name": "send-email", "outcome": "done", "reason": "",
        "delivery": 1, "streamSeq": receipt.seq,
    }


async def test_publish_event_handled(rails: Rails) -> None:
    topic = topic_resource("domain-events", tasks=None, events=["InvoicePaid", "InvoiceVoided"], payload={})
    consumer = consumer_resource("billing-projector", topic="domain-events", names=["InvoicePaid"])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    seen: list[dict[str, Any]] = []
    worker = Worker()

    @worker.event("InvoicePaid")
    async def invoice_paid(payload: dict[str, Any], ctx: Context) -> None:
        seen.append(payload)

    async with running(worker, settings):
        receipt = await rails.publisher().publish_event(
            "InvoicePaid", {"organizationId": "org_1", "projectId": "prj_1", "invoiceId": "inv_9"}
        )
        announced = await rails.outcomes.next()

    assert receipt.stream == "shop_domain-events"
    assert announced["outcome"] == "done"
    assert announced["msgId"] == receipt.msg_id
    assert seen == [{"organizationId": "org_1", "projectId": "prj_1", "invoiceId": "inv_9"}]


async def test_enqueue_dedupe_key_duplicate(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()

    first = await publisher.enqueue("orders", "send-email", email(7), dedupe_key="email-7")
    second = await publisher.enqueue("orders", "send-email", email(7), dedupe_key="email-7")
    other = await publisher.enqueue("orders", "send-email", email(8), dedupe_key="email-8")

    assert (first.duplicate, second.duplicate, other.duplicate) == (False, True, False)
    assert second.seq == first.seq
    assert second.msg_id == "email-7"
    assert first.msg_id == "email-7"
    assert await rails.stream_messages("shop_orders") == 2


async def test_enqueue_unknown_name(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())

    with pytest.raises(PayloadError) as caught:
        await rails.publisher().enqueue("orders", "send-mail", email())

    message = str(caught.value)
    assert "'send-mail' is not declared by topic 'orders'" in message
    assert str(TASKS) in message
    assert await rails.stream_messages("shop_orders") == 0


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"organizationId": "org_1", "emailId": 1}, "projectId"),
        ({"organizationId": "", "projectId": "prj_1", "emailId": 1}, "organizationId"),
    ],
    ids=["missing", "empty"],
)
async def test_enqueue_missing_tenancy_key(rails: Rails, payload: dict[str, Any], key: str) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()

    with pytest.raises(PayloadError) as caught:
        await publisher.enqueue("orders", "send-email", payload)

    assert repr(key) in str(caught.value)
    assert "spec.payload.exempt" in str(caught.value)
    assert await rails.stream_messages("shop_orders") == 0
    # The exempt name goes through without tenancy keys.
    receipt = await publisher.enqueue("orders", "refresh-cache", {"cacheKey": "prices"})
    assert receipt.seq == 1


async def test_publish_wrong_topic_kind(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()

    with pytest.raises(PayloadError, match="carries tasks, not domain events; send 'send-email' with enqueue"):
        await publisher.publish_event("send-email", email(), topic="orders")
    with pytest.raises(JetStreamNotFound, match="topic 'domain-events' not found: stream shop_domain-events"):
        await publisher.publish_event("InvoicePaid", email())


async def test_publish_without_puback_fails(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = Publisher(rails.nc, rails.settings, publish_deadline=1.0, attempt_timeout=0.3)
    await publisher.enqueue("orders", "send-email", email(1))  # reads and caches the contract

    rails.server.stop()

    async def disconnected() -> bool:
        return not rails.nc.is_connected

    await eventually(disconnected, "the client to notice the server is gone")
    try:
        with pytest.raises(NatsUnavailable, match="publish send-email .* to eventrails.shop.orders.send-email"):
            await publisher.enqueue("orders", "send-email", email(2), dedupe_key="email-2")
    finally:
        rails.server.start()

    async def reconnected() -> bool:
        return rails.nc.is_connected

    await eventually(reconnected, "the client to reconnect")
    receipt = await publisher.enqueue("orders", "send-email", email(2), dedupe_key="email-2")
    assert receipt.seq == 2
    assert not receipt.duplicate


async def test_publisher_connect_and_close(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())

    async with await Publisher.connect(rails.settings) as publisher:
        receipt = await publisher.enqueue("orders", "refresh-cache", {"cacheKey": "prices"})

    assert receipt.seq == 1
    with pytest.raises(NatsUnavailable):
        await publisher.enqueue("orders", "refresh-cache", {"cacheKey": "prices"})
