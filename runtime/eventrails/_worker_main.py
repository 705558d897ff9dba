"""The worker process: the composition root behind ``eventrails worker module:object``.

It reads ``WorkerSettings`` from ``EVENTRAILS_*`` variables, imports the Worker object,
starts the health server, connects to NATS (waiting as long as it takes, with readiness
failing meanwhile), runs the dispatcher until SIGTERM or SIGINT, and drains.

Exit codes: 0 after a clean stop, 2 for bad settings or a bad handler reference, 1 for
anything unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from typing import Any

import pydantic

from eventrails._connect import connect
from eventrails._dispatcher import Dispatcher, run_event_loop
from eventrails._errors import ConfigurationError
from eventrails._health import HealthServer
from eventrails._metrics import Metrics
from eventrails._settings import WorkerSettings
from eventrails._worker import Worker

logger = logging.getLogger("eventrails.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIGURATION = 2


def load_worker(reference: str) -> Worker:
    """Import ``module:object`` and return the Worker it names.

    The current directory is searched first, as ``python -m`` would, so a worker module
    next to where the command runs is found. Raises ConfigurationError when the module
    or object is missing or the object is not a Worker. An ImportError raised inside the
    module itself propagates unchanged, because it is a bug in that module.
    """
    module_name, separator, attribute = reference.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigurationError(
            f"handler {reference!r} is invalid: use 'module:object', such as 'billing.workers:worker'"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(f"{error.name}.")):
            searched = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
            searched.append(cwd)
            raise ConfigurationError(
                f"handler {reference!r}: module {module_name!r} not found in {', '.join(searched)} or the "
                "installed packages; fix the module path, install the package that provides it, or with "
                "`eventrails up` point --python-path at the directory that contains it"
            ) from error
        raise

    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(
                f"handler {reference!r}: module {module_name!r} has no attribute {attribute!r}; "
                "name the module-level Worker object, such as 'worker'"
            )
        target = getattr(target, part)
    if not isinstance(target, Worker):
        raise ConfigurationError(
            f"handler {reference!r} is a {type(target).__name__}, not an eventrails Worker; "
            "point it at the object created with Worker()"
        )
    return target


def _describe_setting_error(item: Any) -> str:
    variable = f"EVENTRAILS_{'_'.join(str(part) for part in item['loc']).upper()}"
    shown = "" if "PASSWORD" in variable else f" (got {item.get('input')!r})"
    return f"{variable}: {item['msg']}{shown}"


def run_worker(handler: str | None) -> int:
    """Run a worker until SIGTERM or SIGINT and return the process exit code.

    ``handler`` ('module:object') overrides EVENTRAILS_HANDLER.
    """
    try:
        settings = WorkerSettings()
    except pydantic.ValidationError as error:
        problems = "; ".join(_describe_setting_error(item) for item in error.errors())
        logger.error("invalid worker settings: %s", problems)
        return EXIT_CONFIGURATION

    reference = handler or settings.handler
    try:
        if not reference:
            raise ConfigurationError(
                "no handler given: pass 'module:object' to `eventrails worker` or set EVENTRAILS_HANDLER"
            )
        worker = load_worker(reference)
        settings = settings.model_copy(update={"handler": reference})
        return run_event_loop(_serve(worker, settings))
    except ConfigurationError as error:
        logger.error("worker cannot start: %s", error)
        return EXIT_CONFIGURATION
    except Exception:  # noqa: BLE001 - the process reports and exits
        logger.exception("worker %s failed; exiting", reference)
        return EXIT_FAILED


async def _serve(worker: Worker, settings: WorkerSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    dispatcher: Dispatcher | None = None

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.info("%s received again; still draining (up to %.0fs)", name, settings.drain_timeout)
            return
        logger.info("%s received: draining and exiting", name)
        stop.set()
        if dispatcher is not None:
            dispatcher.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    def readiness() -> tuple[bool, str]:
        if dispatcher is None:
            return False, "connecting to NATS"
        return dispatcher.readiness()

    metrics = Metrics()
    health = HealthServer(settings.health_host, settings.health_port, readiness, metrics)
    await health.start()
    try:
        logger.info(
            "worker %s starting for consumer %s on topic %s in namespace %s",
            settings.handler, settings.consumer, settings.topic, settings.namespace,
        )
        # Wait for NATS as long as it takes; a stop signal ends the wait.
        connecting = asyncio.create_task(connect(settings, name=f"eventrails-worker-{settings.consumer}", deadline=None))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            logger.info("stopped before connecting to NATS")
            return EXIT_OK
        nc = connecting.result()

        try:
            dispatcher = Dispatcher(worker, settings, nc, metrics=metrics)
            if stop.is_set():
                dispatcher.stop()
            await dispatcher.run()
        finally:
            try:
                await nc.close()
            except Exception as error:  # noqa: BLE001 - the process exits either way
                logger.warning("closing the NATS connection failed: %s", error)
    finally:
        await health.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("worker %s exited cleanly", settings.handler)
    return EXIT_OK
