"""Wire against nats-py's own publish: the same messages arrive, and the same errors are raised."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from eventrails._natsserver import NatsServer
from eventrails._wire import Wire

pytestmark = pytest.mark.integration

HEADERS = {
    "Nats-Msg-Id": "7f3c0d2a9b1e4c5d8a6f0b2c4d6e8f01",
    "Eventrails-Name": "send-email",
    "Eventrails-Published-At": "2026-12-04T23:00:00.123+00:00",
    "Eventrails-Organization-Id": " org_1 ",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


@pytest.fixture()
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    if not client.is_closed:
        await client.close()


async def _received(nc: NATS, send_both: object) -> tuple[Msg, Msg]:
    """Subscribe to two subjects, let ``send_both`` publish one message to each, return both."""
    messages: asyncio.Queue[Msg] = asyncio.Queue()

    async def received(msg: Msg) -> None:
        await messages.put(msg)

    await nc.subscribe("wire.>", cb=received)
    await nc.flush()
    await send_both()  # type: ignore[operator]
    first, second = await asyncio.wait_for(messages.get(), 5), await asyncio.wait_for(messages.get(), 5)
    return (first, second) if first.subject == "wire.natspy" else (second, first)


async def test_wire_message_matches_nats_py(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None

    async def send_both() -> None:
        await nc.publish("wire.natspy", b'{"a":1}', reply="reply.one", headers=dict(HEADERS))
        await wire.publish("wire.ours", b'{"a":1}', "reply.one", HEADERS)

    theirs, ours = await _received(nc, send_both)
    assert ours.headers == theirs.headers
    assert ours.headers is not None
    assert ours.headers["Eventrails-Organization-Id"] == "org_1"
    assert (ours.data, ours.reply) == (theirs.data, theirs.reply)


async def test_wire_plain_message_arrives_whole(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None

    async def send_both() -> None:
        await nc.publish("wire.natspy", b"+ACK")
        await wire.publish("wire.ours", b"+ACK")

    theirs, ours = await _received(nc, send_both)
    assert (ours.data, ours.reply, ours.headers) == (theirs.data, theirs.reply, theirs.headers)


async def test_wire_line_break_falls_back(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None
    headers = {**HEADERS, "Eventrails-Organization-Id": "org\r\nInjected: yes"}
    assert wire.header_block(headers) is None

    async def send_both() -> None:
        await nc.publish("wire.natspy", b"{}", headers=dict(headers))
        await wire.publish("wire.ours", b"{}", headers=headers)

    theirs, ours = await _received(nc, send_both)
    assert ours.headers == theirs.headers
    assert ours.headers is not None
    assert "Injected" not in ours.headers


async def test_wire_bad_header_name_raises(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None
    with pytest.raises(nats.errors.BadHeaderError):
        await wire.publish("wire.ours", b"{}", headers={"Bad Name": "x"})


async def test_wire_blank_subject_raises(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None
    with pytest.raises(nats.errors.BadSubjectError):
        await wire.publish("wire. ours", b"{}", headers=HEADERS)
    with pytest.raises(nats.errors.BadSubjectError):
        await wire.publish("wire.ours", b"{}", reply="reply\r\nPUB x 0")


async def test_wire_oversized_message_raises(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None
    with pytest.raises(nats.errors.MaxPayloadError):
        await wire.publish("wire.ours", b"x" * (nc.max_payload + 1), headers=HEADERS)


async def test_wire_closed_client_raises(nc: NATS) -> None:
    wire = Wire.for_client(nc)
    assert wire is not None
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await wire.publish("wire.ours", b"{}", headers=HEADERS)


def test_wire_only_for_nats_py_clients() -> None:
    assert Wire.for_client(object()) is None
    assert Wire.for_client(NATS()) is not None
