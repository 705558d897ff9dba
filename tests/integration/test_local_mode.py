"""Local mode end to end: the example manifests and app against a real nats-server and worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import pytest

from eventrails import Publisher
from eventrails._local import LocalStack
from eventrails._natsserver import NatsServer
from eventrails._naming import outcome_subject

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TENANCY = {"organizationId": "org-1", "projectId": "proj-1"}

BAD_MANIFESTS = """
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: mail}
spec: {tasks: [Send_Email]}
---
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: archive}
spec: {tasks: [store-file], retention: forever}
---
apiVersion: eventrails.dev/v1alpha1
kind: Consumer
metadata: {name: orphan}
spec: {topic: no-such-topic, handler: "app.jobs:worker"}
---
apiVersion: eventrails.dev/v1alpha1
kind: Consumer
metadata: {name: mailer}
spec: {topic: mail, handler: "app.jobs:worker"}
"""


def _manifest_dir(tmp_path: Path, *, bad: bool) -> Path:
    """Copy the example manifests, and optionally the bad ones, into a directory of their own."""
    directory = tmp_path / "manifests"
    shutil.copytree(EXAMPLES / "manifests", directory)
    if bad:
        (directory / "zz-bad.yaml").write_text(BAD_MANIFESTS)
    return directory


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def _eventually(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _ready(port: int, timeout: float) -> bool:
    """Poll a worker's /readyz on 127.0.0.1 until it returns 200 or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    return False


@pytest.fixture()
def app_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "app.sqlite3"
    monkeypatch.setenv("EXAMPLE_APP_DB", str(path))
    return path


@pytest.fixture()
async def stack(tmp_path: Path, app_db: Path) -> AsyncIterator[LocalStack]:
    local = LocalStack(
        [_manifest_dir(tmp_path, bad=True)], python_path=[EXAMPLES], store_dir=tmp_path / "nats",
        log_dir=tmp_path / "logs", ready_timeout=60,
    )
    async with local:
        yield local


async def test_up_reconciles_valid_and_skips_bad_manifests(stack: LocalStack) -> None:
    nc = await nats.connect(stack.nats_url)
    try:
        jsm = nc.jsm()
        streams = {info.config.name: info for info in await jsm.streams_info()}
        assert set(streams) == {"default_jobs", "default_jobs_dlq", "default_domain-events", "default_domain-events_dlq"}
        assert sorted(streams["default_jobs"].config.subjects or []) == [
            "eventrails.default.jobs.charge-card", "eventrails.default.jobs.purge-customer-data",
            "eventrails.default.jobs.send-email",
        ]
        consumers = {
            stream: sorted(info.name for info in await jsm.consumers_info(stream)) for stream in streams
        }
        assert consumers == {
            "default_jobs": ["jobs-worker"], "default_domain-events": ["domain-events-dispatcher"],
            "default_jobs_dlq": [], "default_domain-events_dlq": [],
        }
        jobs = await jsm.consumer_info("default_jobs", "jobs-worker")
        # One delivery above the spec's maxDeliver: the worker dead-letters on the last one.
        assert jobs.config.max_deliver == 4
    finally:
        await nc.close()

    rows = {(row.kind, row.name): row for row in stack.rows}
    for key in [("Topic", "jobs"), ("Topic", "domain-events"), ("Consumer", "jobs-worker"),
                ("Consumer", "domain-events-dispatcher")]:
        assert rows[key].ready == "True", rows[key]
    assert rows[("Consumer", "jobs-worker")].target == "default_jobs/jobs-worker"
    assert rows[("Consumer", "jobs-worker")].workers.startswith("1/1 ready (pid ")

    mail = rows[("Topic", "mail")]
    assert mail.ready == "Invalid"
    assert "spec.tasks[0]" in mail.message
    assert "'Send_Email'" in mail.message
    assert "lower-kebab-case" in mail.message
    archive = rows[("Topic", "archive")]
    assert archive.ready == "Invalid"
    assert "spec.retention" in archive.message
    assert "'forever'" in archive.message
    assert "workqueue" in archive.message
    orphan = rows[("Consumer", "orphan")]
    assert orphan.ready == "False"
    assert orphan.workers == "-"
    assert "spec.topic" in orphan.message
    assert "'no-such-topic'" in orphan.message
    assert not [worker for worker in stack.workers if worker.consumer.metadata.name == "orphan"]
    mailer = rows[("Consumer", "mailer")]
    assert mailer.ready == "False"
    assert "Topic 'mail' is invalid (see " in mailer.message
    assert not [worker for worker in stack.workers if worker.consumer.metadata.name == "mailer"]

    table = stack.status_table()
    assert table.splitlines()[0] == f"NATS: {stack.nats_url}"
    for name in ("default/jobs-worker", "default/mail", "default/archive", "default/orphan"):
        assert name in table


