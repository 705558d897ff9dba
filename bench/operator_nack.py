"""The operator against NACK's jetstream-controller: streams to Ready, resync writes, peak memory.

NACK (github.com/nats-io/nack) turns Stream custom resources into JetStream streams, one
resource per stream. This script does not build it: pass a jetstream-controller
binary and NACK's CRD file (deploy/crds.yml of the same version), with ``--nack-binary`` and
``--nack-crds`` or EVENTRAILS_NACK_BINARY and EVENTRAILS_NACK_CRDS. Without them only the
operator runs, and the reason is printed.

Each variant of each round gets a fresh control plane (from the cache that
scripts/build-controlplane.sh fills) and a fresh nats-server, all on 127.0.0.1, and the
variants run one after another, never together:

- ``eventrails``: ``python -m eventrails_operator`` and N Topics; each Topic makes a
  work-queue stream and its dead-letter stream, so N Topics are 2N streams.
- ``nack-<mode>-x1``: N Stream resources, the work-queue stream of each Topic.
- ``nack-<mode>-x2``: 2N Stream resources, the same 2N streams the N Topics make.
- ``bare-controller`` (with ``--bare``): bench/bare_controller.py and the same N Topics,
  a floor with only the required work and no resync pass.

The Stream specs come from the operator's own ``topic_streams`` for the same Topics, so
names, subjects, retention, storage, limits, duplicate window and metadata match. Each
controller is measured from the ``kubectl create`` of the resources until all report
Ready=True, then over one resync pass: a second NATS connection counts JetStream write
requests (STREAM.CREATE, STREAM.UPDATE, CONSUMER.CREATE) and STREAM.INFO reads; the pass
ends when every stream has been read once, or after ``--quiet-window`` seconds when the
controller reads none (NACK's legacy mode does not revisit a Stream whose spec is
unchanged). Peak memory is the controller process's VmHWM.

NACK modes: ``legacy`` is NACK's default; ``control-loop`` (``--control-loop``) is its
controller-runtime mode, run with ``--sync-interval`` equal to the operator's resync
interval. Note that in control-loop mode controller-runtime's metrics listener binds
``:8080`` (every interface) unless the binary was built to bind elsewhere.

    .venv/bin/python bench/operator_nack.py --nack-binary PATH --nack-crds PATH \\
        [--count 1000] [--rounds 3] [--bare] [--nack-mode legacy] [--nack-mode control-loop] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from _common import Table, load, write_section
from operator_topics import (
    NAMESPACE,
    REPO,
    CpuMeter,
    WriteCounter,
    list_manifest,
    measure_operator,
    memory_mib,
    prepare,
    ready_count,
    topic_items,
    topics_manifest,
    wait_for,
)

from eventrails._controlplane import ControlPlane
from eventrails._manifests import parse_resource
from eventrails._natsserver import NatsServer, free_port
from eventrails._resources import Topic
from eventrails_operator._desired import BusConnection, topic_streams

NACK_CRD = "streams.jetstream.nats.io"
MODES = ("legacy", "control-loop")
EVENTRAILS = "eventrails"
BARE = "bare-controller"


@dataclass
class Figures:
    """One controller's run over one batch of new resources."""

    variant: str
    resources: int
    streams: int
    create_seconds: float
    ready_seconds: float
    create_writes: int
    peak_rss: float
    # None when the variant has no resync (the bare controller).
    resync_writes: int | None
    resync_reads: int | None
    resync_seconds: float | None
    # CPU seconds of each process from the create until all were Ready, and the wall seconds.
    ready_cpu: dict[str, float] = field(default_factory=dict)


def _go_duration(seconds: float) -> str:
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds}s"


def _value(field: Any) -> str:
    return str(getattr(field, "value", field))


def nack_streams(count: int, streams_per_topic: int, nats_url: str) -> list[dict[str, Any]]:
    """Return NACK Stream resources for the streams of ``count`` bench Topics.

    With ``streams_per_topic`` 1 only the work-queue stream of each Topic, with 2 also its
    dead-letter stream.
    """
    bus = BusConnection(servers=(nats_url,))
    items = []
    for body in topic_items(count):
        topic = parse_resource(body)
        assert isinstance(topic, Topic)
        streams = topic_streams(topic, bus)
        configs = [streams.stream, streams.dead_letter][:streams_per_topic]
        for suffix, config in zip(("", "-dead-letter"), configs, strict=False):
            assert config is not None, "the bench Topics keep their dead-letter stream"
            spec: dict[str, Any] = {
                "name": config.name, "description": config.description, "subjects": config.subjects,
                "retention": _value(config.retention), "storage": _value(config.storage),
                "replicas": config.num_replicas, "maxBytes": config.max_bytes, "maxMsgs": config.max_msgs,
                "discard": _value(config.discard), "duplicateWindow": _go_duration(config.duplicate_window or 0),
                "metadata": config.metadata,
            }
            if config.max_age:
                spec["maxAge"] = _go_duration(config.max_age)
            items.append({"apiVersion": "jetstream.nats.io/v1beta2", "kind": "Stream",
                          "metadata": {"name": f"{body['metadata']['name']}{suffix}", "namespace": NAMESPACE},
                          "spec": spec})
    return items


