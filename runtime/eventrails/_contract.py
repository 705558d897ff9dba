"""The payload contract of a topic, read from its stream's metadata and checked on both ends.

The reconcile core writes the Topic's names, required keys and exempt names into the
stream metadata (``eventrails.dev/*``), so a publisher and a worker read the same rules
from JetStream itself. ``ContractCache`` reads each topic's stream once. A name missing
from the cached copy triggers one more read, so a Topic that gained a name is picked up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nats.js.manager import JetStreamManager

from eventrails import _naming
from eventrails._errors import ConfigurationError, JetStreamNotFound, PayloadError, translate

logger = logging.getLogger("eventrails.contract")

METADATA_PREFIX = "eventrails.dev/"
_NAMES = f"{METADATA_PREFIX}names"
_REQUIRED_KEYS = f"{METADATA_PREFIX}required-keys"
_EXEMPT = f"{METADATA_PREFIX}exempt"
_TOPIC_KIND = f"{METADATA_PREFIX}topic-kind"

# Shortest time between two reads of one topic's stream caused by unknown names, so a
# publisher sending a misspelt name does not turn every call into a stream_info request.
_REFRESH_INTERVAL = 5.0


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass(frozen=True)
class Contract:
    """The names a topic carries and the payload keys each name requires."""

    topic: str
    stream: str
    kind: Literal["tasks", "events"]
    names: tuple[str, ...]
    required_keys: tuple[str, ...]
    exempt: frozenset[str]
    schedules: bool = False

    @classmethod
    def from_metadata(
        cls, topic: str, stream: str, metadata: Mapping[str, str] | None, *, schedules: bool = False
    ) -> Contract:
        """Build the contract from stream metadata; raise ConfigurationError when it is not there.

        ``schedules`` tells whether the stream allows message schedules (the Topic's
        ``spec.delayedDelivery``), which delayed and debounced tasks need.
        """
        metadata = metadata or {}
        if _NAMES not in metadata:
            raise ConfigurationError(
                f"stream {stream} of topic {topic!r} has no eventrails metadata ({_NAMES}); "
                "it was not created from a Topic resource: apply the Topic with the operator or `eventrails up`"
            )
        kind = metadata.get(_TOPIC_KIND, "tasks")
        return cls(
            topic=topic,
            stream=stream,
            kind="events" if kind == "events" else "tasks",
            names=_split(metadata.get(_NAMES)),
            required_keys=_split(metadata.get(_REQUIRED_KEYS)),
            exempt=frozenset(_split(metadata.get(_EXEMPT))),
            schedules=schedules,
        )

    def knows(self, name: str) -> bool:
        return name in self.names

    def check_name(self, name: str) -> None:
        """Raise PayloadError when the topic does not declare ``name``."""
        if name not in self.names:
            field = "spec.tasks" if self.kind == "tasks" else "spec.events"
            raise PayloadError(
                f"{name!r} is not declared by topic {self.topic!r} (it declares {list(self.names)}); "
                f"fix the name or add it to {field} of Topic {self.topic!r}"
            )

    def check_schedules(self, name: str, argument: str) -> None:
        """Raise ConfigurationError when the topic cannot hold the delayed or debounced ``name``."""
        if not self.schedules:
            raise ConfigurationError(
                f"{argument} of {name!r} needs delayed delivery, which topic {self.topic!r} does not allow "
                f"(stream {self.stream} has no message schedules); set spec.delayedDelivery: true on Topic "
                f"{self.topic!r} (nats-server 2.12 or later), or enqueue without {argument}"
            )

    def missing_keys(self, name: str, payload: Mapping[str, Any]) -> list[str]:
        """Return the required keys ``payload`` lacks or leaves empty; none for exempt names."""
        if name in self.exempt:
            return []
        return [key for key in self.required_keys if _is_empty(payload.get(key))]

    def check_payload(self, name: str, payload: Mapping[str, Any]) -> None:
        """Raise PayloadError naming the first missing required key and the two ways to fix it."""
        missing = self.missing_keys(name, payload)
        if missing:
            keys = ", ".join(repr(key) for key in missing)
            raise PayloadError(
                f"payload of {name!r} on topic {self.topic!r} lacks required key(s) {keys} "
                f"(missing or empty); add them to the payload, or list {name!r} under "
                f"spec.payload.exempt of Topic {self.topic!r} if it is not tenant-scoped"
            )


class ContractCache:
    """Reads each topic's contract from its stream once and keeps it.

    ``get`` re-reads a topic at most every few seconds when asked about a name the cached
    contract lacks, so a Topic that gained a name is noticed without a restart.
    """

    def __init__(self, jsm: JetStreamManager, namespace: str) -> None:
        self._jsm = jsm
        self._namespace = namespace
        self._contracts: dict[str, tuple[Contract, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, topic: str, name: str | None = None, *, schedules: bool = False) -> Contract:
        """Return the contract of ``topic``.

        Reads it again if ``name`` is new to the cached copy, or if ``schedules`` are needed
        and the cached copy has none (the Topic may have turned on delayed delivery since).
        """

        def fits(contract: Contract) -> bool:
            return (name is None or contract.knows(name)) and (not schedules or contract.schedules)

        cached = self._contracts.get(topic)
        if cached is not None and fits(cached[0]):
            return cached[0]
        lock = self._locks.setdefault(topic, asyncio.Lock())
        async with lock:
            cached = self._contracts.get(topic)
            if cached is not None:
                contract, read_at = cached
                if fits(contract) or time.monotonic() - read_at < _REFRESH_INTERVAL:
                    return contract
            contract = await self._read(topic)
            self._contracts[topic] = (contract, time.monotonic())
            return contract

    def forget(self, topic: str) -> None:
        self._contracts.pop(topic, None)

    async def _read(self, topic: str) -> Contract:
        stream = _naming.stream_name(self._namespace, topic)
        try:
            info = await self._jsm.stream_info(stream)
        except Exception as error:  # noqa: BLE001 - translated below
            translated = translate(error, f"read the contract of topic {topic!r} from stream {stream}")
            if isinstance(translated, JetStreamNotFound):
                raise JetStreamNotFound(
                    f"topic {topic!r} not found: stream {stream} does not exist in namespace "
                    f"{self._namespace!r}; apply the Topic or fix the topic name",
                    err_code=translated.err_code,
                ) from error
            raise translated from error
        contract = Contract.from_metadata(
            topic, stream, info.config.metadata, schedules=bool(info.config.allow_msg_schedules)
        )
        logger.debug(
            "read contract of topic %s from stream %s: names=%s required_keys=%s exempt=%s schedules=%s",
            topic, stream, ",".join(contract.names), ",".join(contract.required_keys), ",".join(sorted(contract.exempt)),
            contract.schedules,
        )
        return contract
