"""Test helpers: pytest fixtures that start real servers on 127.0.0.1 and free ports.

Enable them with ``pytest_plugins = ["eventrails.testing"]`` in a conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from eventrails._natsserver import NatsServer, start_cluster

__all__ = ["NatsServer", "nats_server", "nats_cluster", "start_cluster"]


@pytest.fixture()
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single nats-server with JetStream, its own store in the test's temporary directory."""
    server = NatsServer(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three clustered nats-servers with JetStream, for tests where replication matters."""
    servers = start_cluster(3, base_dir=tmp_path / "cluster")
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
