"""The in-memory broker's clock: a test jumps past long delays, backoffs and ack waits without sleeping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eventrails import Context, Retry, Worker
from eventrails._manifests import parse_resource
from eventrails._resources import API_VERSION, Consumer, Topic
from eventrails.testing import InMemoryBroker, subject_matches


def topic(**spec: Any) -> Topic:
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"tasks": ["send-email"], "payload": {"requiredKeys": []}, **spec}}
    resource = parse_resource(body)
    assert isinstance(resource, Topic)
    return resource


def consumer(**spec: Any) -> Consumer:
    body = {"apiVersion": API_VERSION, "kind": "Consumer", "metadata": {"name": "mailer", "namespace": "shop"},
            "spec": {"topic": "orders", "handler": "app:worker", **spec}}
    resource = parse_resource(body)
    assert isinstance(resource, Consumer)
    return resource


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [("a.*.c", "a.b.c", True), ("a.>", "a.b.c", True), ("a.>", "a", False), ("a.*", "a.b.c", False), ("a.b", "a.b", True)],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


async def test_advance_fires_a_long_delay() -> None:
    broker = InMemoryBroker(namespace="shop")
    broker.add_topic(topic(delayedDelivery=True))
    settings = broker.add_consumer(consumer(), topic(delayedDelivery=True))
    handled: list[str] = []
    worker = Worker()

    @worker.task("send-email")
    async def send(payload: dict[str, Any], ctx: Context) -> None:
        handled.append(ctx.msg_id)

    receipt = await broker.publisher().enqueue("orders", "send-email", {"to": "a@example.com"}, delay=3600)
    assert [message.subject for message in broker.messages("orders", schedules=True)] == [
        f"eventrails.sched.shop.orders.send-email.{receipt.msg_id}"
    ]
    assert broker.messages("orders") == []

    broker.advance(3600)
    async with broker.running(worker, settings):
        await broker.wait_idle(settings, timeout=5)

    assert handled == [receipt.msg_id]


async def test_advance_skips_a_long_backoff() -> None:
    broker = InMemoryBroker(namespace="shop")
    broker.add_topic(topic())
    settings = broker.add_consumer(consumer(backoff=["10m"], maxDeliver=3), topic())
    deliveries: list[int] = []
    worker = Worker()

    @worker.task("send-email")
    async def send(payload: dict[str, Any], ctx: Context) -> Retry | None:
        deliveries.append(ctx.delivery)
        return Retry(reason="mail server busy") if ctx.delivery == 1 else None

    await broker.publisher().enqueue("orders", "send-email", {"to": "a@example.com"})
    async with broker.running(worker, settings):
        for _ in range(100):
            if deliveries:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert broker.consumer_info(settings.stream, settings.consumer).num_ack_pending == 1
        broker.advance(600)
        await broker.wait_idle(settings, timeout=5)

    assert deliveries == [1, 2]
    assert broker.messages("orders") == []


async def test_wait_idle_names_what_is_left() -> None:
    broker = InMemoryBroker(namespace="shop")
    broker.add_topic(topic())
    settings = broker.add_consumer(consumer(), topic())
    await broker.publisher().enqueue("orders", "send-email", {"to": "a@example.com"})

    with pytest.raises(TimeoutError, match="consumer mailer still has 1 pending"):
        await broker.wait_idle(settings, timeout=0.1)
