"""W3C trace context from the publisher, through JetStream, into the handler and on downstream."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from eventrails import Context
from tests.integration.test_runtime import Rails, SendEmail, consumer_resource, email, rails, running, topic_resource
from tests.integration.test_runtime_dispatch import email_worker

pytestmark = pytest.mark.integration

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


async def test_handler_continues_the_publishers_trace(rails: Rails) -> None:
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    seen: list[tuple[int, dict[str, Any]]] = []

    async def handle(payload: SendEmail, ctx: Context) -> None:
        seen.append((trace.get_current_span().get_span_context().trace_id, dict(ctx.headers)))
        await ctx.publisher.enqueue("orders", "refresh-cache", {"cacheKey": "x"}, dedupe_key=f"{ctx.msg_id}-cache")

    # The caller's span, as a web framework's instrumentation would have opened it.
    caller = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    async with running(email_worker(handle), settings):
        with trace.use_span(caller):
            receipt = await rails.publisher().enqueue("orders", "send-email", email(1))
        assert (await rails.outcomes.next())["outcome"] == "done"

    [(trace_id, headers)] = seen
    assert trace_id == TRACE_ID
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
    downstream = await rails.js.get_last_msg("shop_orders", "eventrails.shop.orders.refresh-cache")
    assert (downstream.headers or {})["traceparent"].split("-")[1] == f"{TRACE_ID:032x}"
    assert (downstream.headers or {})["Nats-Msg-Id"] == f"{receipt.msg_id}-cache"


async def test_no_trace_no_headers(rails: Rails) -> None:
    await rails.apply_topic(topic_resource())
    receipt = await rails.publisher().enqueue("orders", "send-email", email(1))
    stored = await rails.js.get_msg("shop_orders", receipt.seq)
    assert "traceparent" not in (stored.headers or {})
