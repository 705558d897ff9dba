"""Handler outcomes: the instruction a handler gives the dispatcher for the message it handled.

    Outcome               base class; an exception so a handler may return or raise one
    ├── Done              handled: acknowledge
    ├── Retry             try again later: negative acknowledgement with a delay
    ├── Skip              nothing to do (entity stale or deleted): acknowledge, count, log
    └── DeadLetter        cannot ever succeed: move to the dead-letter stream

A handler that returns ``None`` is done. Raising lets a helper deep in the call stack
end the handling, as in ``raise Skip("invoice already paid")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

OutcomeKind = Literal["done", "retry", "skip", "dead_letter"]

# Redelivery delay used when a consumer has no backoff list, and the shortest delay used
# at all, so no failing message loops hot.
DEFAULT_RETRY_DELAY = 1.0
MIN_RETRY_DELAY = 0.1


class Outcome(Exception):
    """Base class of the outcomes; ``kind`` names it in metrics, logs and announcements."""

    kind: ClassVar[OutcomeKind]

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"


class Done(Outcome):
    """The message was handled; it is acknowledged."""

    kind = "done"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)


class Retry(Outcome):
    """Handle the message again after ``delay`` seconds, or after the consumer's backoff when None.

    Retries count as deliveries: once the consumer's maxDeliver is used up the message is
    dead-lettered with the last reason.
    """

    kind = "retry"

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and (not math.isfinite(delay) or delay <= 0):
            raise ValueError(
                f"Retry delay must be a positive number of seconds, got {delay!r}; "
                "pass None to use the consumer's backoff list"
            )
        super().__init__(reason)
        self.delay = delay

    def __repr__(self) -> str:
        return f"Retry(delay={self.delay!r}, reason={self.reason!r})"


class Skip(Outcome):
    """The message needs no work, for example because its entity was deleted; it is acknowledged."""

    kind = "skip"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class DeadLetter(Outcome):
    """The message can never be handled; it goes to the dead-letter stream with ``reason``."""

    kind = "dead_letter"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


# The outcome of a handler that returns None. One instance serves every message, since the
# dispatcher only reads it and never raises it.
_DONE = Done()


def resolve(result: object) -> Outcome:
    """Return the outcome a handler's return value stands for.

    Raises TypeError for anything other than None or an Outcome, which is a bug in the handler.
    """
    if result is None:
        return _DONE
    if isinstance(result, Outcome):
        return result
    raise TypeError(
        f"handler returned {type(result).__name__} {result!r}; return None, Done(), Retry(), Skip() or DeadLetter()"
    )


def backoff_delay(backoff: Sequence[float], delivery: int) -> float:
    """Return the redelivery delay after delivery number ``delivery`` (1 for the first).

    The first delivery waits ``backoff[0]``, the second ``backoff[1]``, and the last entry
    repeats. An empty list falls back to DEFAULT_RETRY_DELAY. No delay is shorter than
    MIN_RETRY_DELAY.
    """
    if not backoff:
        return DEFAULT_RETRY_DELAY
    index = min(max(delivery, 1), len(backoff)) - 1
    return max(float(backoff[index]), MIN_RETRY_DELAY)
