"""Prometheus metrics of a worker, labelled by topic and name, in a registry of their own.

Each dispatcher gets its own ``CollectorRegistry`` so several can run in one process
(tests, local mode) without clashing over metric names in the global registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
