"""The topic contracts an outbox writer checks rows against, held in memory.

A writer runs inside the caller's database transaction, where a NATS round trip per row
would make the transaction wait on the network and fail when NATS is briefly away. So
the contracts are loaded once, at start-up, into a ``ContractRegistry`` that the writers
share: from the Topic manifests the application ships (``from_manifests``), or from the
stream metadata in JetStream (``from_jetstream``), which is what the publisher reads too.

The relay checks each row again when it publishes, against the live stream metadata, so a
row whose name was removed from its Topic in the meantime is parked with a PayloadError
rather than published.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from eventrails import _naming
from eventrails._contract import METADATA_PREFIX, Contract, ContractCache
from eventrails._errors import ConfigurationError, translate
from eventrails._manifests import ManifestError, load_resources
from eventrails._resources import EVENT_NAME_PATTERN, Topic

logger = logging.getLogger("eventrails.outbox")

DEFAULT_EVENTS_TOPIC = "domain-events"


def is_event_name(name: str) -> bool:
    """Tell an event name (PascalCase) from a task name (lower-kebab-case); the two patterns never overlap."""
    return re.fullmatch(EVENT_NAME_PATTERN, name) is not None


def contract_of(topic: Topic) -> Contract:
    """Return the contract a Topic resource declares: the same fields the reconcile core writes into stream metadata."""
    spec = topic.spec
    return Contract(
        topic=topic.metadata.name,
        stream=_naming.stream_name(topic.metadata.namespace, topic.metadata.name),
        kind=spec.kind,
        names=tuple(spec.names),
        required_keys=tuple(spec.payload.required_keys),
        exempt=frozenset(spec.payload.exempt),
        schedules=spec.delayed_delivery,
    )


class ContractRegistry:
    """The contracts of the topics an application writes outbox rows for, by topic name.

    ``events_topic`` is where ``publish_event`` rows go when no topic is named; it defaults
    to ``domain-events``, as for the publisher.
    """

    def __init__(self, contracts: Iterable[Contract], *, events_topic: str = DEFAULT_EVENTS_TOPIC) -> None:
        self._contracts: dict[str, Contract] = {}
        for contract in contracts:
            if contract.topic in self._contracts:
                raise ConfigurationError(
                    f"topic {contract.topic!r} was given twice to the contract registry; "
                    "load the topics of one namespace only"
                )
            self._contracts[contract.topic] = contract
        self.events_topic = events_topic

    @classmethod
    def from_topics(cls, topics: Iterable[Topic], *, events_topic: str = DEFAULT_EVENTS_TOPIC) -> ContractRegistry:
        return cls((contract_of(topic) for topic in topics), events_topic=events_topic)

    @classmethod
    def from_manifests(
        cls, paths: Sequence[Path | str], *, namespace: str = "default", events_topic: str = DEFAULT_EVENTS_TOPIC,
    ) -> ContractRegistry:
        """Load the Topic manifests of ``namespace`` found under ``paths`` (files or directories).

        Raises ConfigurationError when a manifest is invalid, because a writer checking rows
        against a partial set of topics would reject rows that are fine.
        """
        try:
            resources, errors = load_resources([Path(path) for path in paths], namespace)
        except (ManifestError, FileNotFoundError) as error:
            raise ConfigurationError(f"cannot load the outbox contracts: {error}") from error
        if errors:
            problems = "; ".join(str(error) for error in errors)
            raise ConfigurationError(f"cannot load the outbox contracts, invalid manifests: {problems}")
        topics = [r for r in resources if isinstance(r, Topic) and r.metadata.namespace == namespace]
        if not topics:
            shown = ", ".join(str(path) for path in paths)
            raise ConfigurationError(f"no Topic manifests of namespace {namespace!r} found under {shown}")
        return cls.from_topics(topics, events_topic=events_topic)

    @classmethod
    async def from_jetstream(
        cls, nc: NATS, *, namespace: str = "default", topics: Sequence[str] | None = None,
        jetstream_domain: str | None = None, events_topic: str = DEFAULT_EVENTS_TOPIC,
    ) -> ContractRegistry:
        """Read the contracts from the streams' metadata, once.

        With ``topics`` only those are read (and each must exist); without, every stream
        that a Topic of ``namespace`` created. Raises JetStreamNotFound for a missing topic
        and NatsUnavailable when NATS does not respond.
        """
        jsm = nc.jsm(domain=jetstream_domain)
        if topics is not None:
            cache = ContractCache(jsm, namespace)
            return cls([await cache.get(topic) for topic in topics], events_topic=events_topic)
        contracts: list[Contract] = []
        try:
            streams = await jsm.streams_info()
        except Exception as error:  # noqa: BLE001 - translated below
            raise translate(error, f"list the streams of namespace {namespace!r}") from error
        for info in streams:
            metadata: Mapping[str, Any] = info.config.metadata or {}
            if (metadata.get(f"{METADATA_PREFIX}kind") != "Topic"
                    or metadata.get(f"{METADATA_PREFIX}namespace") != namespace):
                continue
            topic = str(metadata.get(f"{METADATA_PREFIX}name"))
            schedules = bool(getattr(info.config, "allow_msg_schedules", False))
            contracts.append(Contract.from_metadata(topic, str(info.config.name), metadata, schedules=schedules))
        logger.info(
            "loaded the contracts of %d topic(s) of namespace %s from JetStream: %s",
            len(contracts), namespace, ", ".join(sorted(c.topic for c in contracts)) or "(none)",
        )
        return cls(contracts, events_topic=events_topic)

    @property
    def topics(self) -> list[str]:
        return sorted(self._contracts)

    def get(self, topic: str) -> Contract:
        """Return the contract of ``topic``; raise ConfigurationError naming the known topics otherwise."""
        contract = self._contracts.get(topic)
        if contract is None:
            known = ", ".join(self.topics) or "none"
            raise ConfigurationError(
                f"topic {topic!r} is not in the outbox contract registry (it knows {known}); "
                "fix the topic name, or load its Topic manifest or stream into the registry"
            )
        return contract
