"""Delayed and debounced tasks with JetStream message schedules (nats-server 2.12 and later).

A delayed task is stored first as a *schedule message* on a per-entity schedule subject
inside the topic's own stream (``<prefix>.sched.<ns>.<topic>.<task>.<key>``) with two
headers the server understands:

    Nats-Schedule: @at 2030-01-01T12:00:00.250Z     when to fire, in UTC
    Nats-Schedule-Target: eventrails.shop.orders.send-email   where the task lands

The server stores a schedule with a subject roll-up, so a newer schedule on the same
subject replaces the pending one: that is the whole of debounce. When the time comes the
server copies the message onto the target subject, where the topic's consumer picks it
up like any other task, and purges the schedule. The copy keeps every header except the
``Nats-Schedule*``, ``Nats-Expected-*``, ``Nats-Msg-Id``, ``Nats-TTL`` and ``Nats-Rollup``
ones, and gains ``Nats-Scheduler`` (the schedule subject) and ``Nats-Schedule-Next:
purge``. Because the message id is dropped, the publisher repeats it in
``Eventrails-Msg-Id`` so the handler's ``ctx.msg_id`` is the id the publisher returned.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from eventrails._errors import PayloadError

SCHEDULE_HEADER = "Nats-Schedule"
SCHEDULE_TARGET_HEADER = "Nats-Schedule-Target"
# Set by the server on the copy it publishes when a schedule fires.
SCHEDULER_HEADER = "Nats-Scheduler"
SCHEDULE_NEXT_HEADER = "Nats-Schedule-Next"
# The message id of a scheduled task, which the server strips from Nats-Msg-Id.
MSG_ID_HEADER = "Eventrails-Msg-Id"
# When a scheduled task is due, for logs and for handlers that care how late they run.
DUE_HEADER = "Eventrails-Due-At"


def seconds(value: float | timedelta | None, argument: str) -> float | None:
    """Return ``value`` in seconds; raise PayloadError unless it is a positive, finite number or timedelta."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    else:
        raise PayloadError(f"{argument} must be seconds (a number) or a timedelta, got {type(value).__name__} {value!r}")
    if not math.isfinite(result) or result <= 0:
        raise PayloadError(f"{argument} must be a positive number of seconds, got {value!r}")
    return result


def due_at(delay: float, now: datetime | None = None) -> datetime:
    """Return the UTC time ``delay`` seconds from ``now`` (the current time when None), to the millisecond."""
    start = now if now is not None else datetime.now(timezone.utc)
    due = start.astimezone(timezone.utc) + timedelta(seconds=delay)
    # Round up, so a task never fires before its delay has passed.
    micros = due.microsecond
    if micros % 1000:
        due += timedelta(microseconds=1000 - micros % 1000)
    return due


def at_pattern(due: datetime) -> str:
    """Return the ``Nats-Schedule`` value for a single firing at ``due``: ``@at <RFC 3339 in UTC>``."""
    stamp = due.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return "@at " + stamp.replace("+00:00", "Z")


def schedule_headers(due: datetime, target: str) -> dict[str, str]:
    """Return the headers that make the server deliver a message on ``target`` at ``due``."""
    return {SCHEDULE_HEADER: at_pattern(due), SCHEDULE_TARGET_HEADER: target}
