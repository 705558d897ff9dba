"""Delayed and debounced tasks on a real nats-server: JetStream message schedules.

These tests pin down what the runtime relies on in nats-server itself: a newer schedule on
the same subject replaces the pending one, the scheduled copy lands on the task subject
when due, and the server drops ``Nats-Msg-Id`` from that copy.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from eventrails import ConfigurationError, Context, PayloadError
from eventrails._errors import translate
from tests.integration.test_runtime import (
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

SCHEDULES = "eventrails.sched.shop.orders.>"


async def setup(rails: Rails, **topic_spec: Any) -> Any:
    topic = topic_resource(delayedDelivery=True, **topic_spec)
    consumer = consumer_resource(names=["send-email"])
    await rails.apply_topic(topic)
    return await rails.apply_consumer(consumer, topic)


async def stored_on(rails: Rails, filter_subject: str) -> int:
    """Count the messages stored on subjects matching ``filter_subject`` in the orders stream."""
    info = await rails.js.stream_info("shop_orders", subjects_filter=filter_subject)
    return sum((info.state.subjects or {}).values())


async def test_delay_lands_on_task_subject_when_due(rails: Rails) -> None:
    settings = await setup(rails)
    handled: list[tuple[SendEmail, Context, datetime]] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append((payload, ctx, datetime.now(timezone.utc)))

    async with running(email_worker(handle), settings):
        receipt = await rails.publisher().enqueue("orders", "send-email", email(3), delay=timedelta(seconds=1))

        # Until it is due the task waits as a schedule message, invisible to the consumer.
        assert receipt.due is not None
        assert await stored_on(rails, SCHEDULES) == 1
        assert await stored_on(rails, "eventrails.shop.orders.send-email") == 0
        announced = await rails.outcomes.next()

    assert announced["outcome"] == "done"
    [(payload, ctx, handled_at)] = handled
    assert payload.emailId == 3
    assert handled_at >= receipt.due - timedelta(milliseconds=50), "handled before it was due"
    assert ctx.subject == "eventrails.shop.orders.send-email"
    # The server strips Nats-Msg-Id from the scheduled copy; the id travels in our own header.
    assert "Nats-Msg-Id" not in ctx.headers
    assert ctx.msg_id == receipt.msg_id == ctx.headers["Eventrails-Msg-Id"]
    assert announced["msgId"] == receipt.msg_id
    assert ctx.headers["Nats-Scheduler"] == f"eventrails.sched.shop.orders.send-email.{receipt.msg_id}"
    assert ctx.headers["Eventrails-Organization-Id"] == "org_1"
    # The schedule is purged once it fired.
    assert await stored_on(rails, SCHEDULES) == 0


async def test_debounce_runs_once_with_latest_payload(rails: Rails) -> None:
    settings = await setup(rails)
    handled: list[tuple[int, str]] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append((payload.emailId, ctx.msg_id))

    publisher = rails.publisher()
    async with running(email_worker(handle), settings):
        receipts = [
            await publisher.enqueue("orders", "send-email", email(email_id), debounce=1.0, debounce_key="customer-7")
            for email_id in range(10)
        ]
        # Each write replaced the pending one: one schedule is stored, on the entity's subject.
        assert await stored_on(rails, SCHEDULES) == 1
        last = await rails.js.get_last_msg("shop_orders", "eventrails.sched.shop.orders.send-email.customer-7")
        assert last.seq == receipts[-1].seq
        assert len({receipt.msg_id for receipt in receipts}) == 10

        first = await rails.outcomes.next()
        # Nothing else arrives for the burst; a write after the window runs again.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rails.outcomes.received.get(), 1.5)
        again = await publisher.enqueue("orders", "send-email", email(42), debounce=0.5, debounce_key="customer-7")
        second = await rails.outcomes.next()

    assert (first["outcome"], second["outcome"]) == ("done", "done")
    assert handled == [(9, receipts[-1].msg_id), (42, again.msg_id)]


async def test_debounce_keys_are_separate(rails: Rails) -> None:
    settings = await setup(rails)
    handled: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append(payload.emailId)

    publisher = rails.publisher()
    async with running(email_worker(handle), settings):
        # The dedupe key names the entity when no debounce key is given.
        for email_id, entity in [(1, "a"), (2, "b"), (3, "a"), (4, "b")]:
            await publisher.enqueue("orders", "send-email", email(email_id), dedupe_key=entity, debounce=0.5)
        assert await stored_on(rails, SCHEDULES) == 2
        await rails.outcomes.next()
        await rails.outcomes.next()

    assert sorted(handled) == [3, 4]


async def test_delay_with_dedupe_key_is_stored_once(rails: Rails) -> None:
    settings = await setup(rails)
    handled: list[str] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append(ctx.msg_id)

    publisher = rails.publisher()
    first = await publisher.enqueue("orders", "send-email", email(1), dedupe_key="welcome-1", delay=0.5)
    second = await publisher.enqueue("orders", "send-email", email(1), dedupe_key="welcome-1", delay=0.5)
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.seq == first.seq
    async with running(email_worker(handle), settings):
        assert (await rails.outcomes.next())["outcome"] == "done"

        async def empty() -> bool:
            info = await rails.js.consumer_info(settings.stream, settings.consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(empty, "the consumer to have nothing left")

    assert handled == ["welcome-1"]


async def test_schedule_needs_delayed_delivery(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()

    for option in ({"delay": 5}, {"debounce": 5, "debounce_key": "customer-1"}):
        with pytest.raises(ConfigurationError) as caught:
            await publisher.enqueue("orders", "send-email", email(), **option)
        assert "set spec.delayedDelivery: true on Topic 'orders'" in str(caught.value)
    assert await rails.stream_messages("shop_orders") == 0

    # A producer that skips the checks is refused by the server with the same advice.
    with pytest.raises(Exception) as refused:
        await rails.js.publish(
            "eventrails.shop.orders.charge-card", b"{}",
            headers={"Nats-Schedule": "@at 2030-01-01T00:00:00Z", "Nats-Schedule-Target": "eventrails.shop.orders.send-email"},
        )
    translated = translate(refused.value, "schedule send-email")
    assert isinstance(translated, ConfigurationError)
    assert "spec.delayedDelivery" in str(translated)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": 1, "debounce": 1, "debounce_key": "k"}, "got both delay and debounce"),
        ({"delay": -1}, "delay must be a positive number of seconds"),
        ({"delay": "5m"}, "delay must be seconds (a number) or a timedelta"),
        ({"debounce": 1}, "needs the entity it is keyed by"),
        ({"debounce_key": "k"}, "debounce_key without debounce"),
        ({"debounce": 1, "debounce_key": " "}, "debounce_key of 'send-email' must be a non-empty string"),
    ],
    ids=["both", "negative", "string", "no-key", "key-only", "blank-key"],
)
async def test_schedule_argument_errors(rails: Rails, options: dict[str, Any], message: str) -> None:
    await setup(rails)
    with pytest.raises(PayloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        await rails.publisher().enqueue("orders", "send-email", email(), **options)
    assert await rails.stream_messages("shop_orders") == 0


async def test_delayed_task_survives_server_restart(rails: Rails) -> None:
    settings = await setup(rails)
    receipt = await rails.publisher().enqueue("orders", "send-email", email(8), delay=1.0)
    rails.server.stop()
    rails.server.start()
    handled: list[str] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append(ctx.msg_id)

    async def reconnected() -> bool:
        return rails.nc.is_connected

    await eventually(reconnected, "the test client to reconnect")
    async with running(email_worker(handle), settings):
        assert (await rails.outcomes.next(timeout=WAIT))["outcome"] == "done"

    assert handled == [receipt.msg_id]
