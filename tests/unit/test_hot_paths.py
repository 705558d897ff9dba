"""The shortcuts of the per-message paths: message ids, the tracing fast path, the handler's context."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from datetime import datetime, timezone

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from eventrails import _tracing
from eventrails._dispatcher import run_event_loop
from eventrails._outcomes import Done, resolve
from eventrails import PayloadError
from eventrails._publisher import _published_at, encode_payload, new_msg_id
from eventrails._worker import Context


def test_message_ids_are_unique_hex() -> None:
    ids = [new_msg_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", msg_id) for msg_id in ids)


def test_forked_child_draws_other_ids() -> None:
    parent = new_msg_id()
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(writing, new_msg_id().encode())
        os._exit(0)
    os.close(writing)
    child = os.read(reading, 64).decode()
    os.close(reading)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child[:20] != parent[:20], "a forked child must not continue its parent's id sequence"


def test_publishing_without_sdk_or_context_leaves_headers_alone() -> None:
    headers: dict[str, str] = {}
    with _tracing.publishing("eventrails.shop.orders.send-email", "send-email", "id-1", headers) as span:
        span.set("messaging.nats.stream_seq", 1)
    assert headers == {}


def test_publishing_in_a_span_carries_its_context() -> None:
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    caller = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)))
    headers: dict[str, str] = {}
    with trace.use_span(caller), _tracing.publishing("subject", "send-email", "id-1", headers):
        pass
    assert headers["traceparent"] == f"00-{trace_id:032x}-{span_id:016x}-01"


def test_handling_continues_a_trace_from_headers_without_sdk() -> None:
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    headers = {"traceparent": f"00-{trace_id:032x}-00f067aa0ba902b7-01"}
    with _tracing.handling(headers, "subject", "send-email", "id-1", 1):
        assert trace.get_current_span().get_span_context().trace_id == trace_id
    with _tracing.handling({"Nats-Msg-Id": "x"}, "subject", "send-email", "id-1", 1):
        assert not trace.get_current_span().get_span_context().is_valid


def test_none_resolves_to_done() -> None:
    assert isinstance(resolve(None), Done)
    assert resolve(None).kind == "done"


def test_context_logger_is_built_on_first_use() -> None:
    context = Context.create(
        msg_id="id-1", name="send-email", topic="orders", subject="s", stream_seq=3, delivery=2,
        headers={"Nats-Msg-Id": "id-1"}, publisher=None,  # type: ignore[arg-type]
    )
    assert dict(context.headers) == {"Nats-Msg-Id": "id-1"}
    message, _ = context.logger.process("sending", {})
    assert message == "orders/send-email msg=id-1 seq=3 delivery=2: sending"
    assert context.logger is context.logger


def test_publish_time_is_iso_utc_milliseconds() -> None:
    stamp = _published_at()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp)
    parsed = datetime.fromisoformat(stamp)
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 1.0


def test_payloads_encode_as_compact_json_does() -> None:
    payloads = [
        {},
        {"organizationId": "org_1", "emailId": 7, "ratio": 0.25, "flags": [True, False, None]},
        {"text": "caf\u00e9 \u2603 \"quoted\"\n", "nested": {"list": [{"a": 1}, [], {}]}, "big": 10**30},
        {1: "int key", "tuple": (1, 2)},
    ]
    for payload in payloads:
        assert encode_payload("send-email", payload) == json.dumps(payload, separators=(",", ":")).encode()


def test_payloads_json_cannot_carry_are_refused() -> None:
    circular: dict[str, object] = {}
    circular["self"] = circular
    with pytest.raises(PayloadError, match="contains itself"):
        encode_payload("send-email", circular)
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload("send-email", {"ratio": math.nan})
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload("send-email", {"when": object()})


def test_loop_error_has_no_import_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail

    async def failing() -> None:
        raise LookupError("handler bug")

    with pytest.raises(LookupError) as caught:
        run_event_loop(failing())
    assert caught.value.__context__ is None