class ChildController:
    """A controller as a child process: started once its log shows ``started_marker``, stopped with SIGTERM."""

    name = "controller"
    started_marker = ""
    # Seconds to wait after the marker, for the controller to finish starting.
    settle_seconds = 0.0

    def __init__(self, arguments: list[str], plane: ControlPlane, workdir: Path, log_name: str) -> None:
        self.arguments = arguments
        self.workdir = workdir
        self.log_path = workdir / log_name
        self.env = plane.environ()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        # The working directory contains the log (and NACK's cache directory).
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.arguments, cwd=self.workdir, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.started_marker not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.2)
        time.sleep(self.settle_seconds)

    def peak_rss_mib(self) -> float:
        assert self.process is not None
        return memory_mib(self.process.pid, "VmHWM")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


class NackController(ChildController):
    """NACK's jetstream-controller as a child process, watching the bench namespace."""

    name = "jetstream-controller"
    # Informers of an empty namespace sync within moments of the marker.
    settle_seconds = 2.0

    def __init__(self, binary: Path, mode: str, plane: ControlPlane, nats_url: str, sync_interval: float,
                 workdir: Path) -> None:
        arguments = [str(binary), "--namespace", NAMESPACE, "-s", nats_url, "--kubeconfig", str(plane.kubeconfig)]
        if mode == "control-loop":
            arguments += ["--control-loop", "--sync-interval", _go_duration(sync_interval),
                          "--health-probe-bind-address", f"127.0.0.1:{free_port()}"]
        super().__init__(arguments, plane, workdir, "jetstream-controller.log")
        # Legacy mode logs this line right before it connects and starts its informers. Control-loop
        # mode logs the other one as each of its controllers starts its worker.
        self.started_marker = "Running in LEGACY mode" if mode == "legacy" else "Starting workers"


def resync_pass(writes: WriteCounter, streams: int, window: float, timeout: float) -> tuple[int, int, float]:
    """Wait until every stream was read once, or ``window`` seconds passed without a read.

    Returns the write requests, the reads and the seconds of that pass.
    """
    writes_before, reads_before = writes.settle(), writes.settled_reads()
    began = time.monotonic()

    def done() -> bool:
        reads = writes.settled_reads() - reads_before
        elapsed = time.monotonic() - began
        return reads >= streams or (reads == 0 and elapsed >= window)

    wait_for(done, f"a resync pass over {streams} streams", timeout)
    return writes.settle() - writes_before, writes.settled_reads() - reads_before, time.monotonic() - began


def measure_nack(
    plane: ControlPlane, server: NatsServer, arguments: argparse.Namespace, mode: str, streams_per_topic: int,
    workdir: Path,
) -> Figures:
    prepare(plane, [arguments.nack_crds], [NACK_CRD])
    client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    api = kubernetes.client.CustomObjectsApi(client)
    writes = WriteCounter(server.url)
    controller = NackController(arguments.nack_binary, mode, plane, server.url, arguments.resync_interval, workdir)
    items = nack_streams(arguments.count, streams_per_topic, server.url)
    controller.start()
    try:
        assert controller.process is not None
        cpu = CpuMeter(controller.process.pid)
        began = time.monotonic()
        plane.kubectl("create", "-f", "-", input=list_manifest(items), timeout=arguments.timeout)
        create_seconds = time.monotonic() - began
        wait_for(lambda: ready_count(api, "jetstream.nats.io", "v1beta2", "streams") == len(items),
                 f"{len(items)} Streams to be Ready", arguments.timeout)
        ready_seconds = time.monotonic() - began
        ready_cpu = cpu.used()
        streams = writes.stream_count()
        create_writes = writes.settle()
        resync_writes, resync_reads, resync_seconds = resync_pass(writes, len(items), arguments.quiet_window,
                                                                  arguments.timeout)
        return Figures(
            variant=f"nack-{mode}-x{streams_per_topic}", resources=len(items), streams=streams,
            create_seconds=create_seconds, ready_seconds=ready_seconds, create_writes=create_writes,
            peak_rss=controller.peak_rss_mib(), resync_writes=resync_writes, resync_reads=resync_reads,
            resync_seconds=resync_seconds, ready_cpu=ready_cpu,
        )
    finally:
        controller.stop()
        writes.close()
        client.close()


