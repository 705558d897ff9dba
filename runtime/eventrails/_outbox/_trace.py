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


def forwarded_headers() -> frozenset[str]:
    """Return the lower-case names of the headers the propagator reads (none without opentelemetry-api)."""
    if not _tracing.enabled():
        return frozenset()
    from opentelemetry import propagate

    return frozenset(field.lower() for field in propagate.get_global_textmap().fields)


def capture(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``headers`` unless the caller already put one there."""
    if not _tracing.enabled() or _tracing.TRACEPARENT_HEADER in headers:
        return
    from opentelemetry import propagate

    propagate.inject(headers)


@contextlib.contextmanager
def continuing(headers: Mapping[str, str]) -> Iterator[None]:
    """Run the block with the trace context stored in ``headers`` as the current one."""
    if not _tracing.enabled() or not forwarded_headers() & {key.lower() for key in headers}:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        context.detach(token)
