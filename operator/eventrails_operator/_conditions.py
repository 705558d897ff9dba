"""Standard status conditions (Ready, Reconciling, Degraded) in the kstatus style."""

from __future__ import annotations

import datetime
from typing import Any


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str, generation: int | None,
) -> list[dict[str, Any]]:
    """Return a new condition list with one condition set.

    ``lastTransitionTime`` changes only when the status changes, as Kubernetes conventions ask.
    """
    result = [dict(item) for item in conditions if item.get("type") != type_]
    previous = next((item for item in conditions if item.get("type") == type_), None)
    transition = previous["lastTransitionTime"] if previous and previous.get("status") == status else _now()
    condition = {
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    result.append(condition)
    order = {"Ready": 0, "Reconciling": 1, "Degraded": 2}
    return sorted(result, key=lambda item: order.get(item["type"], 9))


def ready_conditions(conditions: list[dict[str, Any]], message: str, generation: int | None) -> list[dict[str, Any]]:
    """Return conditions for an object whose desired state is reached."""
    conditions = set_condition(conditions, "Ready", "True", "Reconciled", message, generation)
    conditions = set_condition(conditions, "Reconciling", "False", "Reconciled", "", generation)
    return set_condition(conditions, "Degraded", "False", "Reconciled", "", generation)


def failed_conditions(
    conditions: list[dict[str, Any]], reason: str, message: str, generation: int | None, *, temporary: bool,
) -> list[dict[str, Any]]:
    """Return conditions for an object whose desired state could not be reached.

    A temporary failure keeps Reconciling=True (it will be retried unchanged); a permanent
    one sets Degraded=True until the spec changes.
    """
    conditions = set_condition(conditions, "Ready", "False", reason, message, generation)
    conditions = set_condition(
        conditions, "Reconciling", "True" if temporary else "False", reason, message if temporary else "", generation
    )
    return set_condition(
        conditions, "Degraded", "False" if temporary else "True", reason, "" if temporary else message, generation
    )


def ready_status(conditions: list[dict[str, Any]]) -> str | None:
    for item in conditions:
        if item.get("type") == "Ready":
            return str(item.get("status"))
    return None