def measure_eventrails(plane: ControlPlane, server: NatsServer, arguments: argparse.Namespace, workdir: Path) -> Figures:
    workdir.mkdir(parents=True, exist_ok=True)
    figures = measure_operator(plane, server, arguments.count, arguments.resync_interval, arguments.timeout,
                               workdir / "operator.log", restart=False)
    return Figures(
        variant=EVENTRAILS, resources=figures.count, streams=figures.streams, create_seconds=figures.create_seconds,
        ready_seconds=figures.ready_seconds, create_writes=figures.create_writes,
        peak_rss=max(figures.peak_rss_creating, figures.peak_rss_resync), resync_writes=figures.resync_writes,
        resync_reads=figures.resync_reads, resync_seconds=figures.resync_seconds, ready_cpu=figures.ready_cpu,
    )


class BareController(ChildController):
    """bench/bare_controller.py as a child process, watching the bench namespace."""

    name = "the bare controller"
    started_marker = "watching"

    def __init__(self, plane: ControlPlane, nats_url: str, workdir: Path) -> None:
        script = Path(__file__).with_name("bare_controller.py")
        super().__init__([sys.executable, str(script), "--nats", nats_url, "--namespace", NAMESPACE],
                         plane, workdir, "bare-controller.log")


def measure_bare(plane: ControlPlane, server: NatsServer, arguments: argparse.Namespace, workdir: Path) -> Figures:
    """Bring the same Topics as the operator's variant to Ready with the bare controller (no resync pass)."""
    prepare(plane, sorted((REPO / "crds").glob("*.yaml")), ["topics.eventrails.dev"])
    client = kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    api = kubernetes.client.CustomObjectsApi(client)
    writes = WriteCounter(server.url)
    controller = BareController(plane, server.url, workdir)
    controller.start()
    try:
        assert controller.process is not None
        cpu = CpuMeter(controller.process.pid)
        began = time.monotonic()
        plane.kubectl("create", "-f", "-", input=topics_manifest(arguments.count), timeout=arguments.timeout)
        create_seconds = time.monotonic() - began
        wait_for(lambda: ready_count(api) == arguments.count, f"{arguments.count} Topics to be Ready",
                 arguments.timeout)
        ready_seconds = time.monotonic() - began
        return Figures(
            variant=BARE, resources=arguments.count, streams=writes.stream_count(), create_seconds=create_seconds,
            ready_seconds=ready_seconds, create_writes=writes.settle(), peak_rss=controller.peak_rss_mib(),
            resync_writes=None, resync_reads=None, resync_seconds=None, ready_cpu=cpu.used(),
        )
    finally:
        controller.stop()
        writes.close()
        client.close()


def run_variant(name: str, measure: Callable[[ControlPlane, NatsServer, Path], Figures], keep: bool) -> Figures:
    root = Path(tempfile.mkdtemp(prefix=f"eventrails-bench-{name}-"))
    try:
        with ControlPlane(root_dir=root / "control-plane") as plane, NatsServer(store_dir=root / "nats") as server:
            figures = measure(plane, server, root / "controller")
    finally:
        if keep:
            print(f"kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    resync = ("no resync" if figures.resync_seconds is None else
              f"resync pass {figures.resync_seconds:.1f}s with {figures.resync_writes} writes and "
              f"{figures.resync_reads} reads")
    print(f"{figures.variant}: {figures.resources} resources, {figures.streams} streams, Ready in "
          f"{figures.ready_seconds:.1f}s (kubectl create {figures.create_seconds:.1f}s), "
          f"{figures.create_writes} writes to create; {resync}; peak RSS {figures.peak_rss:.0f} MiB; "
          f"CPU seconds until Ready: {_cpu_line(figures.ready_cpu)}; load {load()}", flush=True)
    return figures


def _cpu_line(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())


def nack_skip_reason(arguments: argparse.Namespace) -> str | None:
    if arguments.nack_binary is None or arguments.nack_crds is None:
        return ("no jetstream-controller binary and CRD file given "
                "(--nack-binary/--nack-crds or EVENTRAILS_NACK_BINARY/EVENTRAILS_NACK_CRDS)")
    for path in (arguments.nack_binary, arguments.nack_crds):
        if not path.is_file():
            return f"{path} does not exist"
    return None


