"""Pipelined publishing (enqueue_many, concurrent enqueue) and the dispatcher's counts, on a real nats-server."""

from __future__ import annotations

import asyncio
import re

import nats
import pytest

from eventrails import Context, PayloadError, Publisher, Worker
from eventrails._publisher import PublishIncomplete
from tests.integration.test_runtime import (
    WAIT,
    Rails,
    consumer_resource,
    email,
    eventually,
    rails,  # noqa: F401 - the fixture
    running,
    topic_resource,
)

pytestmark = pytest.mark.integration


async def test_enqueue_many_returns_a_receipt_per_message(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    receipts = await rails.publisher().enqueue_many("orders", "send-email", [email(i) for i in range(50)], max_pending=8)

    assert [receipt.seq for receipt in receipts] == list(range(1, 51))
    assert len({receipt.msg_id for receipt in receipts}) == 50
    assert not any(receipt.duplicate for receipt in receipts)
    assert await rails.stream_messages("shop_orders") == 50
    stored = await rails.js.get_msg("shop_orders", 7)
    headers = stored.headers or {}
    assert headers["Nats-Msg-Id"] == receipts[6].msg_id
    assert headers["Eventrails-Organization-Id"] == "org_1"
    assert stored.data == b'{"organizationId":"org_1","projectId":"prj_1","emailId":6}'


async def test_enqueue_many_dedupes_by_key(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()
    first = await publisher.enqueue_many(
        "orders", "send-email", [email(1), email(2), email(1)], dedupe_keys=["email-1", "email-2", "email-1"]
    )
    assert [(receipt.seq, receipt.duplicate) for receipt in first] == [(1, False), (2, False), (1, True)]

    again = await publisher.enqueue_many("orders", "send-email", [email(1), email(2)], dedupe_keys=["email-1", None])
    assert (again[0].seq, again[0].duplicate) == (1, True)
    assert (again[1].seq, again[1].duplicate) == (3, False)
    assert await rails.stream_messages("shop_orders") == 3


async def test_enqueue_many_checks_every_payload_before_sending(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()
    payloads = [email(1), email(2), {"projectId": "prj_1", "emailId": 3}]
    with pytest.raises(PayloadError, match="organizationId"):
        await publisher.enqueue_many("orders", "send-email", payloads)
    with pytest.raises(PayloadError, match="2 payloads but 1 dedupe keys"):
        await publisher.enqueue_many("orders", "send-email", [email(1), email(2)], dedupe_keys=["a"])
    with pytest.raises(PayloadError, match="is not declared by topic"):
        await publisher.enqueue_many("orders", "not-a-task", [email(1)])
    assert await rails.stream_messages("shop_orders") == 0


async def test_enqueue_many_reports_what_was_not_stored(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    nc = await nats.connect(rails.server.url)
    publisher = Publisher(nc, rails.settings, publish_deadline=1.0, attempt_timeout=0.5)
    assert len(await publisher.enqueue_many("orders", "send-email", [email(1)])) == 1
    await nc.close()

    with pytest.raises(PublishIncomplete, match="2 of 2 messages were not stored") as raised:
        await publisher.enqueue_many("orders", "send-email", [email(2), email(3)], dedupe_keys=["e2", "e3"])
    assert raised.value.receipts == [None, None]
    assert raised.value.msg_ids == ["e2", "e3"]
    assert await rails.stream_messages("shop_orders") == 1


async def test_enqueue_many_retries_across_a_server_restart(rails: Rails) -> None:
    await rails.apply_topic(topic_resource(storage="file"))
    nc = await nats.connect(rails.server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        publisher = Publisher(nc, rails.settings, publish_deadline=WAIT, attempt_timeout=0.5)
        # The first call reads the topic's contract, which needs the server.
        await publisher.enqueue_many("orders", "send-email", [email(0)])
        rails.server.stop()
        sending = asyncio.create_task(
            publisher.enqueue_many("orders", "send-email", [email(i) for i in range(20)])
        )
        await asyncio.sleep(0.5)
        assert not sending.done(), "nothing can be stored while the server is down"
        rails.server.start()
        receipts = await asyncio.wait_for(sending, WAIT)
    finally:
        await nc.close()
    assert sorted(receipt.seq for receipt in receipts) == list(range(2, 22))
    assert await rails.stream_messages("shop_orders") == 21


async def _stored(rails: Rails, count: int) -> bool:
    return await rails.stream_messages("shop_orders") == count


async def test_concurrent_enqueues_each_get_their_own_puback(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    publisher = rails.publisher()
    receipts = await asyncio.gather(*(publisher.enqueue("orders", "send-email", email(i)) for i in range(200)))

    assert sorted(receipt.seq for receipt in receipts) == list(range(1, 201))
    assert all(re.fullmatch(r"[0-9a-f]{32}", receipt.msg_id) for receipt in receipts)
    assert len({receipt.msg_id for receipt in receipts}) == 200


async def test_metrics_count_every_message_on_render(rails: Rails) -> None:
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic, concurrency=4)
    handled: list[int] = []
    worker = Worker()

    @worker.task("send-email")
    async def send_email(payload: dict[str, object], ctx: Context) -> None:
        handled.append(ctx.stream_seq)

    async with running(worker, settings) as dispatcher:
        await rails.publisher().enqueue_many("orders", "send-email", [email(i) for i in range(30)])
        await eventually(lambda: _true(len(handled) == 30), "thirty messages to be handled")
        await eventually(lambda: _stored(rails, 0), "every ack to reach the server")
        metrics = dispatcher.metrics.render().decode()

    assert sorted(handled) == list(range(1, 31))
    assert 'eventrails_messages_received_total{name="send-email",topic="orders"} 30.0' in metrics
    assert 'eventrails_outcomes_total{name="send-email",outcome="done",topic="orders"} 30.0' in metrics
    assert 'eventrails_in_flight{name="send-email",topic="orders"} 0.0' in metrics
    assert 'eventrails_handler_duration_seconds_count{name="send-email",topic="orders"} 30.0' in metrics
    assert "eventrails_redeliveries_total{" not in metrics


async def _true(value: bool) -> bool:
    return value