async def test_workers_handle_messages_and_stop_cleanly(stack: LocalStack, app_db: Path) -> None:
    settings = stack.nats_settings()
    nc = await nats.connect(stack.nats_url)
    announcements: asyncio.Queue[dict] = asyncio.Queue()

    async def collect(msg: nats.aio.msg.Msg) -> None:
        await announcements.put(json.loads(msg.data))

    await nc.subscribe(outcome_subject(settings.subject_prefix, settings.namespace, "*", "*"), cb=collect)
    await nc.flush()
    publisher = await Publisher.connect(settings)
    try:
        receipt = await publisher.enqueue(
            "jobs", "send-email", {**TENANCY, "customerId": "cus-1", "template": "welcome"}, dedupe_key="welcome-cus-1",
        )
        deleted = await publisher.enqueue("jobs", "send-email", {**TENANCY, "customerId": "cus-3", "template": "welcome"})
        # A retry may come first when the machine is busy; each message's last outcome counts.
        seen: dict[str, dict] = {}
        async with asyncio.timeout(30):
            while not {receipt.msg_id, deleted.msg_id} <= set(seen):
                item = await announcements.get()
                if item["outcome"] != "retry":
                    seen[item["msgId"]] = item
    finally:
        await publisher.close()
        await nc.close()

    assert seen[receipt.msg_id]["outcome"] == "done"
    assert seen[receipt.msg_id]["streamSeq"] == receipt.seq
    assert seen[deleted.msg_id]["outcome"] == "skip"
    assert seen[deleted.msg_id]["topic"] == "jobs"
    assert "cus-3 was deleted" in seen[deleted.msg_id]["reason"]
    with sqlite3.connect(app_db) as connection:
        assert connection.execute("SELECT customer_id, template FROM emails").fetchall() == [("cus-1", "welcome")]

    # Every worker leads its own process group, and stopping leaves none of them behind.
    groups = [worker.pid for worker in stack.workers if worker.pid is not None]
    assert len(groups) == 2
    assert all(os.getpgid(pid) == pid for pid in groups)
    server = stack.nats_server
    assert server is not None
    server_pid = server.pid
    assert server_pid is not None
    await stack.stop()
    assert all(_group_gone(pid) for pid in groups)
    assert _gone(server_pid)


async def test_exited_worker_is_restarted(stack: LocalStack, caplog: pytest.LogCaptureFixture) -> None:
    worker = next(worker for worker in stack.workers if worker.consumer.metadata.name == "jobs-worker")
    first_pid = worker.pid
    assert first_pid is not None

    os.killpg(first_pid, signal.SIGKILL)

    await _eventually(lambda: worker.pid not in (None, first_pid), 30, "the worker was not restarted")
    assert worker.restarts == 1
    assert await _ready(worker.health_port, timeout=30)
    restarts = [record.getMessage() for record in caplog.records if "exited unexpectedly" in record.getMessage()]
    assert len(restarts) == 1
    assert "default/jobs-worker[0]" in restarts[0]
    assert "restarting it in 1s" in restarts[0]


BROKEN_HANDLER = """
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata: {name: jobs}
spec: {tasks: [send-email]}
---
apiVersion: eventrails.dev/v1alpha1
kind: Consumer
metadata: {name: broken}
spec: {topic: jobs, handler: "no_such_module:worker"}
"""


