"""The reconcile core (_reconcile and _jetstream) against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.manager import JetStreamManager

from eventrails._errors import translate
from eventrails._manifests import parse_resource
from eventrails._natsserver import NatsServer
from eventrails._resources import Consumer, Topic
from eventrails_operator import _jetstream, _reconcile
from eventrails_operator._desired import BusConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Every JetStream API request that creates or changes a stream or a consumer.
WRITE_SUBJECTS = (
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
)


def make_topic(name: str = "orders", namespace: str = "shop", **spec: Any) -> Topic:
    body = {
        "apiVersion": "eventrails.dev/v1alpha1", "kind": "Topic",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {"tasks": ["send-email", "charge-card"], **spec},
    }
    topic = parse_resource(body)
    assert isinstance(topic, Topic)
    return topic


def make_consumer(topic: str = "orders", name: str = "mailer", namespace: str = "shop", **spec: Any) -> Consumer:
    body = {
        "apiVersion": "eventrails.dev/v1alpha1", "kind": "Consumer",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {"topic": topic, "handler": "shop.workers:worker", **spec},
    }
    consumer = parse_resource(body)
    assert isinstance(consumer, Consumer)
    return consumer


def enum_value(value: Any) -> str:
    """nats-py returns stream enums as enum members or plain strings depending on the field."""
    return str(getattr(value, "value", value))


class WriteCounter:
    """Counts JetStream write requests seen by a second, independent connection."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def handler(self, msg: Any) -> None:
        self.subjects.append(msg.subject)


@pytest.fixture()
def bus(nats_server: NatsServer) -> BusConnection:
    return BusConnection(servers=(nats_server.url,), name="default")


@pytest.fixture()
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url, connect_timeout=5)
    yield client
    await client.close()


@pytest.fixture()
def jsm(nc: Client) -> JetStreamManager:
    return nc.jsm(timeout=5)


@pytest.fixture()
async def writes(nats_server: NatsServer) -> AsyncIterator[WriteCounter]:
    counter = WriteCounter()
    observer = await nats.connect(nats_server.url, connect_timeout=5)
    for subject in WRITE_SUBJECTS:
        await observer.subscribe(subject, cb=counter.handler)
    await observer.flush(timeout=5)
    yield counter
    await observer.close()


async def settle(nc: Client, counter: WriteCounter) -> list[str]:
    """Return the write subjects seen so far, after every request sent has reached the observer."""
    await nc.flush(timeout=5)
    await asyncio.sleep(0.2)
    return list(counter.subjects)


async def test_create_then_in_sync_reconcile_sends_no_write(
    jsm: JetStreamManager, nc: Client, bus: BusConnection, writes: WriteCounter,
) -> None:
    topic, consumer = make_topic(), make_consumer()

    created = await _reconcile.reconcile_topic(jsm, topic, bus)
    consumed = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)

    assert created.ready and consumed.ready
    assert [(c.kind, c.name, c.action) for c in created.changes] == [
        ("stream", "shop_orders", "created"), ("stream", "shop_orders_dlq", "created"),
    ]
    assert [(c.name, c.action) for c in consumed.changes] == [("mailer", "created")]
    info = await jsm.stream_info("shop_orders")
    assert sorted(info.config.subjects or []) == ["eventrails.shop.orders.charge-card", "eventrails.shop.orders.send-email"]
    assert (await jsm.consumer_info("shop_orders", "mailer")).config.max_deliver == 6
    assert created.status["conditions"][0]["type"] == "Ready"
    assert created.status["conditions"][0]["status"] == "True"
    assert consumed.status["consumer"] == "mailer"
    # The observer saw the creations, so an empty count below means no write, not a deaf observer.
    assert len(await settle(nc, writes)) == 3

    writes.subjects.clear()
    again = await _reconcile.reconcile_topic(jsm, topic, bus)
    again_consumer = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)

    assert again.ready and again_consumer.ready
    assert again.writes == []
    assert again_consumer.writes == []
    assert await settle(nc, writes) == []


async def test_changed_limit_updates_only_that_stream(
    jsm: JetStreamManager, nc: Client, bus: BusConnection, writes: WriteCounter,
) -> None:
    await _reconcile.reconcile_topic(jsm, make_topic(), bus)
    writes.subjects.clear()

    result = await _reconcile.reconcile_topic(jsm, make_topic(limits={"maxMessages": 500}), bus)

    assert result.ready
    assert [(c.name, c.action, c.fields) for c in result.writes] == [("shop_orders", "updated", ("max_msgs",))]
    assert (await jsm.stream_info("shop_orders")).config.max_msgs == 500
    assert await settle(nc, writes) == ["$JS.API.STREAM.UPDATE.shop_orders"]


async def test_storage_change_is_immutable_and_leaves_the_stream(
    jsm: JetStreamManager, nc: Client, bus: BusConnection, writes: WriteCounter,
) -> None:
    await _reconcile.reconcile_topic(jsm, make_topic(storage="file"), bus)
    writes.subjects.clear()

    result = await _reconcile.reconcile_topic(jsm, make_topic(storage="memory"), bus)

    assert result.error is not None
    assert result.error.reason == "ImmutableField"
    assert result.error.field == "spec.storage"
    assert result.error.temporary is False
    ready = result.status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "ImmutableField")
    assert "spec.storage" in ready["message"]
    assert "memory" in ready["message"]
    # The server judges the change, so the condition carries its error code.
    assert result.error.err_code == 10052
    assert "err_code 10052" in ready["message"]
    assert enum_value((await jsm.stream_info("shop_orders")).config.storage) == "file"
    assert await settle(nc, writes) == ["$JS.API.STREAM.UPDATE.shop_orders"]


