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

Both functions run once per message, so they skip the API when it could not change
anything. That is when no SDK is installed (spans would record nothing) and there is no
context to pass on: the publisher's current context is empty, or the message carries
none of the propagator's headers. That check costs a few attribute lookups; a span
from the API's no-op implementation costs several microseconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised only where opentelemetry-api is absent
    trace = None  # type: ignore[assignment]

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

_INSTRUMENTATION = "eventrails"


def enabled() -> bool:
    """Tell whether opentelemetry-api is installed."""
    return trace is not None


# The tracer of the provider in use; a new one is taken when an application sets another.
_tracer: tuple[Any, Any] | None = None

# Whether an SDK records spans, looked up again once a second: an application that sets a
# tracer provider after its first messages gets spans from then on.
_RECHECK_AFTER = 1.0
_recording_checked: tuple[float, bool] = (-_RECHECK_AFTER, False)

# The header names the global propagator reads, looked up again once a second.
_fields: tuple[float, frozenset[str]] | None = None


def _recording() -> bool:
    """Tell whether a tracer provider that records spans (an SDK) is installed."""
    global _recording_checked
    now = time.monotonic()
    checked_at, recording = _recording_checked
    if now - checked_at >= _RECHECK_AFTER:
        recording = not isinstance(trace.get_tracer_provider(), (ProxyTracerProvider, NoOpTracerProvider))
        _recording_checked = (now, recording)
    return recording


def _get_tracer() -> Any:
    global _tracer
    provider = trace.get_tracer_provider()
    if _tracer is None or _tracer[0] is not provider:
        _tracer = (provider, trace.get_tracer(_INSTRUMENTATION, tracer_provider=provider))
    return _tracer[1]


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


# The context manager both functions return when there is nothing to trace.
_NO_SPAN = contextlib.nullcontext(SpanHandle())


def publishing(
    subject: str, name: str, msg_id: str, headers: MutableMapping[str, str]
) -> contextlib.AbstractContextManager[SpanHandle]:
    """Open a PRODUCER span for one publish and write the trace context into ``headers``."""
    if trace is None or (not otel_context.get_current() and not _recording()):
        return _NO_SPAN
    return _publishing(subject, name, msg_id, headers)


def handling(
    headers: Mapping[str, str], subject: str, name: str, msg_id: str, delivery: int
) -> contextlib.AbstractContextManager[SpanHandle]:
    """Run the block in a CONSUMER span continuing the trace found in ``headers`` (if any)."""
    if trace is None or (not _carries_context(headers) and not _recording()):
        return _NO_SPAN
    return _handling(headers, subject, name, msg_id, delivery)


@contextlib.contextmanager
def _publishing(subject: str, name: str, msg_id: str, headers: MutableMapping[str, str]) -> Iterator[SpanHandle]:
    tracer = _get_tracer()
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
def _handling(
    headers: Mapping[str, str], subject: str, name: str, msg_id: str, delivery: int
) -> Iterator[SpanHandle]:
    parent = propagate.extract(dict(headers))
    tracer = _get_tracer()
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


def _carries_context(headers: Mapping[str, str]) -> bool:
    global _fields
    if not headers:
        return False
    now = time.monotonic()
    if _fields is None or now - _fields[0] >= _RECHECK_AFTER:
        _fields = (now, frozenset(propagate.get_global_textmap().fields))
    return any(field in headers for field in _fields[1])
