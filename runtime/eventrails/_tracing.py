"""W3C trace context across the bus, when opentelemetry-api is installed.

The publisher opens a PRODUCER span around each publish and writes the current context
into the message headers (``traceparent``, ``tracestate``, through OpenTelemetry's global
propagator, so an application that configured another propagator gets that one). The
dispatcher reads the headers back and runs the handler inside a CONSUMER span whose
parent is the publisher's. So a trace continues from the request that published, to the
worker that handled the message, and on to whatever that handler publishes.

Without an OpenTelemetry SDK the API's spans record nothing but still carry the parent's
context, so the ids travel on unchanged. Without opentelemetry-api every function here
does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised only where opentelemetry-api is absent
    trace = None  # type: ignore[assignment]

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

_INSTRUMENTATION = "eventrails"


def enabled() -> bool:
    """Tell whether opentelemetry-api is installed."""
    return trace is not None


class SpanHandle:
    """A handle on the current span for the outcome or the exception that ended the work."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def set(self, key: str, value: str | int) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def failed(self, error: BaseException) -> None:
        if self._span is not None:
            self._span.record_exception(error)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


@contextlib.contextmanager
def publishing(subject: str, name: str, msg_id: str, headers: MutableMapping[str, str]) -> Iterator[SpanHandle]:
    """Open a PRODUCER span for one publish and write the trace context into ``headers``."""
    if trace is None:
        yield SpanHandle()
        return
    tracer = trace.get_tracer(_INSTRUMENTATION)
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.destination.name": subject,
        "messaging.message.id": msg_id,
        "eventrails.name": name,
    }
    with tracer.start_as_current_span(
        f"send {name}", kind=SpanKind.PRODUCER, attributes=attributes, record_exception=False,
        set_status_on_exception=False,
    ) as span:
        propagate.inject(headers)
        yield SpanHandle(span)


@contextlib.contextmanager
def handling(
    headers: Mapping[str, str], subject: str, name: str, msg_id: str, delivery: int
) -> Iterator[SpanHandle]:
    """Run the block in a CONSUMER span continuing the trace found in ``headers`` (if any)."""
    if trace is None:
        yield SpanHandle()
        return
    parent = propagate.extract(dict(headers))
    tracer = trace.get_tracer(_INSTRUMENTATION)
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": subject,
        "messaging.message.id": msg_id,
        "messaging.message.delivery_count": delivery,
        "eventrails.name": name,
    }
    # The dispatcher turns exceptions into outcomes itself and reports them with failed().
    with tracer.start_as_current_span(
        f"process {name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        yield SpanHandle(span)
