"""Handler outcomes: how return values and raised outcomes resolve, and which backoff delay applies."""

from __future__ import annotations

import math

import pytest

from eventrails import DeadLetter, Done, Outcome, Retry, Skip
from eventrails._outcomes import DEFAULT_RETRY_DELAY, MIN_RETRY_DELAY, backoff_delay, resolve


def test_resolve_none_is_done() -> None:
    assert isinstance(resolve(None), Done)


@pytest.mark.parametrize(
    "outcome", [Done(), Retry(2.5, "rate limited"), Skip("invoice deleted"), DeadLetter("customer unknown")],
    ids=repr,
)
def test_resolve_keeps_returned_outcome(outcome: Outcome) -> None:
    assert resolve(outcome) is outcome


@pytest.mark.parametrize("value", [True, "done", 0, {"outcome": "done"}], ids=repr)
def test_resolve_rejects_other_values(value: object) -> None:
    with pytest.raises(TypeError, match="return None, Done\\(\\), Retry\\(\\), Skip\\(\\) or DeadLetter\\(\\)"):
        resolve(value)


def test_outcome_raised_and_caught() -> None:
    def handler() -> None:
        raise Skip("project archived")

    with pytest.raises(Outcome) as caught:
        handler()

    assert isinstance(caught.value, Skip)
    assert caught.value.reason == "project archived"
    assert caught.value.kind == "skip"


def test_outcome_kinds() -> None:
    assert [Done().kind, Retry().kind, Skip("x").kind, DeadLetter("x").kind] == ["done", "retry", "skip", "dead_letter"]


def test_retry_default_delay_is_none() -> None:
    retry = Retry(reason="upstream returned 503")

    assert retry.delay is None
    assert retry.reason == "upstream returned 503"


@pytest.mark.parametrize("delay", [0, -1.0, math.inf, math.nan], ids=repr)
def test_retry_rejects_nonpositive_delay(delay: float) -> None:
    with pytest.raises(ValueError, match="pass None to use the consumer's backoff"):
        Retry(delay)


@pytest.mark.parametrize(
    ("delivery", "expected"), [(1, 1.0), (2, 10.0), (3, 60.0), (4, 60.0), (50, 60.0)],
)
def test_backoff_delay_per_delivery(delivery: int, expected: float) -> None:
    assert backoff_delay([1.0, 10.0, 60.0], delivery) == expected


def test_backoff_delay_empty_list() -> None:
    assert backoff_delay([], 3) == DEFAULT_RETRY_DELAY


def test_backoff_delay_minimum() -> None:
    assert backoff_delay([0.0], 1) == MIN_RETRY_DELAY