def tables(results: list[list[Figures]], count: int) -> str:
    ready = Table(f"Seconds from the create until all Ready (N = {count:,})", "s")
    memory = Table("Peak RSS of the controller", "MiB")
    resync = Table("JetStream write requests during one resync pass", "writes")
    for round_results in results:
        for figures in round_results:
            ready.add(figures.variant, figures.ready_seconds)
            memory.add(figures.variant, figures.peak_rss)
            if figures.resync_writes is not None:
                resync.add(figures.variant, figures.resync_writes)
    nack = [variant for variant in ready.rows if variant.startswith("nack-")]
    for variant in [BARE, *nack]:
        if variant in ready.rows:
            ready.compare(EVENTRAILS, variant)
            memory.compare(EVENTRAILS, variant)
    if BARE in ready.rows:
        for variant in nack:
            ready.compare(BARE, variant)
    sections = [f"{table.title}\n\n{table.markdown()}" for table in (ready, memory, resync)]
    return "\n\n".join([*sections, cpu_table(results)])


def cpu_table(results: list[list[Figures]]) -> str:
    """Return the median CPU seconds of each process from the create until all were Ready."""
    names = ["controller", "kube-apiserver", "etcd", "nats-server"]
    lines = ["Median CPU seconds from the create until all Ready (2 cores give 2 CPU seconds a second)", "",
             "| Variant | wall s | " + " | ".join(names) + " | sum | sum / wall |",
             "|---|" + "---:|" * (len(names) + 3)]
    for variant in dict.fromkeys(figures.variant for round_results in results for figures in round_results):
        runs = [figures.ready_cpu for round_results in results for figures in round_results
                if figures.variant == variant]
        medians = {name: statistics.median(run.get(name, 0.0) for run in runs) for name in [*names, "wall"]}
        total = sum(medians[name] for name in names)
        lines.append(f"| {variant} | {medians['wall']:.1f} | " + " | ".join(f"{medians[name]:.1f}" for name in names)
                     + f" | {total:.1f} | {total / medians['wall']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="Topics of the operator run, and N (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--nack-binary", type=Path, default=os.environ.get("EVENTRAILS_NACK_BINARY") or None,
                        help="NACK jetstream-controller binary")
    parser.add_argument("--nack-crds", type=Path, default=os.environ.get("EVENTRAILS_NACK_CRDS") or None,
                        help="NACK's CRD file (deploy/crds.yml of the binary's version)")
    parser.add_argument("--nack-mode", action="append", choices=MODES,
                        help="NACK mode to run; repeat for both (default legacy)")
    parser.add_argument("--nack-streams-per-topic", type=int, action="append", choices=(1, 2),
                        help="Stream resources per Topic for NACK: 1 (N) or 2 (2N); repeat for both (default both)")
    parser.add_argument("--bare", action="store_true",
                        help="also run bench/bare_controller.py, a Topic controller with only the required work")
    parser.add_argument("--resync-interval", type=float, default=30.0,
                        help="operator resync interval and NACK control-loop sync interval, in seconds")
    parser.add_argument("--quiet-window", type=float, default=45.0,
                        help="seconds of a resync pass in which a controller reads no stream (default 45)")
    parser.add_argument("--timeout", type=float, default=900.0, help="maximum wait for any phase, in seconds")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the working directories (logs, data)")
    arguments = parser.parse_args()
    modes = arguments.nack_mode or ["legacy"]
    multiples = arguments.nack_streams_per_topic or [1, 2]

    variants: list[tuple[str, Callable[[ControlPlane, NatsServer, Path], Figures]]] = [
        (EVENTRAILS, lambda plane, server, workdir: measure_eventrails(plane, server, arguments, workdir)),
    ]
    if arguments.bare:
        variants.append((BARE, lambda plane, server, workdir: measure_bare(plane, server, arguments, workdir)))
    reason = nack_skip_reason(arguments)
    if reason:
        print(f"NACK skipped: {reason}", flush=True)
    else:
        for mode in modes:
            for multiple in multiples:
                variants.append((f"nack-{mode}-x{multiple}",
                                 lambda plane, server, workdir, mode=mode, multiple=multiple:
                                 measure_nack(plane, server, arguments, mode, multiple, workdir)))

    print(f"load average at the start: {load()}", flush=True)
    results: list[list[Figures]] = []
    for number in range(arguments.rounds):
        # Each round starts with another variant, so none always runs on the coolest machine.
        shift = number % len(variants)
        order = variants[shift:] + variants[:shift]
        print(f"round {number + 1}: {', '.join(name for name, _ in order)}", flush=True)
        results.append(sorted((run_variant(name, measure, arguments.keep) for name, measure in order),
                              key=lambda figures: [name for name, _ in variants].index(figures.variant)))
        if arguments.json:
            arguments.json.write_text(json.dumps([[asdict(f) for f in r] for r in results], indent=2))

    text = tables(results, arguments.count)
    print(f"\n{text}\n\nload average at the end: {load()}", flush=True)
    if arguments.write and reason:
        print("docs/benchmarks.md left as it is: without NACK its tables would lose the NACK figures", flush=True)
    elif arguments.write:
        write_section("operator-nack", f"{text}\n\nLoad average (1, 5, 15 min) at the end of the run: {load()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
