"""Delay arguments, schedule headers and the ids of delayed and debounced messages."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from eventrails import PayloadError
from eventrails._contract import Contract
from eventrails._publisher import build_outgoing
from eventrails._schedule import at_pattern, due_at, schedule_headers, seconds
from eventrails._settings import NatsSettings

NOW = datetime(2030, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
CONTRACT = Contract(
    topic="orders", stream="shop_orders", kind="tasks", names=("send-email",),
    required_keys=("organizationId",), exempt=frozenset(), schedules=True,
)
SETTINGS = NatsSettings(namespace="shop")
DATA = {"organizationId": "org_1", "emailId": 1}


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (2, 2.0), (0.25, 0.25), (timedelta(minutes=5), 300.0)],
    ids=["none", "int", "float", "timedelta"],
)
def test_seconds(value: object, expected: float | None) -> None:
    assert seconds(value, "delay") == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, True, "5m", timedelta(0)])
def test_seconds_rejects(value: object) -> None:
    with pytest.raises(PayloadError, match="delay must be"):
        seconds(value, "delay")  # type: ignore[arg-type]


def test_due_at_rounds_up_to_the_millisecond() -> None:
    assert due_at(1.5, NOW) == datetime(2030, 5, 1, 12, 0, 1, 624000, tzinfo=timezone.utc)
    assert due_at(1, NOW.replace(microsecond=0)) == datetime(2030, 5, 1, 12, 0, 1, tzinfo=timezone.utc)


def test_at_pattern_is_utc_rfc3339() -> None:
    other_zone = NOW.astimezone(timezone(timedelta(hours=2)))
    assert at_pattern(other_zone) == "@at 2030-05-01T12:00:00.123Z"
    assert schedule_headers(NOW, "eventrails.shop.orders.send-email") == {
        "Nats-Schedule": "@at 2030-05-01T12:00:00.123Z",
        "Nats-Schedule-Target": "eventrails.shop.orders.send-email",
    }


def test_outgoing_now() -> None:
    out = build_outgoing(CONTRACT, SETTINGS, "send-email", b"{}", DATA, dedupe_key="email-1", now=NOW)

    assert out.destination == out.subject == "eventrails.shop.orders.send-email"
    assert out.msg_id == out.headers["Nats-Msg-Id"] == "email-1"
    assert out.due is None
    assert "Nats-Schedule" not in out.headers
    assert out.headers["Eventrails-Organization-Id"] == "org_1"


def test_outgoing_delay_keyed_by_msg_id() -> None:
    out = build_outgoing(CONTRACT, SETTINGS, "send-email", b"{}", DATA, dedupe_key="email-1", delay=60, now=NOW)

    assert out.destination == "eventrails.sched.shop.orders.send-email.email-1"
    assert out.due == NOW.replace(microsecond=124000) + timedelta(seconds=60)
    assert out.headers["Nats-Schedule"] == "@at 2030-05-01T12:01:00.124Z"
    assert out.headers["Nats-Schedule-Target"] == "eventrails.shop.orders.send-email"
    assert out.headers["Nats-Msg-Id"] == out.headers["Eventrails-Msg-Id"] == "email-1"
    anonymous = build_outgoing(CONTRACT, SETTINGS, "send-email", b"{}", DATA, delay=60, now=NOW)
    assert anonymous.destination.endswith(f".send-email.{anonymous.msg_id}")


def test_outgoing_debounce_keyed_by_entity() -> None:
    by_dedupe = [
        build_outgoing(CONTRACT, SETTINGS, "send-email", b"{}", DATA, dedupe_key="cart/7", debounce=5, now=NOW)
        for _ in range(2)
    ]
    assert {out.destination for out in by_dedupe} == {"eventrails.sched.shop.orders.send-email.cart_7"}
    # Every write gets its own id, or the second would be dropped as a duplicate of the first.
    assert by_dedupe[0].msg_id != by_dedupe[1].msg_id
    assert by_dedupe[0].msg_id != "cart/7"

    explicit = build_outgoing(
        CONTRACT, SETTINGS, "send-email", b"{}", DATA, dedupe_key="write-9", debounce=5, debounce_key="cart-7", now=NOW,
    )
    assert explicit.destination == "eventrails.sched.shop.orders.send-email.cart-7"
    assert explicit.msg_id == "write-9"


def test_contract_without_schedules() -> None:
    contract = Contract(
        topic="orders", stream="shop_orders", kind="tasks", names=("send-email",), required_keys=(),
        exempt=frozenset(),
    )
    with pytest.raises(Exception, match=r"set spec.delayedDelivery: true on Topic 'orders'"):
        contract.check_schedules("send-email", "debounce")
