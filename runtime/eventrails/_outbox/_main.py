"""The relay process: the composition root behind ``eventrails outbox relay``.

It reads ``NatsSettings`` (``EVENTRAILS_*``) and ``OutboxRelaySettings``
(``EVENTRAILS_OUTBOX_*``), starts the health server, connects to NATS (waiting as long as
it takes), and relays until SIGTERM or SIGINT. Local mode runs the same ``serve_relay``
coroutine inside ``eventrails up``.

Exit codes: 0 after a clean stop, 2 for bad settings, 1 for anything unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import cast

from eventrails._connect import connect
from eventrails._errors import ConfigurationError
from eventrails._health import HealthServer
from eventrails._metrics import Metrics
from eventrails._outbox._dsn import parse_dsn
from eventrails._outbox._relay import OutboxRelay, OutboxRelaySettings, RelayMetrics
from eventrails._outbox._schema import migrate_outbox
from eventrails._outbox._store import open_store
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.outbox")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIGURATION = 2


async def serve_relay(
    nats_settings: NatsSettings, settings: OutboxRelaySettings, stop: asyncio.Event, *, migrate: bool = False,
    health: bool = True,
) -> None:
    """Relay rows until ``stop`` is set. Raises ConfigurationError for a bad DSN or NATS credentials."""
    dsn = parse_dsn(settings.dsn)
    if migrate:
        await asyncio.to_thread(migrate_outbox, settings.dsn, settings.table)
    store = open_store(dsn, settings.table)
    metrics = RelayMetrics()
    relay: OutboxRelay | None = None

    def readiness() -> tuple[bool, str]:
        if relay is None:
            return False, "connecting to NATS"
        return relay.readiness()

    # HealthServer only calls render() on its metrics object, which RelayMetrics provides.
    server = HealthServer(settings.health_host, settings.health_port, readiness, cast(Metrics, metrics)) if health else None
    if server is not None:
        await server.start()
    try:
        # Wait for NATS as long as it takes; a stop signal ends the wait.
        connecting = asyncio.create_task(connect(nats_settings, name="eventrails-outbox-relay", deadline=None))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            logger.info("outbox relay stopped before connecting to NATS")
            return
        nc = connecting.result()
        try:
            relay = OutboxRelay(store, nc, nats_settings, settings, metrics=metrics)
            stopper = asyncio.create_task(_stop_when(stop, relay))
            try:
                await relay.run()
            finally:
                stopper.cancel()
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
            await store.close()
    finally:
        if server is not None:
            await server.stop()


async def _stop_when(stop: asyncio.Event, relay: OutboxRelay) -> None:
    await stop.wait()
    relay.stop()


def run_relay(nats_settings: NatsSettings, settings: OutboxRelaySettings, *, migrate: bool = False) -> int:
    """Run the relay until SIGTERM or SIGINT and return the process exit code."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            logger.info("%s received: finishing the current batch and exiting", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await serve_relay(nats_settings, settings, stop, migrate=migrate)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    try:
        asyncio.run(main())
    except ConfigurationError as error:
        logger.error("outbox relay cannot start: %s", error)
        return EXIT_CONFIGURATION
    except Exception:  # noqa: BLE001 - the process reports and exits
        logger.exception("outbox relay failed; exiting")
        return EXIT_FAILED
    return EXIT_OK
