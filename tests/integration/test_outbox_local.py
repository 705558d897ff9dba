"""Local mode with an outbox: ``eventrails up --outbox-dsn`` creates the table and relays its rows."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import nats
import pytest

from eventrails import ContractRegistry, SQLiteOutbox
from eventrails._local import LocalModeError, LocalStack

pytestmark = pytest.mark.integration

TOPIC = """\
apiVersion: eventrails.dev/v1alpha1
kind: Topic
metadata:
  name: jobs
spec:
  tasks: [send-email]
"""


async def test_local_mode_relays_the_outbox(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "topics.yaml").write_text(TOPIC)
    database = tmp_path / "app.db"

    async with LocalStack([manifests], store_dir=tmp_path / "nats", outbox_dsn=f"sqlite:///{database}") as stack:
        assert "Outbox" in stack.status_table()
        with contextlib.closing(sqlite3.connect(database)) as connection, connection:
            row = SQLiteOutbox(connection, ContractRegistry.from_manifests([manifests])).enqueue(
                "jobs", "send-email", {"organizationId": "org-1", "projectId": "proj-1", "customerId": "cus-1"},
            )
        nc = await nats.connect(stack.nats_url)
        try:
            js = nc.jetstream()
            for _ in range(100):
                if (await js.stream_info("default_jobs")).state.messages:
                    break
                await asyncio.sleep(0.1)
            stored = await js.get_msg("default_jobs", 1)
        finally:
            await nc.close()
    assert (stored.headers or {})["Nats-Msg-Id"] == row.msg_id


async def test_local_mode_refuses_a_bad_outbox_dsn(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "topics.yaml").write_text(TOPIC)
    with pytest.raises(LocalModeError, match="outbox: .*neither PostgreSQL nor SQLite"):
        async with LocalStack([manifests], store_dir=tmp_path / "nats", outbox_dsn="mysql://db/app"):
            pass
