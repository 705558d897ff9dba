"""The Grafana dashboard queries metrics that eventrails really exports, with their real labels.

The eventrails_* names and labels come from the collectors themselves: the worker's
``Metrics``, the outbox relay's ``RelayMetrics`` and the operator's module-level collectors.
Stream and consumer figures come from prometheus-nats-exporter (run by the official NATS
chart with -jsz=all), whose metric names are listed below.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from eventrails._metrics import Metrics
from eventrails._outbox._relay import RelayMetrics
from eventrails_operator import _handlers
from tests.unit.test_chart_helm import CHART

DASHBOARD = CHART / "dashboards" / "eventrails.json"
# prometheus-nats-exporter's JetStream metrics (collector/jsz.go), after its prefix, with the
# labels the dashboard uses.
NATS_EXPORTER = {
    "stream_total_messages": {"stream_name", "account"},
    "consumer_num_pending": {"stream_name", "consumer_name", "account"},
    "consumer_num_ack_pending": {"stream_name", "consumer_name", "account"},
    "consumer_num_redelivered": {"stream_name", "consumer_name", "account"},
}
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "service", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}


def _samples(collector: MetricWrapperBase) -> dict[str, set[str]]:
    """Sample names of one collector and the labels they carry."""
    # NOTE: prometheus-client keeps label names in a private attribute; there is no public one.
    labels = set(collector._labelnames)
    found = {}
    for family in collector.describe():
        for suffix in SUFFIXES[family.type]:
            found[family.name + suffix] = labels
    return found


def exported() -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for holder in (vars(Metrics()), vars(RelayMetrics()), vars(_handlers)):
        for value in holder.values():
            if isinstance(value, MetricWrapperBase):
                result.update(_samples(value))
    return result


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["definition"])
    return found


def metric_names(expression: str) -> list[str]:
    names = re.findall(r"\b(eventrails_[a-z0-9_]+)", expression)
    names += [f"nats:{name}" for name in re.findall(r"\$\{nats_prefix\}_([a-z_]+)", expression)]
    return names


def test_exported_metrics_are_found() -> None:
    """The collection above sees the real collectors (it would pass vacuously otherwise)."""
    names = exported()
    assert {"eventrails_operator_reconciles_total", "eventrails_outcomes_total",
            "eventrails_outbox_oldest_pending_age_seconds"} <= set(names)
    assert names["eventrails_outcomes_total"] == {"topic", "name", "outcome"}


@pytest.mark.parametrize("expression", queries())
def test_queries_use_exported_metrics(expression: str) -> None:
    names = exported()
    used = metric_names(expression)
    assert used, f"no eventrails or NATS exporter metric in {expression!r}"
    labels: set[str] = set(TARGET_LABELS)
    for name in used:
        if name.startswith("nats:"):
            assert name[5:] in NATS_EXPORTER, f"prometheus-nats-exporter has no {name[5:]!r}: {expression}"
            labels |= NATS_EXPORTER[name[5:]]
        else:
            assert name in names, f"{name} is not exported by eventrails (see runtime/eventrails/_metrics.py, " \
                                  f"_outbox/_relay.py and the operator's _handlers.py): {expression}"
            labels |= names[name]
    grouped = [label.strip() for group in re.findall(r"by \(([^)]*)\)", expression) for label in group.split(",")]
    matched = re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expression)
    listed = re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expression)
    for label in [*grouped, *matched, *listed]:
        assert label in labels, f"label {label!r} is not on {used}: {expression}"


def test_dashboard_covers_key_figures() -> None:
    used = {name for expression in queries() for name in metric_names(expression)}
    expected = {
        "eventrails_operator_reconciles_total",  # operator reconciles
        "eventrails_operator_reconcile_errors_total",  # and errors
        "nats:stream_total_messages",  # stream figures
        "nats:consumer_num_pending",  # consumer figures
        "eventrails_outcomes_total",  # worker outcomes
        "eventrails_dead_lettered_total",  # dead letters
        "eventrails_outbox_oldest_pending_age_seconds",  # outbox lag
    }
    assert expected <= used, sorted(expected - used)


def test_dashboard_is_well_formed() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert dashboard["uid"] == "eventrails-overview"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            for variable in re.findall(r"\$\{?([a-z_]+)", target["expr"]):
                assert variable.startswith("__") or variable in variables, (variable, target["expr"])
