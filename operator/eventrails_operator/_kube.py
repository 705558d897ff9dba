"""The operator's one adapter to the Kubernetes API: reads, creates, patches and deletes objects.

kopf watches the custom resources over its own connection. The handlers use this adapter
for everything else they touch: the Topic of a Consumer, EventBuses, Secrets, worker
Deployments and status patches. It talks JSON over aiohttp with the same ``ConnectionInfo``
that kopf logged in with, and ``_translate`` is the only place that turns API answers
into exceptions.

    KubeError                 any failed API request (``temporary`` says whether to retry)
    ├── KubeNotFound          404: the object or its resource does not exist
    ├── KubeConflict          409: already exists, or a stale resourceVersion
    └── KubeInvalid           422: the server rejected the object (a spec problem)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

logger = logging.getLogger("eventrails.operator.kube")

_MERGE_PATCH = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"


class KubeError(Exception):
    """A Kubernetes API request failed; ``status`` is the HTTP status (0 when unreachable)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def temporary(self) -> bool:
        """Whether the same request may succeed later without a change to any object."""
        # TODO: on 401, ask kopf for a fresh login instead of waiting for kopf's own requests to fail.
        return self.status in (0, 401, 403, 408, 409, 429) or self.status >= 500


class KubeNotFound(KubeError):
    """The object, its namespace or its resource does not exist."""


class KubeConflict(KubeError):
    """The object already exists, or was changed since it was read."""


class KubeInvalid(KubeError):
    """The API server rejected the object's content."""

    @property
    def temporary(self) -> bool:
        return False


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource, such as ``apps/v1`` ``deployments``."""

    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{root}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    def __str__(self) -> str:
        return f"{self.plural}.{self.api_version}"


TOPICS = Resource("eventrails.dev", "v1alpha1", "topics")
CONSUMERS = Resource("eventrails.dev", "v1alpha1", "consumers")
EVENTBUSES = Resource("eventrails.dev", "v1alpha1", "eventbuses")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
SECRETS = Resource("", "v1", "secrets")
SCALEDOBJECTS = Resource("keda.sh", "v1alpha1", "scaledobjects")


def _translate(status: int, payload: Any, action: str) -> KubeError:
    """Return the exception for a failed API answer; ``payload`` is its decoded body."""
    reason = ""
    detail = ""
    if isinstance(payload, dict):
        reason = str(payload.get("reason") or "")
        detail = str(payload.get("message") or "")
    elif payload:
        detail = str(payload)[:500]
    message = f"{action}: HTTP {status} {reason}".rstrip() + (f": {detail}" if detail else "")
    if status == 404:
        return KubeNotFound(message, status=status, reason=reason)
    if status == 409:
        return KubeConflict(message, status=status, reason=reason)
    if status == 422:
        return KubeInvalid(message, status=status, reason=reason)
    return KubeError(message, status=status, reason=reason)


class RateLimiter:
    """A token bucket: ``rate`` requests a second on average, up to ``burst`` at once.

    Callers wait in arrival order, so a thousand handlers starting together are spread
    over time instead of hitting the API server at once.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be positive and burst at least 1, got rate={rate} burst={burst}")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)


class KubeApi:
    """A small asynchronous client of the Kubernetes API for the operator's handlers.

    The connection comes from kopf's login (``use``); until then, requests fail with a
    temporary ``KubeError``. The HTTP session is created in the running event loop on first
    use and replaced when the credentials change. ``limiter`` paces every request and
    ``connection_limit`` caps the open connections.
    """

    def __init__(
        self, connection: kopf.ConnectionInfo | None = None, *, timeout: float = 30.0,
        limiter: RateLimiter | None = None, connection_limit: int = 16,
    ) -> None:
        self._connection = connection
        self._timeout = timeout
        self._limiter = limiter
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    @property
    def connection(self) -> kopf.ConnectionInfo | None:
        return self._connection

    async def use(self, connection: kopf.ConnectionInfo) -> None:
        """Switch to new credentials (a fresh login); requests in flight finish on the old session."""
        async with self._lock:
            if connection == self._connection:
                return
            old, self._session = self._session, None
            self._connection = connection
        if old is not None:
            await old.close()

    async def close(self) -> None:
        async with self._lock:
            session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _get_session(self) -> aiohttp.ClientSession:
        async with self._lock:
            if self._connection is None:
                raise KubeError("no Kubernetes API credentials yet: waiting for the operator to log in")
            if self._session is None or self._session.closed:
                connection = self._connection
                ssl_context = connection.as_ssl_context() if connection.server.startswith("https") else None
                self._session = aiohttp.ClientSession(
                    base_url=connection.server.rstrip("/") + "/",
                    headers={"Accept": "application/json", **connection.as_http_headers()},
                    connector=aiohttp.TCPConnector(ssl=ssl_context or True, limit=self._connection_limit),
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                )
            return self._session

    async def _request(
        self, method: str, path: str, action: str, *, body: Any = None, content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Any:
        session = await self._get_session()
        if self._limiter is not None:
            await self._limiter.acquire()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        try:
            async with session.request(method, path.lstrip("/"), data=data, headers=headers, params=params) as response:
                text = await response.text()
                try:
                    payload = json.loads(text) if text else None
                except ValueError:
                    payload = text
                if response.status >= 400:
                    raise _translate(response.status, payload, action)
                return payload
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise KubeError(f"{action}: Kubernetes API unreachable ({type(error).__name__}: {error})") from error

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """Return the object, or None when it does not exist."""
        try:
            result = await self._request("GET", resource.path(namespace, name), f"read {resource} {namespace}/{name}")
        except KubeNotFound:
            return None
        return dict(result)

    async def create(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name", "?")
        action = f"create {resource} {namespace}/{name}"
        return dict(await self._request("POST", resource.path(namespace), action, body=body))

    async def merge_patch(
        self, resource: Resource, namespace: str, name: str, patch: dict[str, Any], *, subresource: str | None = None,
    ) -> dict[str, Any]:
        """Send a JSON merge patch (RFC 7386): dicts merge, lists are replaced, None removes a key."""
        target = f"{resource} {namespace}/{name}" + (f" ({subresource})" if subresource else "")
        return dict(await self._request(
            "PATCH", resource.path(namespace, name, subresource), f"patch {target}",
            body=patch, content_type=_MERGE_PATCH,
        ))

    async def json_patch(self, resource: Resource, namespace: str, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        """Send a JSON patch (RFC 6902): a list of add, replace and remove operations."""
        return dict(await self._request(
            "PATCH", resource.path(namespace, name), f"patch {resource} {namespace}/{name}",
            body=operations, content_type=_JSON_PATCH,
        ))

    async def delete(self, resource: Resource, namespace: str, name: str, *, propagation: str = "Foreground") -> bool:
        """Delete the object; return False when it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            await self._request("DELETE", resource.path(namespace, name), f"delete {resource} {namespace}/{name}", body=body)
        except KubeNotFound:
            return False
        return True

    async def serves(self, resource: Resource) -> bool:
        """Whether the API server serves ``resource`` now (its CRD is installed and established)."""
        root = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
        try:
            listing = await self._request("GET", root, f"discover {resource.api_version}")
        except KubeNotFound:
            return False
        names = {item.get("name") for item in (listing or {}).get("resources", []) if isinstance(item, dict)}
        return resource.plural in names
