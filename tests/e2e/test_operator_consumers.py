"""Consumers on a real API server: durable consumers, worker Deployments, KEDA, drift and garbage collection.

There is no kubelet here, so a worker "pod" is the Deployment's container run as a local
process (``run_worker_from_deployment``): the command and env come from the live object.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eventrails._natsserver import NatsServer
from tests.e2e.fixtures.harness import (  # noqa: F401 - fixtures
    Kube,
    NatsProbe,
    Operators,
    eventrails_crds,
    eventually,
    keda_crd,
    kube,
    operators,
    probe,
    run_worker_from_deployment,
    stop_and_check,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

WORKER_MODULE = textwrap.dedent('''
    """A worker image's code, for the e2e tests: it records what it handled in HANDLED_LOG."""
    import os

    from eventrails import Worker

    worker = Worker()


    @worker.task("send-email")
    async def send_email(payload: dict, ctx) -> None:
        with open(os.environ["HANDLED_LOG"], "a") as log:
            log.write(f"{payload['orderId']} {ctx.msg_id} delivery={ctx.delivery}\\n")
''')


def payloads(count: int) -> list[dict[str, Any]]:
    return [{"organizationId": "org-1", "projectId": "prj-1", "orderId": f"o-{index}"} for index in range(count)]


def test_consumer_workers_drain_it(
    kube: Kube, probe: NatsProbe, operators: Operators, tmp_path: Path,
) -> None:
    namespace = kube.namespace
    stream = f"{namespace}_orders"
    handled = tmp_path / "handled.log"
    operator = operators.start()
    kube.apply("Topic", "orders", {"tasks": ["send-email", "charge-card"]})
    kube.apply("Consumer", "mailer", {
        "topic": "orders", "names": ["send-email"], "handler": "shopworkers:worker", "replicas": 2,
        "template": {"env": [{"name": "HANDLED_LOG", "value": str(handled)}]},
    })
    kube.wait_ready("consumers", "mailer")
    assert probe.consumer(stream, "mailer") is not None

    # The worker Deployment belongs to the Consumer and runs the handler.
    deployment = kube.deployment("mailer-worker")
    assert deployment is not None
    consumer = kube.get("consumers", "mailer") or {}
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Consumer", "mailer", consumer["metadata"]["uid"])
    assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["eventrails", "worker", "shopworkers:worker"]

    # Pending messages show in `kubectl get consumers` once the resync reads them.
    probe.publish(f"eventrails.{namespace}.orders.send-email", payloads(4))

    def pending(count: int) -> Callable[[], list[list[str]]]:
        def check() -> list[list[str]]:
            rows = kube.table("consumers")
            assert rows[1][:6] == ["mailer", "True", "orders", "mailer", str(count), "2"], rows
            return rows
        return check

    rows = eventually(pending(4), "kubectl get consumers to show 4 pending")
    assert rows[0] == ["NAME", "READY", "TOPIC", "CONSUMER", "PENDING", "REPLICAS", "AGE"]

    # One "pod" of the Deployment, run locally with the container's command and env, drains the consumer.
    (tmp_path / "shopworkers.py").write_text(WORKER_MODULE)
    pod = run_worker_from_deployment(kube, "mailer-worker", code_dir=tmp_path, log_path=tmp_path / "pod.log")
    try:
        eventually(pod.ready, "the local worker pod to report ready", timeout=30)

        def drained() -> bool:
            info = probe.consumer(stream, "mailer")
            assert info is not None and (info.num_pending, info.num_ack_pending) == (0, 0), info
            return handled.exists() and len(handled.read_text().splitlines()) == 4

        eventually(drained, "the worker to handle and acknowledge all 4 messages")
        assert sorted(line.split()[0] for line in handled.read_text().splitlines()) == ["o-0", "o-1", "o-2", "o-3"]
        eventually(pending(0), "kubectl get consumers to show 0 pending")
    finally:
        assert pod.stop() == 0, pod.log()
    # A work-queue stream removes what its consumer acknowledged.
    info = probe.stream(stream)
    assert info is not None and info.state.messages == 0

    # A second Consumer for the same names of a work-queue Topic is refused by JetStream.
    kube.apply("Consumer", "copycat", {"topic": "orders", "names": ["send-email"], "handler": "shopworkers:worker"})
    refused = kube.wait_failed("consumers", "copycat", "OverlappingConsumers")
    assert "err_code 10100" in refused["message"] and "spec.names" in refused["message"]
    assert kube.deployment("copycat-worker") is None

    messages = kube.event_messages("mailer")
    assert any("consumer mailer created" in message for message in messages), messages
    assert any("created worker Deployment mailer-worker" in message for message in messages), messages
    stop_and_check(operator)


def test_resync_repairs_drift(
    kube: Kube, probe: NatsProbe, operators: Operators, nats_server: NatsServer,
) -> None:
    namespace = kube.namespace
    stream = f"{namespace}_alerts"
    operator = operators.start()
    kube.apply("Topic", "alerts", {"events": ["DiskFull"], "storage": "memory"})
    kube.apply("Consumer", "pager", {"topic": "alerts", "handler": "ops.workers:worker"})
    kube.wait_ready("topics", "alerts")
    kube.wait_ready("consumers", "pager")

    # A consumer deleted behind the operator's back comes back at the next resync.
    probe.clear_writes()
    probe.delete_consumer(stream, "pager")
    eventually(lambda: probe.consumer(stream, "pager"), "the resync to recreate the deleted consumer")
    assert probe.writes() == [f"$JS.API.CONSUMER.CREATE.{stream}.pager.eventrails.{namespace}.alerts.DiskFull"]

    # A restart of NATS loses memory streams; the resync recreates the streams and the consumer.
    nats_server.stop()
    nats_server.start()
    probe.clear_writes()
    eventually(lambda: probe.consumer(stream, "pager"), "the resync to recreate the memory stream and its consumer")
    info = probe.stream(stream)
    assert info is not None and str(getattr(info.config.storage, "value", info.config.storage)) == "memory"
    writes = probe.writes()
    assert f"$JS.API.STREAM.CREATE.{stream}" in writes and f"$JS.API.STREAM.CREATE.{stream}_dlq" in writes, writes
    kube.wait_ready("topics", "alerts")
    kube.wait_ready("consumers", "pager")
    assert operator.metric("eventrails_operator_jetstream_writes_total", kind="consumer", action="created") >= 3
    stop_and_check(operator)


def test_autoscaling_with_and_without_keda(
    kube: Kube, probe: NatsProbe, operators: Operators, keda_crd: Callable[[], None],
) -> None:
    namespace = kube.namespace
    operator = operators.start()
    autoscaling = {"minReplicas": 0, "maxReplicas": 5, "lagTarget": 20}
    # The Topic comes later: nothing scales a consumer that does not exist yet.
    kube.apply("Consumer", "resizer", {"topic": "images", "names": ["resize"], "handler": "media.workers:worker",
                                        "autoscaling": autoscaling})
    kube.apply("Consumer", "fixed", {"topic": "images", "names": ["thumbnail"], "handler": "media.workers:worker",
                                     "replicas": 3})
    kube.wait_failed("consumers", "resizer", "TopicNotFound")
    assert kube.deployment("resizer-worker") is None

    # Without KEDA, autoscaling means fixed replicas: the minimum, at least one.
    kube.apply("Topic", "images", {"tasks": ["resize", "thumbnail"]})
    kube.wait_ready("consumers", "resizer")
    kube.wait_ready("consumers", "fixed")
    deployment = kube.deployment("resizer-worker")
    assert deployment is not None and deployment["spec"]["replicas"] == 1
    assert "KEDA is not installed" in kube.condition("consumers", "resizer")["message"]

    # With KEDA's CRD, the next resync creates a ScaledObject owned by the Consumer.
    keda_crd()
    scaled = eventually(lambda: kube.scaled_object("resizer-worker"), "the ScaledObject of Consumer resizer")
    consumer = kube.get("consumers", "resizer") or {}
    owner = scaled["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Consumer", "resizer", consumer["metadata"]["uid"], True)
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": "resizer-worker"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 5)
    [trigger] = scaled["spec"]["triggers"]
    assert trigger == {"type": "nats-jetstream", "metadata": {
        "natsServerMonitoringEndpoint": "127.0.0.1:8222", "account": "$G", "stream": f"{namespace}_images",
        "consumer": "resizer", "lagThreshold": "20", "useHttps": "false",
    }}
    assert kube.scaled_object("fixed-worker") is None
    # Even with KEDA, nothing scales a consumer before it exists.
    kube.apply("Consumer", "encoder", {"topic": "videos", "handler": "media.workers:worker",
                                       "autoscaling": autoscaling})
    kube.wait_failed("consumers", "encoder", "TopicNotFound")
    assert kube.scaled_object("encoder-worker") is None and kube.deployment("encoder-worker") is None
    kube.wait_generation_ready("consumers", "resizer", 1)
    eventually(lambda: "KEDA ScaledObject resizer-worker scales the workers from 0 to 5"
               in kube.condition("consumers", "resizer")["message"], "the Ready message to name the ScaledObject")

    # KEDA owns the replica count now: the operator leaves a scaled Deployment alone.
    kube.kubectl("scale", "deployment", "resizer-worker", "--replicas=4")
    operator.wait_resyncs("Consumer", 4)
    assert (kube.deployment("resizer-worker") or {})["spec"]["replicas"] == 4

    # A new lag target updates the ScaledObject in place.
    kube.patch("consumers", "resizer", {"spec": {"autoscaling": {**autoscaling, "lagTarget": 50}}})
    eventually(lambda: (kube.scaled_object("resizer-worker") or {})["spec"]["triggers"][0]["metadata"]
               ["lagThreshold"] == "50", "the ScaledObject to take the new lag target")

    # Back to fixed replicas: the ScaledObject goes and the operator sets the count again.
    kube.kubectl("patch", "consumer", "resizer", "--type=json", "-p",
                 '[{"op": "remove", "path": "/spec/autoscaling"}, {"op": "add", "path": "/spec/replicas", "value": 2}]')
    eventually(lambda: kube.scaled_object("resizer-worker") is None, "the ScaledObject to be deleted")
    eventually(lambda: (kube.deployment("resizer-worker") or {})["spec"]["replicas"] == 2,
               "the Deployment to get its fixed 2 replicas back")
    stop_and_check(operator)


def test_workers_garbage_collected(
    kube: Kube, probe: NatsProbe, operators: Operators,
) -> None:
    operator = operators.start()
    kube.apply("Topic", "ledger", {"tasks": ["post-entry"]})
    kube.apply("Consumer", "poster", {"topic": "ledger", "handler": "ledger.workers:worker"})
    kube.wait_ready("consumers", "poster")
    assert kube.deployment("poster-worker") is not None

    # With the operator stopped and its finalizer removed, deleting the Consumer leaves the
    # Deployment to the garbage collector of kube-controller-manager, through its owner reference.
    stop_and_check(operator)
    kube.kubectl("patch", "consumer", "poster", "--type=json", "-p",
                 '[{"op": "remove", "path": "/metadata/finalizers"}]')
    kube.kubectl("delete", "consumer", "poster", "--wait=true", "--timeout=30s", timeout=40)
    eventually(lambda: kube.deployment("poster-worker") is None, "the garbage collector to delete the Deployment",
               timeout=60)
    # The operator never ran the deletion, so the JetStream consumer is still there.
    assert probe.consumer(f"{kube.namespace}_ledger", "poster") is not None
