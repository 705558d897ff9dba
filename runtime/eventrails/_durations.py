"""Durations as written in manifests: Go-style strings such as ``90s``, ``1h30m`` or ``7d``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Convert a duration string to seconds.

    Raises ValueError naming the value and the accepted form when the text is not a duration.
    """
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit of ms, s, m, h or d, such as '30s' or '1h30m'"
        )
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """Render seconds as the shortest duration string that parses back to the same value."""
    if seconds < 1 and seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[str, Field(pattern=DURATION_PATTERN), AfterValidator(_check_duration)]
