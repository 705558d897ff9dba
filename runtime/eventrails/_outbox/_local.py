"""The outbox relay inside local mode (``eventrails up --outbox-dsn ...``).

It runs in the ``eventrails up`` process, against the stack's own NATS, with the settings
a relay Deployment would get; the outbox table is created first if it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from eventrails._errors import EventrailsError
from eventrails._outbox._dberrors import describe
from eventrails._outbox._dsn import parse_dsn
from eventrails._outbox._main import serve_relay
from eventrails._outbox._relay import OutboxRelaySettings
from eventrails._outbox._schema import migrate_outbox
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.local")

# Local mode favours a quick reaction over fewer queries: SQLite has no notifications.
_LOCAL_POLL_INTERVAL = 0.25


class LocalRelayError(RuntimeError):
    """The outbox database named for local mode cannot be used."""


class LocalRelay:
    """One outbox relay task for local mode; ``start`` checks the database, ``stop`` waits for the task."""

    def __init__(self, dsn: str, nats_settings: NatsSettings) -> None:
        self.dsn = dsn
        self.display = dsn
        self._nats_settings = nats_settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the outbox table if needed and start relaying; raise LocalRelayError when the database is unusable."""
        try:
            self.display = parse_dsn(self.dsn).display
            settings = OutboxRelaySettings(dsn=self.dsn, poll_interval=_LOCAL_POLL_INTERVAL)
            await asyncio.to_thread(migrate_outbox, self.dsn, settings.table)
        except EventrailsError as error:
            raise LocalRelayError(f"outbox: {error}") from error
        except Exception as error:  # noqa: BLE001 - any database error means the relay cannot start
            raise LocalRelayError(f"outbox database {self.display}: {describe(error)}") from error
        self._task = asyncio.create_task(
            serve_relay(self._nats_settings, settings, self._stop, health=False), name="eventrails-outbox-relay",
        )
        logger.info("relaying outbox rows from %s to %s", self.display, ",".join(self._nats_settings.nats_servers))

    async def stop(self, timeout: float = 15.0) -> None:
        if self._task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            logger.warning("the outbox relay did not stop within %.0fs; cancelling it", timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        except Exception:  # noqa: BLE001 - stopping goes on
            logger.exception("the outbox relay failed")
