"""Prometheus metrics of a worker, labelled by topic and name, in a registry of their own.

Each dispatcher gets its own ``CollectorRegistry`` so several can run in one process
(tests, local mode) without clashing over metric names in the global registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "NameMetrics"]

# Handler durations from a few milliseconds to the longest ack waits people configure.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class Metrics:
    """The counters, gauges and histograms one worker process exposes on /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("topic", "name")
        self.received = Counter(
            "eventrails_messages_received", "Messages fetched from the consumer.", labels, registry=self.registry
        )
        self.redeliveries = Counter(
            "eventrails_redeliveries", "Messages fetched again after an earlier delivery.", labels,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "eventrails_outcomes", "Handled messages by outcome (done, retry, skip, dead_letter).",
            (*labels, "outcome"), registry=self.registry,
        )
        self.dead_lettered = Counter(
            "eventrails_dead_lettered", "Messages moved to the dead-letter stream (or terminated without one).",
            labels, registry=self.registry,
        )
        self.duration = Histogram(
            "eventrails_handler_duration_seconds", "Time handlers took, whatever their outcome.", labels,
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "eventrails_in_flight", "Messages being handled right now.", labels, registry=self.registry
        )
        self.fetch_errors = Counter(
            "eventrails_fetch_errors", "Failed fetches from the consumer (the loop backs off and goes on).",
            ("topic",), registry=self.registry,
        )
        self.ready = Gauge(
            "eventrails_ready", "1 while connected to NATS with the consumer bound.", registry=self.registry
        )

        self._names: dict[tuple[str, str], NameMetrics] = {}

    def for_name(self, topic: str, name: str) -> NameMetrics:
        """Return the counts of ``topic`` and ``name``, kept for the life of these metrics."""
        found = self._names.get((topic, name))
        if found is None:
            found = self._names[(topic, name)] = NameMetrics(self, topic, name)
        return found

    def render(self) -> bytes:
        for counts in list(self._names.values()):
            counts.flush()
        return generate_latest(self.registry)


class NameMetrics:
    """Per-message counts of one topic and name, written into the labelled series on render.

    A worker handling thousands of messages a second would spend more time in
    prometheus-client (a lock and a label lookup per update, five updates a message) than
    in dispatching them. So the dispatcher adds to plain integers here, and ``flush``
    (called by ``Metrics.render``, that is on every scrape) moves them into the series.
    Handler durations go into their histogram at once. A series still appears with the
    first message that touches it.
    """

    __slots__ = ("_flushed", "_labels", "_metrics", "_series", "in_flight", "outcomes", "received", "redelivered")

    def __init__(self, metrics: Metrics, topic: str, name: str) -> None:
        self._metrics = metrics
        self._labels = (topic, name)
        self._series: dict[str, Any] = {}
        self.received = 0
        self.redelivered = 0
        self.in_flight = 0
        self.outcomes: dict[str, int] = {}
        self._flushed: dict[str, int] = {}

    def _get(self, metric: str, *extra: str) -> Any:
        key = f"{metric}:{extra[0]}" if extra else metric
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = getattr(self._metrics, metric).labels(*self._labels, *extra)
        return series

    @property
    def duration(self) -> Any:
        return self._series.get("duration") or self._get("duration")

    @property
    def dead_lettered(self) -> Any:
        return self._series.get("dead_lettered") or self._get("dead_lettered")

    def outcome(self, kind: str) -> None:
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1

    def flush(self) -> None:
        """Add what was counted since the last flush to the series, and set the in-flight gauge."""
        counts = {"received": self.received, "redeliveries": self.redelivered}
        counts.update({f"outcomes:{kind}": count for kind, count in list(self.outcomes.items())})
        for key, count in counts.items():
            delta = count - self._flushed.get(key, 0)
            if delta:
                metric, _, kind = key.partition(":")
                series = self._get(metric, kind) if kind else self._get(metric)
                series.inc(delta)
                self._flushed[key] = count
        if self.received:
            self._get("in_flight").set(self.in_flight)
