"""The dispatcher against a real nats-server: outcomes, retries with backoff, dead letters, poison
input, heartbeats, handler timeouts, draining, a missing consumer and a NATS restart."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from nats.js.api import RawStreamMsg

from eventrails import ConfigurationError, Context, DeadLetter, Retry, Skip, Worker
from eventrails._connect import connect
from eventrails._dispatcher import Dispatcher
from tests.integration.test_runtime import (
    WAIT,
    Rails,
    SendEmail,
    consumer_resource,
    email,
    rails,
    eventually,
    running,
    topic_resource,
)

pytestmark = pytest.mark.integration


def email_worker(handle: Any) -> Worker:
    """A worker whose send-email handler is ``handle``; the other names are never published here."""
    worker = Worker()
    worker.task("send-email")(handle)

    async def untouched(payload: dict[str, Any], ctx: Context) -> None:
        raise AssertionError(f"{ctx.name} is not published in these tests")

    worker.task("charge-card")(untouched)
    worker.task("refresh-cache")(untouched)
    return worker


async def setup(rails: Rails, **consumer_spec: Any) -> Any:
    topic, consumer = topic_resource(), consumer_resource(**consumer_spec)
    await rails.apply_topic(topic)
    return await rails.apply_consumer(consumer, topic)


async def dead_letter(rails: Rails, seq: int = 1) -> RawStreamMsg:
    async def stored() -> bool:
        return await rails.stream_messages("shop_orders_dlq") >= seq

    await eventually(stored, f"dead letter {seq} to be stored")
    return await rails.js.get_msg("shop_orders_dlq", seq)


async def queue_is_empty(rails: Rails, settings: Any) -> None:
    async def settled() -> bool:
        info = await rails.js.consumer_info(settings.stream, settings.consumer)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, "every message to be acknowledged")
    assert await rails.stream_messages("shop_orders") == 0


async def test_retry_naks_with_delay(rails: Rails) -> None:
    settings = await setup(rails)
    loop = asyncio.get_running_loop()
    calls: list[tuple[int, float]] = []

    async def handle(payload: SendEmail, ctx: Context) -> Retry | None:
        calls.append((ctx.delivery, loop.time()))
        return Retry(1.0, "mail server busy") if ctx.delivery == 1 else None

    async with running(email_worker(handle), settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        announced = await rails.outcomes.until("done")

    assert [item["outcome"] for item in announced] == ["retry", "done"]
    assert announced[0]["reason"] == "mail server busy"
    assert [delivery for delivery, _ in calls] == [1, 2]
    assert calls[1][1] - calls[0][1] >= 0.8, "redelivered before the requested delay"
    await queue_is_empty(rails, settings)


async def test_exception_backoff_then_dead_letter(rails: Rails) -> None:
    settings = await setup(rails)  # maxDeliver 3, backoff 500ms then 1s
    loop = asyncio.get_running_loop()
    calls: list[float] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        calls.append(loop.time())
        raise RuntimeError(f"smtp refused email {payload.emailId}")

    async with running(email_worker(handle), settings):
        receipt = await rails.publisher().enqueue("orders", "send-email", email(5), dedupe_key="email-5")
        announced = await rails.outcomes.until("dead_letter")

    assert [(item["outcome"], item["delivery"]) for item in announced] == [
        ("retry", 1), ("retry", 2), ("dead_letter", 3),
    ]
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.4, "second delivery came before the first backoff entry"
    assert calls[2] - calls[1] >= 0.8, "third delivery came before the second backoff entry"

    dead = await dead_letter(rails)
    headers = dead.headers or {}
    assert dead.subject == "eventrails.dlq.shop.orders.send-email"
    assert json.loads(dead.data or b"") == email(5)
    assert headers["Eventrails-Dlq-Reason"] == "handler failed on all 3 deliveries"
    assert headers["Eventrails-Dlq-Error-Type"] == "RuntimeError"
    assert headers["Eventrails-Dlq-Error"] == "smtp refused email 5"
    assert headers["Eventrails-Original-Subject"] == "eventrails.shop.orders.send-email"
    assert headers["Eventrails-Original-Msg-Id"] == "email-5"
    assert headers["Eventrails-Stream-Seq"] == str(receipt.seq)
    assert headers["Eventrails-Delivery"] == "3"
    assert headers["Eventrails-Organization-Id"] == "org_1", "the original headers travel along"
    assert headers["Nats-Msg-Id"] == f"shop_orders-{receipt.seq}-dlq"
    await queue_is_empty(rails, settings)


@pytest.mark.parametrize(
    ("data", "reason", "error_type"),
    [
        (b"{not json", "payload is not valid JSON", "JSONDecodeError"),
        (b'["org_1", "prj_1"]', "payload is not a JSON object", "PayloadError"),
        (json.dumps({"organizationId": "org_1", "emailId": 1}).encode(), "payload lacks required key(s) projectId",
         "PayloadError"),
        (json.dumps(email(emailId="not-a-number")).encode(), "payload does not match SendEmail", "ValidationError"),
    ],
    ids=["bad-json", "not-an-object", "missing-tenancy-key", "failed-validation"],
)
async def test_poison_payload_dead_lettered(
    rails: Rails, data: bytes, reason: str, error_type: str
) -> None:
    settings = await setup(rails)
    calls: list[Any] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        calls.append(payload)

    async with running(email_worker(handle), settings):
        # Straight onto the subject, as a producer that skips the publisher's checks would.
        await rails.js.publish("eventrails.shop.orders.send-email", data, headers={"Nats-Msg-Id": "poison-1"})
        [announced] = await rails.outcomes.until("dead_letter")

    assert calls == []
    assert announced["delivery"] == 1
    assert announced["reason"] == reason
    dead = await dead_letter(rails)
    headers = dead.headers or {}
    assert dead.data == data
    assert headers["Eventrails-Dlq-Reason"] == reason
    assert headers["Eventrails-Dlq-Error-Type"] == error_type
    assert headers["Eventrails-Dlq-Error"]
    assert headers["Eventrails-Delivery"] == "1"
    assert headers["Eventrails-Original-Msg-Id"] == "poison-1"
    await queue_is_empty(rails, settings)


async def test_skip_acks_with_reason(rails: Rails, caplog: pytest.LogCaptureFixture) -> None:
    settings = await setup(rails)

    async def handle(payload: SendEmail, ctx: Context) -> Skip:
        raise Skip(f"email {payload.emailId} was already sent")

    caplog.set_level(logging.INFO, logger="eventrails.dispatcher")
    async with running(email_worker(handle), settings) as dispatcher:
        await rails.publisher().enqueue("orders", "send-email", email(3))
        announced = await rails.outcomes.next()

    assert (announced["outcome"], announced["reason"]) == ("skip", "email 3 was already sent")
    assert "skipped (email 3 was already sent); acknowledged" in caplog.text
    assert 'eventrails_outcomes_total{name="send-email",outcome="skip",topic="orders"} 1.0' in (
        dispatcher.metrics.render().decode()
    )
    await queue_is_empty(rails, settings)
    assert await rails.stream_messages("shop_orders_dlq") == 0


async def test_dead_letter_outcome(rails: Rails) -> None:
    settings = await setup(rails)

    async def handle(payload: SendEmail, ctx: Context) -> DeadLetter:
        return DeadLetter("recipient address is malformed")

    async with running(email_worker(handle), settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        [announced] = await rails.outcomes.until("dead_letter")

    assert announced["delivery"] == 1
    headers = (await dead_letter(rails)).headers or {}
    assert headers["Eventrails-Dlq-Reason"] == "recipient address is malformed"
    assert headers["Eventrails-Dlq-Error-Type"] == "DeadLetter"
    await queue_is_empty(rails, settings)


async def test_delivery_past_max_deliver(rails: Rails) -> None:
    settings = await setup(rails, maxDeliver=2, backoff=["100ms"])  # the server delivers up to 3 times
    await rails.publisher().enqueue("orders", "send-email", email())
    # Two deliveries that end without an ack, as from workers that died mid-handler.
    subscription = await rails.js.pull_subscribe_bind(settings.consumer, stream=settings.stream)
    for _ in range(2):
        [msg] = await subscription.fetch(1, timeout=5)
        await msg.nak()
    await subscription.unsubscribe()
    calls: list[Any] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        calls.append(payload)

    async with running(email_worker(handle), settings):
        [announced] = await rails.outcomes.until("dead_letter")

    assert calls == []
    assert announced["delivery"] == 3
    headers = (await dead_letter(rails)).headers or {}
    assert headers["Eventrails-Dlq-Error-Type"] == "MaxDeliverExceeded"
    assert headers["Eventrails-Dlq-Reason"] == "delivered 3 times, more than maxDeliver 2"
    await queue_is_empty(rails, settings)


async def test_heartbeat_prevents_redelivery(rails: Rails) -> None:
    settings = await setup(rails, ackWait="1s")
    deliveries: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        deliveries.append(ctx.delivery)
        await asyncio.sleep(3.0)

    async with running(email_worker(handle), settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        announced = await rails.outcomes.next(timeout=10)

    assert announced["outcome"] == "done"
    assert deliveries == [1]
    info = await rails.js.consumer_info(settings.stream, settings.consumer)
    assert info.num_redelivered == 0


async def test_drain_finishes_in_flight(rails: Rails) -> None:
    settings = await setup(rails)
    started = asyncio.Event()
    finished: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        started.set()
        await asyncio.sleep(1.0)
        finished.append(payload.emailId)

    async with running(email_worker(handle), settings) as dispatcher:
        await rails.publisher().enqueue("orders", "send-email", email(11))
        await asyncio.wait_for(started.wait(), WAIT)
        dispatcher.stop()
        assert dispatcher.readiness() == (False, "draining")

    assert finished == [11]
    await queue_is_empty(rails, settings)


async def test_drain_timeout_naks_handler(rails: Rails) -> None:
    settings = (await setup(rails, ackWait="60s")).model_copy(update={"drain_timeout": 0.3})
    started = asyncio.Event()
    deliveries: list[int] = []

    async def stuck(payload: SendEmail, ctx: Context) -> None:
        deliveries.append(ctx.delivery)
        started.set()
        await asyncio.sleep(60)

    async with running(email_worker(stuck), settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        await asyncio.wait_for(started.wait(), WAIT)

    # The nak makes it available again at once, long before the 60s ack wait.
    async def quick(payload: SendEmail, ctx: Context) -> None:
        deliveries.append(ctx.delivery)

    async with running(email_worker(quick), settings):
        announced = await rails.outcomes.next()

    assert announced["outcome"] == "done"
    assert deliveries == [1, 2]


async def test_missing_consumer_not_ready(
    rails: Rails, caplog: pytest.LogCaptureFixture
) -> None:
    topic, consumer = topic_resource(), consumer_resource()
    await rails.apply_topic(topic)
    settings = rails.worker_settings(consumer, topic)
    handled: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append(payload.emailId)

    caplog.set_level(logging.WARNING, logger="eventrails.dispatcher")
    async with running(email_worker(handle), settings, wait_ready=False) as dispatcher:
        async def reported() -> bool:
            return "consumer orders-worker on stream shop_orders does not exist yet" in caplog.text

        await eventually(reported, "the missing consumer to be logged")
        assert dispatcher.readiness() == (False, "consumer orders-worker on stream shop_orders does not exist")

        await rails.apply_consumer(consumer, topic)

        async def ready() -> bool:
            return dispatcher.ready

        await eventually(ready, "the dispatcher to bind once the consumer exists")
        await rails.publisher().enqueue("orders", "send-email", email(21))
        assert (await rails.outcomes.next())["outcome"] == "done"

    assert handled == [21]


async def test_missing_handler_fails_start(rails: Rails) -> None:
    settings = await setup(rails)
    worker = Worker()

    @worker.task("send-email")
    async def handle(payload: SendEmail, ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError) as caught:
        async with running(worker, settings):
            pass

    message = str(caught.value)
    assert "no handler for ['charge-card', 'refresh-cache']" in message
    assert "consumer orders-worker receives from topic 'orders'" in message


async def test_dispatcher_survives_nats_restart(rails: Rails) -> None:
    settings = await setup(rails)
    handled: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append(payload.emailId)

    async with running(email_worker(handle), settings) as dispatcher:
        await rails.publisher().enqueue("orders", "send-email", email(1))
        assert (await rails.outcomes.next())["outcome"] == "done"

        rails.server.stop()

        async def lost() -> bool:
            return not dispatcher.ready

        await eventually(lost, "readiness to fail while NATS is down")
        rails.server.start()

        async def back() -> bool:
            return dispatcher.ready and rails.nc.is_connected

        await eventually(back, "the dispatcher and the test client to reconnect")
        await rails.publisher().enqueue("orders", "send-email", email(2))
        assert (await rails.outcomes.next(timeout=20))["outcome"] == "done"

    assert handled == [1, 2]


async def test_dispatcher_rebinds_recreated_consumer(rails: Rails) -> None:
    topic, consumer = topic_resource(), consumer_resource()
    settings = await setup(rails)
    handled: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        handled.append(payload.emailId)

    async with running(email_worker(handle), settings) as dispatcher:
        await rails.js.delete_consumer(settings.stream, settings.consumer)

        async def unbound() -> bool:
            return dispatcher.readiness() == (False, "consumer orders-worker on stream shop_orders does not exist")

        await eventually(unbound, "readiness to report the deleted consumer")
        await rails.apply_consumer(consumer, topic)

        async def bound() -> bool:
            return dispatcher.ready

        await eventually(bound, "the dispatcher to bind the recreated consumer")
        await rails.publisher().enqueue("orders", "send-email", email(31))
        assert (await rails.outcomes.next())["outcome"] == "done"

    assert handled == [31]


async def test_retry_past_max_deliver(rails: Rails) -> None:
    settings = await setup(rails, backoff=["100ms"])

    async def handle(payload: SendEmail, ctx: Context) -> Retry:
        return Retry(reason="tracking service keeps timing out")

    async with running(email_worker(handle), settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        announced = await rails.outcomes.until("dead_letter")

    assert [item["outcome"] for item in announced] == ["retry", "retry", "dead_letter"]
    headers = (await dead_letter(rails)).headers or {}
    assert headers["Eventrails-Dlq-Error-Type"] == "RetriesExhausted"
    assert headers["Eventrails-Dlq-Error"] == "tracking service keeps timing out"
    await queue_is_empty(rails, settings)


async def test_no_dead_letter_stream_terminates(
    rails: Rails, caplog: pytest.LogCaptureFixture
) -> None:
    topic, consumer = topic_resource(deadLetter={"enabled": False}), consumer_resource()
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    assert settings.dead_letter is False

    async def handle(payload: SendEmail, ctx: Context) -> DeadLetter:
        return DeadLetter("recipient unsubscribed")

    caplog.set_level(logging.WARNING, logger="eventrails.dispatcher")
    async with running(email_worker(handle), settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        [announced] = await rails.outcomes.until("dead_letter")

        async def settled() -> bool:
            info = await rails.js.consumer_info(settings.stream, settings.consumer)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled, "the terminated message to leave the consumer")

    assert announced["delivery"] == 1
    assert "terminated without a dead-letter copy" in caplog.text
    assert "recipient unsubscribed" in caplog.text


async def test_concurrency_limit(rails: Rails) -> None:
    settings = (await setup(rails)).model_copy(update={"concurrency": 2})
    running_now = 0
    max_running = 0
    handled: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        nonlocal running_now, max_running
        running_now += 1
        max_running = max(max_running, running_now)
        await asyncio.sleep(0.2)
        running_now -= 1
        handled.append(payload.emailId)

    publisher = rails.publisher()
    for email_id in range(6):
        await publisher.enqueue("orders", "send-email", email(email_id))
    async with running(email_worker(handle), settings):
        for _ in range(6):
            assert (await rails.outcomes.next())["outcome"] == "done"

    assert sorted(handled) == list(range(6))
    assert max_running == 2


async def test_handler_timeout_retries_then_succeeds(rails: Rails) -> None:
    settings = await setup(rails)  # ackWait 10s, backoff 500ms then 1s
    deliveries: list[int] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        deliveries.append(ctx.delivery)
        if ctx.delivery == 1:
            await asyncio.sleep(30)

    worker = Worker()
    worker.task("send-email", timeout=0.5)(handle)
    for name in ("charge-card", "refresh-cache"):
        worker.task(name)(handle)
    async with running(worker, settings):
        await rails.publisher().enqueue("orders", "send-email", email())
        announced = await rails.outcomes.until("done")

    assert [item["outcome"] for item in announced] == ["retry", "done"]
    assert "0.5s timeout" in announced[0]["reason"]
    assert deliveries == [1, 2]


async def test_handler_timeout_must_be_below_ack_wait(rails: Rails) -> None:
    settings = await setup(rails)  # ackWait 10s

    async def handle(payload: SendEmail, ctx: Context) -> None:
        return None

    worker = Worker()
    worker.task("send-email", timeout=10)(handle)
    for name in ("charge-card", "refresh-cache"):
        worker.task(name)(handle)
    nc = await connect(settings, name="test-worker", deadline=10)
    try:
        dispatcher = Dispatcher(worker, settings, nc, fetch_timeout=0.5)
        with pytest.raises(ConfigurationError) as caught:
            await asyncio.wait_for(dispatcher.run(), 20)
    finally:
        await nc.close()
    assert "send-email (10s)" in str(caught.value)
    assert "below ackWait (10s)" in str(caught.value)


def test_handler_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="timeout of task 'send-email' is 0"):
        Worker().task("send-email", timeout=0)
