"""Derived JetStream names and subjects: deterministic, so every part computes the same ones.

For a Topic ``orders`` in namespace ``shop`` on a bus with subject prefix ``eventrails``:

- stream ``shop_orders``, subjects ``eventrails.shop.orders.<name>`` (one per task or event name);
- dead-letter stream ``shop_orders_dlq``, subjects ``eventrails.dlq.shop.orders.>``;
- schedule subjects ``eventrails.sched.shop.orders.<name>.<key>`` inside the topic's own stream.

Kubernetes names of eventrails objects are DNS labels, so they never contain ``_`` or ``.``;
that keeps the ``_dlq`` suffix and the extra ``dlq``/``sched`` tokens free of collisions.
"""

from __future__ import annotations

import re

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def stream_name(namespace: str, topic: str) -> str:
    return f"{namespace}_{topic}"


def dead_letter_stream_name(namespace: str, topic: str) -> str:
    return f"{namespace}_{topic}_dlq"


def subject(prefix: str, namespace: str, topic: str, name: str) -> str:
    return f"{prefix}.{namespace}.{topic}.{name}"


def topic_subjects(prefix: str, namespace: str, topic: str, names: list[str]) -> list[str]:
    return [subject(prefix, namespace, topic, name) for name in names]


def dead_letter_subject(prefix: str, namespace: str, topic: str, name: str) -> str:
    return f"{prefix}.dlq.{namespace}.{topic}.{name}"


def dead_letter_wildcard(prefix: str, namespace: str, topic: str) -> str:
    return f"{prefix}.dlq.{namespace}.{topic}.>"


def schedule_wildcard(prefix: str, namespace: str, topic: str) -> str:
    return f"{prefix}.sched.{namespace}.{topic}.>"


def schedule_subject(prefix: str, namespace: str, topic: str, name: str, key: str) -> str:
    """Return the per-entity schedule subject; characters a subject token forbids become ``_``."""
    return f"{prefix}.sched.{namespace}.{topic}.{name}.{_KEY_UNSAFE.sub('_', key)}"


def outcome_subject(prefix: str, namespace: str, topic: str, name: str) -> str:
    """Return the core NATS subject on which workers announce outcomes when asked to."""
    return f"{prefix}.outcomes.{namespace}.{topic}.{name}"


def consumer_name(consumer: str) -> str:
    return consumer


def deployment_name(consumer: str) -> str:
    return f"{consumer}-worker"
