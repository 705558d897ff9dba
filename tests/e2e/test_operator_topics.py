"""The operator reconciles Topics on a real API server into streams on a real nats-server.

Each test runs ``python -m eventrails_operator`` on its own namespace and nats-server, with
a resync every 2 seconds. A second NATS connection (``probe``) receives every JetStream write
request the operator sends, so "in sync" is checked as "nothing was written".
"""

from __future__ import annotations

import pytest

from eventrails._natsserver import NatsServer
from tests.e2e.fixtures.harness import (  # noqa: F401 - fixtures
    Kube,
    NatsProbe,
    Operators,
    enum_value,
    eventrails_crds,
    eventually,
    kube,
    operators,
    probe,
    stop_and_check,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

PAYLOAD = {"organizationId": "org-1", "projectId": "prj-1"}


def test_topic_create_update_and_resync(
    kube: Kube, probe: NatsProbe, operators: Operators,
) -> None:
    namespace = kube.namespace
    stream = f"{namespace}_orders"
    operator = operators.start()

    # Create: `kubectl wait` finds the Ready condition, and JetStream received exactly two creates.
    kube.apply("Topic", "orders", {"tasks": ["send-email"], "limits": {"maxAge": "1h"}})
    kube.wait_ready("topics", "orders")
    assert probe.writes() == [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.CREATE.{stream}_dlq"]
    info = probe.stream(stream)
    assert info is not None and info.config.max_age == 3600.0

    # Status figures follow the stream: the resync counts published messages, and
    # `kubectl get` shows them in the printer columns.
    probe.publish(f"eventrails.{namespace}.orders.send-email", [PAYLOAD] * 3)

    def counted() -> list[list[str]]:
        rows = kube.table("topics")
        assert rows[1][:5] == ["orders", "True", stream, "3", "0"], rows
        return rows

    rows = eventually(counted, "kubectl get topics to show 3 messages")
    assert rows[0] == ["NAME", "READY", "STREAM", "MESSAGES", "DEAD", "AGE"]
    wide = kube.table("topics", "-o", "wide")
    assert wide[0][5] == "REASON", wide
    assert wide[1][5] == "Reconciled", wide

    # Update: a new task name and a longer maxAge are one stream update.
    probe.clear_writes()
    kube.patch("topics", "orders", {"spec": {"tasks": ["send-email", "charge-card"], "limits": {"maxAge": "2h"}}})
    kube.wait_generation_ready("topics", "orders", 2)
    assert probe.writes() == [f"$JS.API.STREAM.UPDATE.{stream}"]
    info = probe.stream(stream)
    assert info is not None
    assert sorted(info.config.subjects or []) == [
        f"eventrails.{namespace}.orders.charge-card", f"eventrails.{namespace}.orders.send-email",
    ]
    assert info.config.max_age == 7200.0
    assert info.state.messages == 3
    status = (kube.get("topics", "orders") or {})["status"]
    assert status["subjects"] == [f"eventrails.{namespace}.orders.send-email",
                                  f"eventrails.{namespace}.orders.charge-card"]

    # In sync: resyncs read the streams and write nothing.
    probe.clear_writes()
    operator.wait_resyncs("Topic", 2)
    assert probe.writes() == []
    assert operator.metric("eventrails_operator_jetstream_writes_total", kind="stream", action="created") == 2
    assert operator.metric("eventrails_operator_jetstream_writes_total", kind="stream", action="updated") == 1

    # The changes reached the Topic as Kubernetes Events; kopf's routine lines did not.
    messages = kube.event_messages("orders")
    assert any(f"stream {stream} created" in message for message in messages), messages
    assert any(f"stream {stream} updated (subjects, max_age, metadata)" in message for message in messages), messages
    assert not any("succeeded" in message or "is processed" in message for message in messages), messages
    stop_and_check(operator)


def test_rejected_changes_keep_stream(
    kube: Kube, probe: NatsProbe, operators: Operators,
) -> None:
    namespace = kube.namespace
    stream = f"{namespace}_jobs"
    operator = operators.start()
    kube.apply("Topic", "jobs", {"tasks": ["resize-image"]})
    kube.wait_ready("topics", "jobs")

    # The API server refuses a storage change itself (a CEL transition rule), so nothing reaches the operator.
    refused = kube.kubectl("patch", "topic", "jobs", "--type=merge", "-p", '{"spec": {"storage": "memory"}}',
                           check=False)
    assert refused.returncode != 0
    assert "spec.storage is immutable: create a new Topic to change it" in refused.stderr
    assert (kube.get("topics", "jobs") or {})["metadata"]["generation"] == 1

    # Retention from workqueue to limits passes the API server; JetStream refuses it.
    probe.clear_writes()
    kube.patch("topics", "jobs", {"spec": {"retention": "limits"}})
    ready = kube.wait_failed("topics", "jobs", "ImmutableField")
    assert ready["observedGeneration"] == 2
    assert "spec.retention from workqueue to limits" in ready["message"]
    assert "err_code 10052" in ready["message"]
    assert kube.condition("topics", "jobs", "Degraded")["status"] == "True"
    info = probe.stream(stream)
    assert info is not None and enum_value(info.config.retention) == "workqueue"
    # One rejected update, not retried until the spec changes (the resync re-checks it).
    assert probe.writes()[0] == f"$JS.API.STREAM.UPDATE.{stream}"

    # Back to the default retention: Ready again, with no write (the stream never changed).
    kube.kubectl("patch", "topic", "jobs", "--type=json", "-p", '[{"op": "remove", "path": "/spec/retention"}]')
    kube.wait_generation_ready("topics", "jobs", 3)

    # Three replicas on a single server: JetStream rejects it and names the reason.
    kube.patch("topics", "jobs", {"spec": {"replicas": 3}})
    ready = kube.wait_failed("topics", "jobs", "JetStreamRejected")
    assert ready["message"].startswith("JetStream rejected changing spec.replicas from 1 to 3"), ready
    assert "err_code 10074" in ready["message"]
    info = probe.stream(stream)
    assert info is not None and info.config.num_replicas == 1

    # The failures are counted by reason, and the ready reconciles by trigger.
    assert operator.metric("eventrails_operator_reconcile_errors_total", kind="Topic", reason="ImmutableField") >= 1
    assert operator.metric("eventrails_operator_reconcile_errors_total", kind="Topic", reason="JetStreamRejected") >= 1
    assert operator.reconciles("Topic", "failed", "change") >= 2
    assert operator.metric("eventrails_operator_reconcile_duration_seconds_count", kind="Topic") >= 4
    warnings = [message for message in kube.event_messages("jobs") if "err_code 10074" in message]
    assert warnings, kube.event_messages("jobs")
    stop_and_check(operator)


def test_topic_deletion_policies_and_nats_outage(
    kube: Kube, probe: NatsProbe, operators: Operators, nats_server: NatsServer,
) -> None:
    namespace = kube.namespace
    operator = operators.start()
    kube.apply("Topic", "kept", {"tasks": ["archive"]})
    kube.apply("Topic", "gone", {"tasks": ["purge"], "deletionPolicy": "Delete"})
    kube.wait_ready("topics", "kept")
    kube.wait_ready("topics", "gone")
    assert probe.stream_names() == [f"{namespace}_gone", f"{namespace}_gone_dlq", f"{namespace}_kept",
                                    f"{namespace}_kept_dlq"]

    # Retain: the Topic goes, its streams and their messages stay.
    probe.publish(f"eventrails.{namespace}.kept.archive", [PAYLOAD])
    kube.delete("topics", "kept")
    eventually(lambda: kube.get("topics", "kept") is None, "Topic kept to be deleted")
    kept = probe.stream(f"{namespace}_kept")
    assert kept is not None and kept.state.messages == 1

    # Applying it again with another storage type meets the retained stream: JetStream
    # refuses the change, and the stream and its message stay as they were.
    kube.apply("Topic", "kept", {"tasks": ["archive"], "storage": "memory"})
    ready = kube.wait_failed("topics", "kept", "ImmutableField")
    assert "spec.storage from file to memory" in ready["message"]
    assert "err_code 10052" in ready["message"]
    kept = probe.stream(f"{namespace}_kept")
    assert kept is not None
    assert enum_value(kept.config.storage) == "file"
    assert kept.state.messages == 1

    # Delete, while NATS is down: the finalizer keeps the Topic and the deletion is retried.
    nats_server.stop()
    kube.delete("topics", "gone")

    def retried() -> bool:
        body = kube.get("topics", "gone")
        assert body is not None, "the Topic was released while NATS was down"
        progress = body["metadata"].get("annotations", {}).get("eventrails.dev/topic_deleted", "")
        assert '"retries": 1' in progress or '"retries":1' in progress or '"retries": 2' in progress, progress
        return bool(body["metadata"].get("deletionTimestamp"))

    eventually(retried, "the deletion to fail and be retried while NATS is down")
    assert kube.get("topics", "gone")["metadata"]["finalizers"] == ["eventrails.dev/finalizer"]  # type: ignore[index]

    # NATS returns: the next retry deletes both streams and releases the Topic.
    nats_server.start()
    eventually(lambda: kube.get("topics", "gone") is None, "Topic gone to be released once NATS is back")
    assert probe.stream_names() == [f"{namespace}_kept", f"{namespace}_kept_dlq"]
    stop_and_check(operator)
