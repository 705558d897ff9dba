"""The ``Worker`` handler registry and the ``Context`` each handler receives.

A Worker maps task and event names to async handlers; ``eventrails worker module:object``
imports it and runs a dispatcher that routes each message to the handler of its name::

    worker = Worker()

    @worker.task("send-email")
    async def send_email(payload: SendEmail, ctx: Context) -> Outcome | None:
        ...
"""

from __future__ import annotations

import inspect
import logging
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from eventrails._errors import ConfigurationError
from eventrails._outcomes import Outcome
from eventrails._resources import EVENT_NAME_PATTERN, TASK_NAME_PATTERN

if TYPE_CHECKING:
    from eventrails._publisher import Publisher

HandlerFunc = Callable[[Any, "Context"], Awaitable["Outcome | None"]]


class _ContextLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes each line with the message's topic, name, id, stream sequence and delivery.

    The ids also travel as ``eventrails_*`` record attributes for structured log handlers;
    the prefix keeps them clear of LogRecord's own ``name`` attribute.
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        ids = self.extra or {}
        prefix = (
            f"{ids.get('topic')}/{ids.get('name')} msg={ids.get('msg_id')} "
            f"seq={ids.get('stream_seq')} delivery={ids.get('delivery')}:"
        )
        extra = kwargs.setdefault("extra", {})
        extra.update({f"eventrails_{key}": value for key, value in ids.items()})
        return f"{prefix} {msg}", kwargs


@dataclass(slots=True)
class Context:
    """The ids and headers of the message a handler handles, and a publisher for downstream work.

    ``publisher`` shares the worker's NATS connection: use it to enqueue tasks (with a
    dedupe key derived from this message, so a redelivery does not enqueue twice).
    ``logger`` prefixes its lines with the message's ids.
    """

    msg_id: str
    name: str
    topic: str
    subject: str
    stream_seq: int
    delivery: int
    headers: Mapping[str, str]
    publisher: Publisher
    logger_name: str = field(default="eventrails.handler", repr=False)
    _logger: logging.LoggerAdapter | None = field(default=None, repr=False, compare=False)  # type: ignore[type-arg]

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        # Built on first use: most handlers never log, and the dispatcher makes a Context per message.
        if self._logger is None:
            ids = {
                "topic": self.topic, "name": self.name, "msg_id": self.msg_id, "stream_seq": self.stream_seq,
                "delivery": self.delivery,
            }
            self._logger = _ContextLogger(logging.getLogger(self.logger_name), ids)
        return self._logger

    @classmethod
    def create(
        cls, *, msg_id: str, name: str, topic: str, subject: str, stream_seq: int, delivery: int,
        headers: Mapping[str, str], publisher: Publisher, logger_name: str = "eventrails.handler",
    ) -> Context:
        return cls(
            msg_id=msg_id, name=name, topic=topic, subject=subject, stream_seq=stream_seq, delivery=delivery,
            headers=MappingProxyType(headers) if isinstance(headers, dict) else dict(headers), publisher=publisher,
            logger_name=logger_name,
        )


@dataclass(frozen=True)
class Handler:
    """One registered handler: its name, kind, function and the model of its payload (if any)."""

    name: str
    kind: Literal["task", "event"]
    func: HandlerFunc
    model: type[BaseModel] | None
    timeout: float | None = None

    @property
    def qualified_name(self) -> str:
        return f"{getattr(self.func, '__module__', '?')}.{getattr(self.func, '__qualname__', repr(self.func))}"

    def parse(self, payload: dict[str, Any]) -> Any:
        """Return what the handler receives: the validated model, or the dict when it takes no model.

        Raises pydantic.ValidationError when the payload does not fit the model.
        """
        if self.model is None:
            return payload
        return self.model.model_validate(payload)


def _payload_model(func: Callable[..., Any]) -> type[BaseModel] | None:
    parameters = list(inspect.signature(func).parameters.values())
    if len(parameters) < 2:
        raise ConfigurationError(
            f"handler {func.__qualname__} must take (payload, ctx); it takes {len(parameters)} parameter(s)"
        )
    try:
        hints = typing.get_type_hints(func)
    except Exception as error:  # noqa: BLE001 - any failure to resolve annotations is reported the same way
        raise ConfigurationError(
            f"cannot resolve the annotations of handler {func.__qualname__}: {error}; import the payload model "
            "at module level"
        ) from error
    annotation = hints.get(parameters[0].name)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


class Worker:
    """A registry of handlers by task or event name; ``eventrails worker module:object`` runs it."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def task(self, name: str, *, timeout: float | None = None) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register the decorated coroutine function as the handler of task ``name`` (lower-kebab-case).

        ``timeout`` (seconds) cancels a run that takes longer and retries it like a failure;
        it must be below the Consumer's ackWait, which the worker checks at start.
        """
        if not isinstance(name, str) or not re.fullmatch(TASK_NAME_PATTERN, name):
            raise ConfigurationError(f"task name {name!r} is invalid: use lower-kebab-case, such as 'send-email'")
        return self._register(name, "task", timeout)

    def event(self, name: str, *, timeout: float | None = None) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register the decorated coroutine function as the handler of event ``name`` (PascalCase).

        ``timeout`` works as for ``task``.
        """
        if not isinstance(name, str) or not re.fullmatch(EVENT_NAME_PATTERN, name):
            raise ConfigurationError(f"event name {name!r} is invalid: use PascalCase, such as 'InvoicePaid'")
        return self._register(name, "event", timeout)

    def _register(
        self, name: str, kind: Literal["task", "event"], timeout: float | None,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout of {kind} {name!r} is {timeout!r}: use a positive number of seconds")

        def decorate(func: HandlerFunc) -> HandlerFunc:
            if not inspect.iscoroutinefunction(func):
                raise ConfigurationError(
                    f"handler of {kind} {name!r} ({getattr(func, '__qualname__', func)!r}) must be an async def function"
                )
            existing = self._handlers.get(name)
            if existing is not None:
                raise ConfigurationError(
                    f"{kind} {name!r} already has handler {existing.qualified_name}; register one handler per name"
                )
            self._handlers[name] = Handler(
                name=name, kind=kind, func=func, model=_payload_model(func), timeout=timeout
            )
            return func

        return decorate

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    def handler(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def __repr__(self) -> str:
        return f"Worker(names={self.names})"
