"""Resolve which NATS system an object lives on, and keep one connection per EventBus.

Resolution order for a Topic (and the Consumers on it): the EventBus named in
``spec.bus``; else the EventBus called ``default`` in the Topic's namespace; else the
servers in the operator's settings. Credentials and TLS material come from Secrets in
the bus's namespace. A connection is reused until the bus's settings or its Secrets
change, then replaced.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client, RawCredentials
from nats.js.manager import JetStreamManager

from eventrails._errors import translate
from eventrails._manifests import ManifestError, parse_resource
from eventrails._resources import EventBus
from eventrails_operator import _kube
from eventrails_operator._desired import BusConnection
from eventrails_operator._jetstream import ReconcileError
from eventrails_operator._settings import OperatorSettings

logger = logging.getLogger("eventrails.operator.bus")

DEFAULT_BUS_NAME = "default"
# BusConnection.name of the servers from the operator's own settings.
OPERATOR_DEFAULT = ""
# Returns the body of the object (namespace, name), or None when there is none.
BodyLookup = Callable[[str, str], "dict[str, Any] | None"]
# EventBus annotations for KEDA's scaler, which reads lag from the NATS monitoring endpoint.
MONITORING_ENDPOINT_ANNOTATION = "eventrails.dev/nats-monitoring-endpoint"
ACCOUNT_ANNOTATION = "eventrails.dev/nats-account"


def describe(bus: BusConnection, namespace: str) -> str:
    """Name the bus for logs and status messages."""
    if bus.name == OPERATOR_DEFAULT:
        return f"the operator's default NATS ({', '.join(bus.servers)})"
    return f"EventBus {namespace}/{bus.name}"


def server_version(client: Client) -> str:
    """Return the version of the nats-server the client is connected to, such as '2.15.1'."""
    version = client.connected_server_version
    text = f"{version.major}.{version.minor}.{version.patch}"
    return f"{text}-{version.dev}" if version.dev else text


_CREDENTIAL_KEYS = {
    "userPassword": {"user": "username", "password": "password"},
    "creds": {"creds": "creds"},
    "nkey": {"seed": "seed"},
}


@dataclass(frozen=True)
class _Material:
    """Secret contents a connection needs; never logged."""

    creds: str | None = None
    seed: str | None = None
    user: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def fingerprint(self, bus: BusConnection) -> str:
        text = json.dumps([list(bus.servers), bus.jetstream_domain, self.__dict__], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Cached:
    fingerprint: str
    client: Client
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _decode_secret(secret: dict[str, Any], key: str) -> str | None:
    data = secret.get("data") or {}
    if key in data:
        return base64.b64decode(data[key]).decode()
    string_data = secret.get("stringData") or {}
    value = string_data.get(key)
    return str(value) if value is not None else None


def _tls_context(material: _Material) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=material.ca) if material.ca else ssl.create_default_context()
    if material.cert and material.key:
        # The ssl module loads client certificates from files only; keep them for a moment.
        with tempfile.NamedTemporaryFile("w") as cert_file, tempfile.NamedTemporaryFile("w") as key_file:
            cert_file.write(material.cert)
            cert_file.flush()
            key_file.write(material.key)
            key_file.flush()
            context.load_cert_chain(cert_file.name, key_file.name)
    return context


class BusPool:
    """Resolves buses through the Kubernetes API and caches a NATS connection per bus."""

    def __init__(self, settings: OperatorSettings, kube: _kube.KubeApi) -> None:
        self._settings = settings
        self._kube = kube
        self._connections: dict[tuple[str, str], _Cached] = {}
        self._lock = asyncio.Lock()

    def operator_default(self) -> BusConnection:
        return BusConnection(
            servers=tuple(self._settings.default_nats_servers),
            subject_prefix=self._settings.default_subject_prefix,
            name=OPERATOR_DEFAULT,
        )

    async def resolve(self, namespace: str, bus_name: str | None, lookup: BodyLookup | None = None) -> BusConnection:
        """Return the bus a Topic in ``namespace`` with ``spec.bus = bus_name`` lives on.

        ``lookup`` reads EventBuses from the operator's in-memory copies (kopf's index of
        its watch); without one, the EventBus is read from the API server.
        Raises ReconcileError (temporary) when the named EventBus is missing or invalid:
        fixing either happens outside the Topic, so retrying is right.
        """
        name = bus_name or DEFAULT_BUS_NAME
        try:
            body = lookup(namespace, name) if lookup is not None else await self._kube.get(_kube.EVENTBUSES, namespace, name)
        except _kube.KubeError as error:
            raise ReconcileError("KubernetesApiError", f"read EventBus {namespace}/{name}: {error}", temporary=True) from error
        if body is None:
            if bus_name is None:
                return self.operator_default()
            raise ReconcileError(
                "EventBusNotFound",
                f"spec.bus: EventBus {bus_name!r} not found in namespace {namespace!r}; "
                "apply it or remove spec.bus to use the default bus",
                field="spec.bus", temporary=True,
            )
        try:
            bus = parse_resource(body, source="cluster")
        except ManifestError as error:
            raise ReconcileError(
                "EventBusInvalid", f"EventBus {namespace}/{name} is invalid: {'; '.join(error.problems)}",
                field="spec.bus", temporary=True,
            ) from None
        assert isinstance(bus, EventBus)
        annotations = bus.metadata.annotations
        return BusConnection.from_spec(
            name, bus.spec,
            monitoring_endpoint=annotations.get(MONITORING_ENDPOINT_ANNOTATION) or None,
            account=annotations.get(ACCOUNT_ANNOTATION) or None,
        )

    async def _material(self, namespace: str, bus: BusConnection) -> _Material:
        values: dict[str, str | None] = {}
        if bus.credentials_secret:
            secret = await self._secret(namespace, bus.credentials_secret, bus)
            # Material field -> Secret key, per credentials kind (the same keys workers mount).
            keys = _CREDENTIAL_KEYS.get(bus.credentials_kind or "", _CREDENTIAL_KEYS["nkey"])
            for item, key in keys.items():
                values[item] = _decode_secret(secret, key)
            missing = sorted(key for item, key in keys.items() if not values[item])
            if missing:
                raise ReconcileError(
                    "SecretInvalid",
                    f"Secret {namespace}/{bus.credentials_secret} of {describe(bus, namespace)} is missing the keys "
                    f"{missing} for credentials kind {bus.credentials_kind!r}; add them to the Secret",
                    temporary=True,
                )
        if bus.tls_secret:
            secret = await self._secret(namespace, bus.tls_secret, bus)
            values["ca"] = _decode_secret(secret, "ca.crt")
            values["cert"] = _decode_secret(secret, "tls.crt")
            values["key"] = _decode_secret(secret, "tls.key")
        return _Material(**values)

    async def _secret(self, namespace: str, name: str, bus: BusConnection) -> dict[str, Any]:
        try:
            secret = await self._kube.get(_kube.SECRETS, namespace, name)
        except _kube.KubeError as error:
            raise ReconcileError("KubernetesApiError", f"read Secret {namespace}/{name}: {error}", temporary=True) from error
        if secret is None:
            raise ReconcileError(
                "SecretNotFound",
                f"Secret {namespace}/{name} of {describe(bus, namespace)} not found; create it",
                temporary=True,
            )
        return secret

    async def client(self, namespace: str, bus: BusConnection) -> Client:
        """Return a connected client for the bus, reusing the cached one while its settings hold."""
        key = (namespace if bus.name != OPERATOR_DEFAULT else "", bus.name)
        material = await self._material(namespace, bus)
        fingerprint = material.fingerprint(bus)
        async with self._lock:
            cached = self._connections.get(key)
            if cached is None or cached.fingerprint != fingerprint:
                cached = _Cached(fingerprint=fingerprint, client=Client())
                stale = self._connections.get(key)
                self._connections[key] = cached
            else:
                stale = None
        if stale is not None:
            logger.info("settings of %s changed; closing its old NATS connection", describe(bus, namespace))
            await _close(stale.client)

        async with cached.lock:
            if cached.client.is_connected or cached.client.is_reconnecting:
                return cached.client
            # A client that failed to connect, or gave up reconnecting, is not reused.
            cached.client = Client()
            await self._connect(cached.client, namespace, bus, material)
            return cached.client

    async def _connect(self, client: Client, namespace: str, bus: BusConnection, material: _Material) -> None:
        label = describe(bus, namespace)

        async def on_error(error: Exception) -> None:
            logger.warning("NATS connection of %s reported: %s", label, error)

        async def on_disconnected() -> None:
            if not client.is_closed:  # closing on purpose also reports a disconnection
                logger.warning("NATS connection of %s lost; reconnecting", label)

        async def on_reconnected() -> None:
            logger.info("NATS connection of %s restored", label)

        options: dict[str, Any] = {
            "servers": list(bus.servers),
            "name": "eventrails-operator",
            "connect_timeout": self._settings.nats_connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
        }
        if material.creds:
            options["user_credentials"] = RawCredentials(material.creds)
        elif material.seed:
            options["nkeys_seed_str"] = material.seed
        elif material.user:
            options["user"] = material.user
            options["password"] = material.password
        if bus.tls_secret:
            options["tls"] = _tls_context(material)
        try:
            await client.connect(**options)
        except Exception as error:  # noqa: BLE001 - translated below
            translated = translate(error, f"connect to {label}")
            raise ReconcileError("NatsUnavailable", str(translated), temporary=True) from error
        logger.info("connected to %s (nats-server %s)", label, server_version(client))

    async def jetstream(self, namespace: str, bus: BusConnection) -> JetStreamManager:
        """Return a JetStream manager on the bus, addressing its JetStream domain when set."""
        client = await self.client(namespace, bus)
        prefix = f"$JS.{bus.jetstream_domain}.API" if bus.jetstream_domain else "$JS.API"
        return client.jsm(prefix=prefix, timeout=self._settings.nats_request_timeout)

    async def forget(self, namespace: str, name: str) -> None:
        """Close the connection of a deleted EventBus."""
        async with self._lock:
            cached = self._connections.pop((namespace, name), None)
        if cached is not None:
            await _close(cached.client)

    async def close(self) -> None:
        async with self._lock:
            cached, self._connections = list(self._connections.values()), {}
        for item in cached:
            await _close(item.client)


async def _close(client: Client) -> None:
    if client.is_closed:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), timeout=5)