async def test_given_url_with_broken_handler(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "jobs.yaml").write_text(BROKEN_HANDLER)

    async with LocalStack([tmp_path / "manifests"], nats_url=nats_server.url, log_dir=tmp_path / "logs") as local:
        assert local.nats_server is None
        rows = {(row.kind, row.name): row for row in local.rows}
        # The JetStream consumer is reconciled, but the row reports the worker that cannot start.
        assert rows[("Consumer", "broken")].ready == "False"
        assert rows[("Consumer", "broken")].workers.startswith("0/1 ready")
        assert "exited with code [2]" in rows[("Consumer", "broken")].message
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jsm().consumer_info("default_jobs", "broken")
            assert info.name == "broken"
        finally:
            await nc.close()

    assert nats_server.running
    # Exit code 2 is a configuration error: reported once, never restarted.
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "exited unexpectedly" in message]
    reported = [message for message in messages if "not restarting it" in message]
    assert len(reported) == 1
    assert "default/broken[0]" in reported[0]
    log = (tmp_path / "logs" / "default_broken-0.log").read_text()
    assert "no_such_module" in log


async def _read_until(stream: asyncio.StreamReader, pattern: str, timeout: float, seen: list[str]) -> None:
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError("eventrails up exited early:\n" + "".join(seen))
            seen.append(line.decode(errors="replace"))
            if re.search(pattern, seen[-1]):
                return


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
async def test_up_command_stops_cleanly(tmp_path: Path, app_db: Path, signum: signal.Signals) -> None:
    manifests = _manifest_dir(tmp_path, bad=True)
    # The handlers live in examples/app; copying them next to the manifests exercises the
    # PYTHONPATH rule: the manifest directory's parent comes first.
    shutil.copytree(EXAMPLES / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventrails", "up", "-f", str(manifests), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        await _read_until(process.stdout, r"press Ctrl-C to stop", 90, output)
        text = "".join(output)
        worker_pids = [int(pid) for pid in re.findall(r"ready \(pid (\d+)\)", text)]
        server_pid = int(re.search(r"started nats-server pid=(\d+)", text).group(1))  # type: ignore[union-attr]
        assert len(worker_pids) == 2, text
        assert re.search(r"Consumer\s+default/jobs-worker\s+True\s+default_jobs/jobs-worker\s+1/1 ready", text), text
        assert re.search(r"Topic\s+default/mail\s+Invalid.*spec\.tasks\[0\].*'Send_Email'", text), text
        assert (tmp_path / ".eventrails" / "nats").is_dir()

        # A second stack in the same directory must not start a server on the same store.
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventrails", "up", "-f", str(manifests), cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(60):
            second_output = (await second.communicate())[0].decode(errors="replace")
        assert second.returncode == 1, second_output
        assert "is in use by another `eventrails up`" in second_output

        process.send_signal(signum)
        async with asyncio.timeout(60):
            rest = await process.stdout.read()
            code = await process.wait()
        output.append(rest.decode(errors="replace"))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert code == 0, "".join(output)
    await _eventually(lambda: all(_group_gone(pid) for pid in worker_pids), 10, "worker processes were left behind")
    await _eventually(lambda: _gone(server_pid), 10, "nats-server was left behind")
    assert "stopping local mode" in "".join(output)


def test_demo_prints_every_outcome(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")], cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for msg_id, outcome in [
        ("welcome-cus-1", "done"), ("welcome-cus-3", "skip"), ("charge-inv-1", "done"), ("charge-inv-2", "retry -> done"),
        ("charge-poison", "dead_letter"), ("customer-deleted-cus-3", "done"), ("invoice-paid-inv-1", "done"),
        ("receipt-inv-1", "done"), ("receipt-inv-2", "done"), ("purge-cus-3", "done"),
    ]:
        assert re.search(rf"{re.escape(msg_id)}\s.*\s{re.escape(outcome)}(\s|$)", out, re.MULTILINE), (msg_id, out)
    assert re.search(r"^welcome email via the outbox\s+jobs/send-email\s+[0-9a-f-]{36}\s.*\sdone$", out, re.MULTILINE), out
    assert "Outcomes announced (one per delivery): done 10, retry 1, skip 1, dead_letter 1" in out, out
    assert "holds the poison message charge-poison" in out
