"""Operator restarts and several replicas: nothing duplicated, nothing lost, nothing rewritten.

JetStream writes are counted by a second NATS connection (``probe``); Kubernetes objects
are listed. Replicas share a kopf peering object, so the one of highest priority acts.
"""

from __future__ import annotations

import pytest
import yaml

from eventrails._controlplane import ControlPlane
from tests.e2e.fixtures.harness import (  # noqa: F401 - fixtures
    Kube,
    NatsProbe,
    OperatorProcess,
    Operators,
    eventrails_crds,
    eventually,
    kube,
    operators,
    peering_crds,
    probe,
    stop_and_check,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def creates(namespace: str, *topics: str) -> list[str]:
    return sorted(f"$JS.API.STREAM.CREATE.{namespace}_{topic}{suffix}" for topic in topics for suffix in ("", "_dlq"))


def test_restart_resumes_without_writes(
    kube: Kube, probe: NatsProbe, operators: Operators,
) -> None:
    namespace = kube.namespace
    first = operators.start("operator-a")
    kube.apply("Topic", "orders", {"tasks": ["send-email"]})
    kube.apply("Topic", "billing", {"events": ["InvoicePaid"]})
    kube.apply("Topic", "scratch", {"tasks": ["tidy"], "deletionPolicy": "Delete"})
    kube.apply("Consumer", "mailer", {"topic": "orders", "handler": "shop.workers:worker"})
    for plural, name in (("topics", "orders"), ("topics", "billing"), ("topics", "scratch"), ("consumers", "mailer")):
        kube.wait_ready(plural, name)
    stop_and_check(first)

    # While no operator runs: one Topic is added, one changed, one deleted (its finalizer keeps it).
    kube.apply("Topic", "audit", {"events": ["LoginFailed"]})
    kube.patch("topics", "billing", {"spec": {"limits": {"maxAge": "24h"}}})
    kube.delete("topics", "scratch")
    probe.clear_writes()

    # The next operator catches up on exactly those three, and resumes the rest without writing.
    second = operators.start("operator-b")
    kube.wait_ready("topics", "audit")
    kube.wait_generation_ready("topics", "billing", 2)
    eventually(lambda: kube.get("topics", "scratch") is None, "the deleted Topic to be finalized")
    second.wait_metric("eventrails_operator_reconciles_total", 4, "orders, billing, audit and mailer to be handled",
                       trigger="change", outcome="ready")
    assert sorted(probe.writes()) == sorted([*creates(namespace, "audit"), f"$JS.API.STREAM.UPDATE.{namespace}_billing"])
    assert probe.stream_names() == sorted(f"{namespace}_{topic}{suffix}" for topic in ("audit", "billing", "orders")
                                          for suffix in ("", "_dlq"))
    assert [info.name for info in probe.run(probe.client.jsm().consumers_info(f"{namespace}_orders"))] == ["mailer"]
    deployments = kube.apps.list_namespaced_deployment(namespace).items
    assert [item.metadata.name for item in deployments] == ["mailer-worker"]
    assert deployments[0].metadata.generation == 1  # the resume did not patch the workers

    # And its resyncs write nothing either.
    probe.clear_writes()
    second.wait_resyncs("Topic", 3)
    second.wait_resyncs("Consumer", 1)
    assert probe.writes() == []
    stop_and_check(second)


def _peers(plane: ControlPlane, namespace: str) -> dict[str, dict[str, object]]:
    body = yaml.safe_load(plane.kubectl("get", "kopfpeering", "eventrails", "-n", namespace, "-o", "yaml").stdout)
    return dict(body.get("status") or {})


def test_peered_replicas_one_acts(
    kube: Kube, probe: NatsProbe, operators: Operators, peering_crds: ControlPlane,
) -> None:
    namespace = kube.namespace
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "eventrails", "namespace": namespace}}
    ))
    peering = {"peering_name": "eventrails", "peering_lifetime": "10"}
    leader = operators.start("replica-a", peering_priority="200", **peering)
    eventually(lambda: "replica-a" in _peers(peering_crds, namespace), "replica-a to announce itself")
    # A replica starts paused, and stays paused when the peering shows a live peer of higher priority.
    standby = operators.start("replica-b", peering_priority="100", **peering)
    eventually(lambda: "replica-b" in _peers(peering_crds, namespace), "replica-b to announce itself")

    for name in ("orders", "billing", "audit"):
        kube.apply("Topic", name, {"tasks": ["run-job"]})
    kube.apply("Consumer", "runner", {"topic": "orders", "handler": "shop.workers:worker"})
    for name in ("orders", "billing", "audit"):
        kube.wait_ready("topics", name)
    kube.wait_ready("consumers", "runner")

    # Exactly one replica acted: one create per stream and consumer, all from replica-a.
    writes = probe.writes()
    assert sorted(write for write in writes if ".STREAM." in write) == creates(namespace, "orders", "billing", "audit")
    assert [write for write in writes if ".CONSUMER." in write] == [
        f"$JS.API.CONSUMER.CREATE.{namespace}_orders.runner.eventrails.{namespace}.orders.run-job"]
    assert leader.reconciles("Topic", trigger="change") == 3
    assert standby.metric("eventrails_operator_reconciles_total") == 0
    assert "Topic reconciled" in leader.log()
    assert "Topic reconciled" not in standby.log()
    assert "Resuming operations" not in standby.log()

    # The leader stops and leaves the peering; the standby resumes, rewrites nothing, and handles what comes next.
    probe.clear_writes()
    stop_and_check(leader)
    eventually(lambda: "Resuming operations after the pause" in standby.log(), "replica-b to resume")
    kube.apply("Topic", "late", {"tasks": ["run-job"]})
    kube.wait_ready("topics", "late")
    standby.wait_metric("eventrails_operator_reconciles_total", 5, "replica-b to resume the other objects",
                        trigger="change", outcome="ready")
    assert sorted(probe.writes()) == creates(namespace, "late")
    assert _peers(peering_crds, namespace).keys() == {"replica-b"}
    stop_and_check(standby)


def test_metrics_count_reconciles(kube: Kube, operators: Operators) -> None:
    operator: OperatorProcess = operators.start()
    kube.apply("Topic", "orders", {"tasks": ["send-email"]})
    kube.apply("Consumer", "mailer", {"topic": "missing", "handler": "shop.workers:worker"})
    kube.wait_ready("topics", "orders")
    kube.wait_failed("consumers", "mailer", "TopicNotFound")
    operator.wait_resyncs("Topic", 1)

    text = operator.scrape()
    for name in ("eventrails_operator_reconciles_total", "eventrails_operator_reconcile_errors_total",
                 "eventrails_operator_reconcile_duration_seconds_bucket", "eventrails_operator_jetstream_writes_total"):
        assert name in text, name
    assert operator.reconciles("Topic", "ready", "change") == 1
    assert operator.reconciles("Topic", "ready", "resync") >= 1
    assert operator.reconciles("Consumer", "retry", "change") >= 1
    assert operator.metric("eventrails_operator_reconcile_errors_total", kind="Consumer", reason="TopicNotFound") >= 1
    assert operator.metric("eventrails_operator_reconcile_duration_seconds_count", kind="Topic") >= 2
    assert operator.metric("eventrails_operator_jetstream_writes_total", kind="stream", action="created") == 2
    stop_and_check(operator)