async def test_retention_from_workqueue_to_limits_is_rejected(
    jsm: JetStreamManager, nc: Client, bus: BusConnection, writes: WriteCounter,
) -> None:
    await _reconcile.reconcile_topic(jsm, make_topic(), bus)
    writes.subjects.clear()

    result = await _reconcile.reconcile_topic(jsm, make_topic(retention="limits"), bus)

    assert result.error is not None
    assert (result.error.reason, result.error.field) == ("ImmutableField", "spec.retention")
    assert "workqueue" in result.error.message
    assert "limits" in result.error.message
    assert result.error.err_code == 10052
    assert enum_value((await jsm.stream_info("shop_orders")).config.retention) == "workqueue"
    assert await settle(nc, writes) == ["$JS.API.STREAM.UPDATE.shop_orders"]


async def test_removing_a_task_with_stored_messages_is_refused(
    jsm: JetStreamManager, nc: Client, bus: BusConnection, writes: WriteCounter,
) -> None:
    await _reconcile.reconcile_topic(jsm, make_topic(), bus)
    js = nc.jetstream()
    await js.publish("eventrails.shop.orders.charge-card", b'{"orderId": "o-1"}')
    await js.publish("eventrails.shop.orders.charge-card", b'{"orderId": "o-2"}')
    writes.subjects.clear()

    result = await _reconcile.reconcile_topic(jsm, make_topic(tasks=["send-email"]), bus)

    assert result.error is not None
    assert result.error.reason == "SubjectsHaveData"
    assert "eventrails.shop.orders.charge-card (2 messages)" in result.error.message
    info = await jsm.stream_info("shop_orders")
    assert "eventrails.shop.orders.charge-card" in (info.config.subjects or [])
    assert info.state.messages == 2
    assert await settle(nc, writes) == []


async def test_removing_a_task_without_messages_is_applied(jsm: JetStreamManager, bus: BusConnection) -> None:
    await _reconcile.reconcile_topic(jsm, make_topic(), bus)

    result = await _reconcile.reconcile_topic(jsm, make_topic(tasks=["send-email"]), bus)

    assert result.ready
    assert (await jsm.stream_info("shop_orders")).config.subjects == ["eventrails.shop.orders.send-email"]


async def test_server_rejected_change_carries_the_error_code(jsm: JetStreamManager, bus: BusConnection) -> None:
    await _reconcile.reconcile_topic(jsm, make_topic(), bus)

    # A single server without clustering cannot keep three replicas, and only the server can tell.
    result = await _reconcile.reconcile_topic(jsm, make_topic(replicas=3), bus)

    assert result.error is not None
    assert result.error.reason == "JetStreamRejected"
    assert result.error.field == "spec.replicas"
    assert isinstance(result.error.err_code, int) and result.error.err_code > 10000
    message = result.status["conditions"][0]["message"]
    assert f"err_code {result.error.err_code}" in message
    assert "spec.replicas" in message
    assert (await jsm.stream_info("shop_orders")).config.num_replicas == 1


async def test_consumer_with_unknown_names_creates_nothing(jsm: JetStreamManager, bus: BusConnection) -> None:
    topic = make_topic()
    await _reconcile.reconcile_topic(jsm, topic, bus)

    result = await _reconcile.reconcile_consumer(jsm, make_consumer(names=["refund"]), topic, bus)

    assert result.error is not None and result.error.reason == "UnknownNames"
    assert "refund" in result.error.message
    assert [info.name for info in await jsm.consumers_info("shop_orders")] == []


async def test_retain_keeps_streams_and_delete_removes_them(jsm: JetStreamManager, bus: BusConnection) -> None:
    retained = make_topic(name="kept")
    removed = make_topic(name="gone", deletionPolicy="Delete")
    consumer = make_consumer(topic="gone")
    for topic in (retained, removed):
        await _reconcile.reconcile_topic(jsm, topic, bus)
    await _reconcile.reconcile_consumer(jsm, consumer, removed, bus)

    assert await _reconcile.delete_topic(jsm, retained) == []
    consumer_change = await _reconcile.delete_consumer(jsm, consumer)
    changes = await _reconcile.delete_topic(jsm, removed)

    assert consumer_change.action == "deleted"
    assert [(c.name, c.action) for c in changes] == [("shop_gone", "deleted"), ("shop_gone_dlq", "deleted")]
    names = sorted(await jsm.streams_info(), key=lambda info: info.config.name)
    assert [info.config.name for info in names] == ["shop_kept", "shop_kept_dlq"]
    # Deleting again finds nothing and is not an error.
    assert [c.action for c in await _reconcile.delete_topic(jsm, removed)] == ["absent", "absent"]
    assert (await _reconcile.delete_consumer(jsm, consumer)).action == "absent"


async def test_consumer_without_stream_reports_stream_not_found(jsm: JetStreamManager, bus: BusConnection) -> None:
    topic, consumer = make_topic(), make_consumer()

    early = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)

    assert early.error is not None
    assert early.error.reason == "StreamNotFound"
    assert early.error.temporary
    assert "stream shop_orders not found" in early.error.message
    assert early.status["conditions"][0]["status"] == "False"

    await _reconcile.reconcile_topic(jsm, topic, bus)
    later = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)

    assert later.ready
    assert [(change.name, change.action) for change in later.changes] == [("mailer", "created")]


def test_reconcile_error_names_action_once() -> None:
    error = nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found")
    translated = translate(error, "create consumer shop_orders/mailer")

    failure = _jetstream._reconcile_error(translated, "create consumer", "shop_orders/mailer")

    assert failure.reason == "JetStreamError"
    assert failure.message == "create consumer shop_orders/mailer: stream not found"
