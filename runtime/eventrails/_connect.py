"""Open a NATS connection from ``NatsSettings``: servers, credentials, TLS, and reconnect logging.

The client reconnects on its own after the first connection; the callbacks here only
log what happened and what happens next. ``connect`` bounds the first connection by a
deadline (or none, for workers that should wait for NATS as long as it takes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from eventrails._errors import ConfigurationError, NatsUnavailable, translate
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.connect")

# Seconds between attempts while a server is down.
RECONNECT_WAIT = 2.0


def _is_settings_error(error: BaseException) -> bool:
    """Tell whether NATS refused the credentials or TLS settings, rather than being down."""
    return isinstance(translate(error, "connect"), ConfigurationError)


def _require_file(path: str, setting: str) -> str:
    if not Path(path).is_file():
        raise ConfigurationError(f"{setting}={path!r} is not a readable file; fix the path or unset {setting}")
    return path


def connect_options(settings: NatsSettings, name: str) -> dict[str, Any]:
    """Return the keyword arguments of ``nats.connect`` for these settings (without callbacks).

    Raises ConfigurationError when a credentials or TLS file named in the settings is missing.
    """
    options: dict[str, Any] = {
        "servers": list(settings.nats_servers),
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT,
    }
    if settings.nats_creds_file:
        options["user_credentials"] = _require_file(settings.nats_creds_file, "EVENTRAILS_NATS_CREDS_FILE")
    elif settings.nats_nkey_seed_file:
        options["nkeys_seed"] = _require_file(settings.nats_nkey_seed_file, "EVENTRAILS_NATS_NKEY_SEED_FILE")
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""

    if settings.nats_tls_ca_file or settings.nats_tls_cert_file:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if settings.nats_tls_ca_file:
            context.load_verify_locations(_require_file(settings.nats_tls_ca_file, "EVENTRAILS_NATS_TLS_CA_FILE"))
        if settings.nats_tls_cert_file:
            if not settings.nats_tls_key_file:
                raise ConfigurationError(
                    "EVENTRAILS_NATS_TLS_CERT_FILE is set without EVENTRAILS_NATS_TLS_KEY_FILE; set both for mutual TLS"
                )
            context.load_cert_chain(
                _require_file(settings.nats_tls_cert_file, "EVENTRAILS_NATS_TLS_CERT_FILE"),
                _require_file(settings.nats_tls_key_file, "EVENTRAILS_NATS_TLS_KEY_FILE"),
            )
        options["tls"] = context
    return options


def _servers(settings: NatsSettings) -> str:
    # Server URLs may carry user:password; log only scheme, host and port.
    display_urls = []
    for url in settings.nats_servers:
        scheme, _, rest = url.rpartition("://")
        display_urls.append(f"{scheme + '://' if scheme else ''}{rest.rpartition('@')[2]}")
    return ",".join(display_urls)


async def connect(settings: NatsSettings, name: str, deadline: float | None = 30.0) -> NATS:
    """Connect to NATS, retrying every few seconds until ``deadline`` seconds pass (None: forever).

    Raises ConfigurationError for invalid credentials or TLS settings, and NatsUnavailable
    when no server responded before the deadline. Both name the servers and the last error.
    """
    options = connect_options(settings, name)
    servers = _servers(settings)
    last_error: list[BaseException] = []

    async def on_error(error: Exception) -> None:
        last_error[:] = [error]
        if _is_settings_error(error):
            logger.error(
                "NATS at %s rejected the connection of %s: %s; check the credentials and TLS settings",
                servers, name, error,
            )
        else:
            logger.warning(
                "NATS error for %s at %s: %s: %s; retrying every %.0fs",
                name, servers, type(error).__name__, error, RECONNECT_WAIT,
            )

    async def on_disconnected() -> None:
        # nats-py reports a deliberate close as a disconnect too.
        if not client.is_closed:
            logger.warning("%s lost its NATS connection to %s; reconnecting", name, servers)

    async def on_reconnected() -> None:
        logger.info("%s reconnected to NATS at %s", name, client.connected_url.netloc if client.connected_url else servers)

    async def on_closed() -> None:
        logger.info("%s closed its NATS connection", name)

    client = NATS()
    try:
        await asyncio.wait_for(
            client.connect(
                error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
                closed_cb=on_closed, **options,
            ),
            timeout=deadline,
        )
    except asyncio.TimeoutError:
        await _close_quietly(client)
        cause = last_error[0] if last_error else None
        if cause is not None and _is_settings_error(cause):
            raise translate(cause, f"connect to NATS at {servers}") from cause
        detail = f"{type(cause).__name__}: {cause}" if cause else "no answer"
        raise NatsUnavailable(
            f"could not connect to NATS at {servers} within {deadline:.0f}s ({detail}); check "
            "EVENTRAILS_NATS_SERVERS, or start a local server with `eventrails up`"
        ) from cause
    except BaseException as error:
        await _close_quietly(client)
        if isinstance(error, Exception):
            raise translate(error, f"connect to NATS at {servers}") from error
        raise
    logger.info("%s connected to NATS at %s", name, servers)
    return client


async def _close_quietly(client: NATS) -> None:
    try:
        await client.close()
    except Exception as error:  # noqa: BLE001 - best effort while giving up
        logger.debug("closing a half-open NATS connection failed: %s", error)
