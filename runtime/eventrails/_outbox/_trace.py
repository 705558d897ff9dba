"""Trace context across the outbox, when opentelemetry-api is installed.

The writer stores the caller's current context in the row's headers (``traceparent``,
``tracestate``), and the relay publishes each row inside that context. The publisher's
span and the ``traceparent`` it sends then continue the trace of the request that wrote
the row, not the relay's. Without opentelemetry-api both functions do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping

from eventrails import _tracing


# The global propagator and the lower-case names of its headers, computed again when an
# application installs another propagator. A composite propagator builds its set of names
# anew on every call, which the relay would otherwise pay once per row.
_fields: tuple[object, frozenset[str]] | None = None


def forwarded_headers() -> frozenset[str]:
    """Return the lower-case names of the headers the propagator reads (none without opentelemetry-api)."""
    global _fields
    if not _tracing.enabled():
        return frozenset()
    from opentelemetry import propagate

    textmap = propagate.get_global_textmap()
    if _fields is None or _fields[0] is not textmap:
        _fields = (textmap, frozenset(field.lower() for field in textmap.fields))
    return _fields[1]


def carries_context(headers: Mapping[str, str]) -> bool:
    """Tell whether ``headers`` contain a trace context for the relay to publish in."""
    return bool(headers) and _tracing.enabled() and any(key.lower() in forwarded_headers() for key in headers)


def capture(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``headers`` unless the caller already put one there."""
    if not _tracing.enabled() or _tracing.TRACEPARENT_HEADER in headers:
        return
    from opentelemetry import propagate

    propagate.inject(headers)


@contextlib.contextmanager
def continuing(headers: Mapping[str, str]) -> Iterator[None]:
    """Run the block with the trace context stored in ``headers`` as the current one."""
    if not carries_context(headers):
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        context.detach(token)
