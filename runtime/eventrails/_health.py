"""The worker's HTTP endpoints for Kubernetes probes and Prometheus (aiohttp).

- ``/healthz``: the process is alive and its event loop keeps running (liveness);
- ``/readyz``: connected to NATS with the consumer bound (readiness);
- ``/metrics``: the worker's Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiohttp import web

from eventrails._metrics import CONTENT_TYPE_LATEST, Metrics

logger = logging.getLogger("eventrails.health")

# How often the watchdog ticks, and how late a tick may be before /healthz fails: a loop
# blocked this long by a synchronous call in a handler is not healthy.
_TICK = 1.0
_STALL_LIMIT = 30.0

ReadinessCheck = Callable[[], tuple[bool, str]]


class HealthServer:
    """Serves /healthz, /readyz and /metrics on ``host:port``; port 0 picks a free port."""

    def __init__(self, host: str, port: int, readiness: ReadinessCheck, metrics: Metrics) -> None:
        self._host = host
        self._port = port
        self._readiness = readiness
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_tick = time.monotonic()
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else self._port
        self._watchdog = asyncio.create_task(self._tick(), name="eventrails-health-watchdog")
        logger.info("health server listening on %s:%s (/healthz, /readyz, /metrics)", self._host, self.port)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _tick(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            await asyncio.sleep(_TICK)

    async def _healthz(self, request: web.Request) -> web.Response:
        stalled = time.monotonic() - self._last_tick
        if stalled > _STALL_LIMIT:
            return web.Response(status=503, text=f"event loop stalled for {stalled:.0f}s\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, detail = self._readiness()
        return web.Response(status=200 if ready else 503, text=f"{detail}\n")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response
