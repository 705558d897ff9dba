"""The dispatcher: drains one durable pull consumer and routes each message to its handler.

For every message it decides one outcome and settles the message accordingly:

    poison input (bad JSON, missing tenancy key, failed model)   dead letter at once
    handler returned None or Done                                  ack
    handler returned or raised Retry                               nak with a delay
    handler returned or raised Skip                                ack, counted and logged
    handler returned or raised DeadLetter                          dead letter
    handler raised anything else                                   nak with the backoff delay,
                                                                   dead letter after maxDeliver

Dead-lettering publishes the original payload and headers, plus why, to the topic's
dead-letter stream and acks the original only after JetStream stored the copy. The
consumer itself belongs to the operator (or local mode): the dispatcher binds to it and
never creates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import pydantic
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo
from nats.js.client import JetStreamContext

from eventrails import _naming, _schedule, _tracing
from eventrails._contract import Contract, ContractCache
from eventrails._errors import ConfigurationError, JetStreamNotFound, translate
from eventrails._metrics import Metrics, NameMetrics
from eventrails._outcomes import DeadLetter, Done, Outcome, Retry, Skip, backoff_delay, resolve
from eventrails._publisher import MSG_ID_HEADER, NAME_HEADER, Publisher, publish_with_retry
from eventrails._settings import WorkerSettings
from eventrails._worker import Context, Handler, Worker

logger = logging.getLogger("eventrails.dispatcher")

T = TypeVar("T")

# Headers a dead-lettered message carries besides the original ones.
DLQ_REASON_HEADER = "Eventrails-Dlq-Reason"
DLQ_ERROR_TYPE_HEADER = "Eventrails-Dlq-Error-Type"
DLQ_ERROR_HEADER = "Eventrails-Dlq-Error"
ORIGINAL_SUBJECT_HEADER = "Eventrails-Original-Subject"
ORIGINAL_MSG_ID_HEADER = "Eventrails-Original-Msg-Id"
STREAM_SEQ_HEADER = "Eventrails-Stream-Seq"
DELIVERY_HEADER = "Eventrails-Delivery"

# Header values are kept short: the payload stays the message, not the stack trace.
_HEADER_VALUE_LIMIT = 1024

# Pauses between attempts to bind a missing consumer and after failed fetches.
_BIND_PAUSE = (0.5, 30.0)
_FETCH_ERROR_PAUSE = (0.2, 10.0)
# How long one pull request waits on the server for messages. A pull cannot be withdrawn:
# a message the server hands to a pull after the worker stopped listening counts as a
# delivery and comes back only after the ack wait. So a stopping worker waits for its last
# pull to end and hands back what it brought (see _drain). Short pulls keep that wait, and
# so an idle worker's exit after SIGTERM, near one second; while messages flow a pull
# returns as soon as it has some, so the length only matters when idle, where it costs
# one small request per second.
DEFAULT_PULL_EXPIRY = 1.0

# Consecutive failed fetches after which the dispatcher checks that its consumer still exists
# (a deleted consumer shows up as a fetch without responders).
_FETCH_ERRORS_BEFORE_RECHECK = 1

# How long past a pull request's expiry the dispatcher waits for the server's word on it
# (a 408 status, or its last message) before it counts the request as gone, as after a
# reconnect that lost it.
_PULL_GRACE = 1.0


@dataclass(slots=True)
class _Ids:
    """The ids of one delivery, for log lines, headers and announcements."""

    topic: str
    name: str
    msg_id: str
    subject: str
    stream_seq: int
    delivery: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.name} msg={self.msg_id} seq={self.stream_seq} delivery={self.delivery}"


@dataclass(slots=True)
class _Verdict:
    """The outcome of one delivery, with the error that led to it (for dead-letter headers)."""

    outcome: Outcome
    error_type: str = ""
    error: str = ""
    duration: float = 0.0


class HandlerTimeout(Exception):
    """A handler ran longer than the timeout it was registered with; retried like any failure."""


class _Running:
    """A message whose handler runs, and when it is next due an in-progress heartbeat."""

    __slots__ = ("beat_at", "ids", "msg")

    def __init__(self, msg: Msg, ids: _Ids, beat_at: float) -> None:
        self.msg = msg
        self.ids = ids
        self.beat_at = beat_at


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _HEADER_VALUE_LIMIT else text[: _HEADER_VALUE_LIMIT - 3] + "..."


def _describe_validation(error: pydantic.ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "payload"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


class Dispatcher:
    """Drains the consumer named in ``settings`` and runs ``worker``'s handlers, until ``stop``.

    ``run`` binds to the consumer, waiting with readiness failing while it does not exist
    yet. It fetches as many messages as there are free handler slots and handles each in
    its own task. On ``stop`` it drains: no new fetches, ``drain_timeout`` seconds for the
    in-flight handlers, and a nak for whatever remains. The NATS connection belongs to the
    caller and stays open.
    """

    def __init__(
        self,
        worker: Worker,
        settings: WorkerSettings,
        nc: NATS,
        *,
        metrics: Metrics | None = None,
        publisher: Publisher | None = None,
        fetch_timeout: float = DEFAULT_PULL_EXPIRY,
    ) -> None:
        if not settings.topic or not settings.consumer:
            raise ConfigurationError(
                "EVENTRAILS_TOPIC and EVENTRAILS_CONSUMER must both be set (the Topic and Consumer resource names)"
            )
        self._worker = worker
        self._settings = settings
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(domain=settings.jetstream_domain)
        self.metrics = metrics if metrics is not None else Metrics()
        self._publisher = publisher if publisher is not None else Publisher(nc, settings)
        self._contracts = ContractCache(self._js, settings.namespace)
        self._fetch_timeout = fetch_timeout

        self._topic = settings.topic
        self._stream = settings.stream
        self._consumer = settings.consumer
        self._subject_prefix = _naming.subject(settings.subject_prefix, settings.namespace, settings.topic, "")

        self._contract: Contract | None = None
        self._subscription: Any = None
        self._bound = False
        self._draining = False
        self._not_ready = "starting"
        self._stopping = asyncio.Event()
        self._pending_fetch: asyncio.Task[list[Msg]] | None = None

        # Handlers running now, by task; messages delivered while every slot was taken.
        self._running: dict[asyncio.Task[None], _Running] = {}
        self._backlog: deque[Msg] = deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._beat_interval = settings.ack_wait / 3
        self._beats: asyncio.TimerHandle | None = None
        self._beating: set[asyncio.Task[None]] = set()

        # The pull protocol of a nats-py client (see _consume_stream): messages requested
        # and not yet delivered, deliveries after the stop, and the last problem reported.
        self._streaming = isinstance(nc, NATS)
        api = f"$JS.{settings.jetstream_domain}.API" if settings.jetstream_domain else "$JS.API"
        self._next_subject = f"{api}.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}"
        self._requested = 0
        self._heard_at = 0.0
        self._delivered = 0
        self._late: list[Msg] = []
        self._pull_problem: str | None = None
        self._names: dict[str, NameMetrics] = {}

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        """Return whether the worker should receive traffic, and why (for /readyz)."""
        if self._draining or self._stopping.is_set():
            return False, "draining"
        if not self._nc.is_connected:
            return False, "not connected to NATS"
        if not self._bound:
            return False, self._not_ready
        return True, f"consuming {self._consumer} on stream {self._stream}"

    def stop(self) -> None:
        """Ask ``run`` to drain and return; safe to call from a signal handler."""
        if not self._stopping.is_set():
            logger.info("stop requested: draining consumer %s on stream %s", self._consumer, self._stream)
        self._stopping.set()
        self._wake()

    async def run(self) -> None:
        """Bind to the consumer and handle messages until ``stop``; then drain and return.

        Raises ConfigurationError when the topic declares names that the consumer receives
        but the worker has no handler for.
        """
        self._beats = asyncio.get_running_loop().call_later(self._beat_interval / 2, self._sweep)
        try:
            while not self._stopping.is_set():
                if not await self._bind():
                    break
                if self._streaming:
                    await self._consume_stream()
                else:
                    await self._consume_fetch()
        finally:
            try:
                await self._drain()
            finally:
                if self._beats is not None:
                    self._beats.cancel()

    # --- binding -------------------------------------------------------------------------

    async def _bind(self) -> bool:
        """Wait until the consumer exists, check the handlers against it, and subscribe.

        Returns False when stopped before binding.
        """
        pause = _BIND_PAUSE[0]
        while not self._stopping.is_set():
            try:
                info = await self._js.consumer_info(self._stream, self._consumer)
                # NOTE: the contract is read here only, so a Topic whose required keys change
                # reaches a running worker when it binds again (after a restart, say).
                self._contracts.forget(self._topic)
                self._contract = await self._contracts.get(self._topic)
                self._check_handlers(info, self._contract)
                if not self._streaming:
                    self._subscription = await self._js.pull_subscribe_bind(self._consumer, stream=self._stream)
            except ConfigurationError:
                raise
            except Exception as error:  # noqa: BLE001 - translated and retried below
                translated = translate(error, f"bind to consumer {self._consumer} on stream {self._stream}")
                if isinstance(translated, JetStreamNotFound):
                    self._not_ready = f"consumer {self._consumer} on stream {self._stream} does not exist"
                    logger.warning(
                        "consumer %s on stream %s does not exist yet; the operator or `eventrails up` creates it "
                        "from Consumer %s; checking again in %.1fs",
                        self._consumer, self._stream, self._consumer, pause,
                    )
                else:
                    self._not_ready = str(translated)
                    logger.warning("%s; trying again in %.1fs", translated, pause)
                await self._pause(pause)
                pause = min(pause * 2, _BIND_PAUSE[1])
                continue

            self._bound = True
            self.metrics.ready.set(1)
            logger.info(
                "consuming %s on stream %s: names %s, concurrency %d, ack wait %.0fs, max deliver %d, backoff %s",
                self._consumer, self._stream, ",".join(self._filtered_names(info, self._contract)),
                self._settings.concurrency, self._settings.ack_wait, self._settings.max_deliver,
                ",".join(f"{delay:g}s" for delay in self._settings.backoff),
            )
            return True
        return False

    def _filtered_names(self, info: ConsumerInfo, contract: Contract) -> list[str]:
        filters = list(info.config.filter_subjects or [])
        if info.config.filter_subject:
            filters.append(info.config.filter_subject)
        if not filters:
            return list(contract.names)
        names = []
        for subject in filters:
            rest = subject[len(self._subject_prefix):] if subject.startswith(self._subject_prefix) else ""
            if rest in ("*", ">"):
                return list(contract.names)
            if rest in contract.names:
                names.append(rest)
        return names

    def _check_handlers(self, info: ConsumerInfo, contract: Contract) -> None:
        names = self._filtered_names(info, contract)
        missing = [name for name in names if self._worker.handler(name) is None]
        if missing:
            register = "@worker.task" if contract.kind == "tasks" else "@worker.event"
            raise ConfigurationError(
                f"worker {self._settings.handler or repr(self._worker)} has no handler for {missing}, which consumer "
                f"{self._consumer} receives from topic {self._topic!r}; register them with {register}(name) "
                f"or narrow spec.names of Consumer {self._consumer!r}"
            )
        too_long = [
            f"{name} ({handler.timeout:g}s)" for name in names
            if (handler := self._worker.handler(name)) is not None and handler.timeout is not None
            and handler.timeout >= self._settings.ack_wait
        ]
        if too_long:
            raise ConfigurationError(
                f"handler timeouts {too_long} are not below ackWait ({self._settings.ack_wait:g}s) of consumer "
                f"{self._consumer}: lower the timeouts or raise spec.ackWait of Consumer {self._consumer!r}"
            )
        unused = sorted(set(self._worker.names) - set(names))
        if unused:
            logger.info(
                "handlers for %s are not used: consumer %s does not receive them from topic %s",
                ",".join(unused), self._consumer, self._topic,
            )

    async def _unbind(self, reason: str) -> None:
        self._bound = False
        self._not_ready = reason
        self.metrics.ready.set(0)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except Exception as error:  # noqa: BLE001 - the inbox goes away with the connection anyway
                logger.debug("unsubscribing from consumer %s failed: %s", self._consumer, error)

    # --- fetching ------------------------------------------------------------------------

    async def _consume_stream(self) -> None:
        """Keep pull requests open for the free handler slots and handle what they deliver.

        Used with a nats-py client. Pull requests go straight to the consumer's next-message
        subject with an inbox of the dispatcher's own, and deliveries start handlers from the
        inbox's callback. So a request is on the server while handlers run, and its messages
        arrive while others finish. nats-py's ``fetch``, by contrast, waits for each batch
        and spends a queue read with its own timer on every message.

        A request covers every free slot not yet requested. A new one goes out once a
        quarter of the slots (or all of them) are free. ``_requested`` counts messages
        requested and not yet delivered: deliveries lower it, and so does the server's 408
        when a request expires, which carries the number the request still had open.
        Returns when stopped, or after unbinding when the consumer is gone.
        """
        nc = self._nc
        loop = asyncio.get_running_loop()
        inbox = nc.new_inbox()
        self._requested, self._pull_problem, self._heard_at = 0, None, loop.time()
        self._subscription = await nc.subscribe(inbox, cb=self._on_delivery)
        concurrency = self._settings.concurrency
        threshold = max(1, concurrency // 4)
        expires = int(self._fetch_timeout * 1_000_000_000)
        lifetime = self._fetch_timeout + _PULL_GRACE
        pause = _FETCH_ERROR_PAUSE[0]
        failures = 0
        while not self._stopping.is_set():
            free = concurrency - len(self._running) - len(self._backlog) - self._requested
            if free > 0 and (free >= threshold or not self._requested):
                try:
                    await nc.publish(self._next_subject, b'{"batch":%d,"expires":%d}' % (free, expires), reply=inbox)
                except Exception as error:  # noqa: BLE001 - counted and retried like a failed pull
                    self._pull_problem = f"{type(error).__name__}: {error}"
                else:
                    self._requested += free
                    # A request's lifetime counts from here: only silence after it means it was lost.
                    self._heard_at = loop.time()

            if self._pull_problem is None:
                delivered = self._delivered
                await self._wait(lifetime)
                if delivered != self._delivered:
                    self._heard_at = loop.time()
                if self._requested and loop.time() - self._heard_at >= lifetime:
                    # No message or status arrived for longer than a request lives, so the
                    # open requests were lost (in a reconnect, for example): request again.
                    logger.debug(
                        "no message or status for %d requested message(s) from consumer %s in %.1fs; requesting again",
                        self._requested, self._consumer, lifetime,
                    )
                    self._requested = 0
            problem, self._pull_problem = self._pull_problem, None
            if problem is None:
                failures, pause = 0, _FETCH_ERROR_PAUSE[0]
                continue

            failures += 1
            self.metrics.fetch_errors.labels(self._topic).inc()
            logger.warning(
                "pull from consumer %s on stream %s failed: %s (failure %d in a row); pulling again in %.1fs",
                self._consumer, self._stream, problem, failures, pause,
            )
            if failures >= _FETCH_ERRORS_BEFORE_RECHECK and not await self._consumer_exists():
                await self._unbind(f"consumer {self._consumer} on stream {self._stream} was deleted")
                logger.warning(
                    "consumer %s on stream %s is gone; waiting for it to be created again", self._consumer, self._stream
                )
                return
            await self._pause(pause)
            pause = min(pause * 2, _FETCH_ERROR_PAUSE[1])

    async def _on_delivery(self, msg: Msg) -> None:
        """Start the handler of a delivered message, or take note of a status from the server."""
        if not msg.reply:
            self._heard_at = asyncio.get_running_loop().time()
            self._on_status(msg)
            return
        self._delivered += 1
        if self._requested:
            self._requested -= 1
        if self._stopping.is_set():
            # Handed back once the open requests have ended (see _drain).
            self._late.append(msg)
            if not self._requested:
                self._wake()
            return
        self._start(msg)

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return  # an idle heartbeat
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None and pending.isdigit():
            self._requested = max(self._requested - int(pending), 0)
        else:
            self._requested = 0
        if status == "503":
            self._pull_problem = "no responders (status 503): the consumer or JetStream is not available"
        elif status not in ("404", "408"):
            # 409: the consumer was deleted, its leader changed, or a request broke a limit.
            lines = (headers.get("Description") or "").strip().splitlines()
            self._pull_problem = f"status {status} {lines[0]}" if lines else f"status {status}"
        self._wake()

    async def _consume_fetch(self) -> None:
        """Fetch batches sized to the free handler slots until stopped or the consumer is gone.

        Used with connections that are not a nats-py client, such as the in-memory double.
        """
        assert self._subscription is not None
        subscription = self._subscription
        pause = _FETCH_ERROR_PAUSE[0]
        failures = 0
        stop_waiter = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                # Wait for a free slot, so a batch never contains messages no handler can take.
                free = self._settings.concurrency - len(self._running)
                if free <= 0:
                    await self._wait(self._fetch_timeout)
                    continue

                fetch = asyncio.create_task(subscription.fetch(batch=free, timeout=self._fetch_timeout))
                await asyncio.wait({fetch, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    # Stopping: the pull request is already on the server, so let it finish
                    # and hand back what it brings during the drain.
                    self._pending_fetch = fetch
                    return
                try:
                    messages = fetch.result()
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    # No message within the fetch timeout. nats-py raises its own TimeoutError
                    # (and FetchTimeoutError) here, and on some paths the builtin one.
                    failures, pause = 0, _FETCH_ERROR_PAUSE[0]
                    continue
                except Exception as error:  # noqa: BLE001 - logged, counted and retried below
                    failures += 1
                    self.metrics.fetch_errors.labels(self._topic).inc()
                    translated = translate(error, f"fetch from consumer {self._consumer} on stream {self._stream}")
                    logger.warning("%s (failure %d in a row); fetching again in %.1fs", translated, failures, pause)
                    if failures >= _FETCH_ERRORS_BEFORE_RECHECK and not await self._consumer_exists():
                        await self._unbind(f"consumer {self._consumer} on stream {self._stream} was deleted")
                        logger.warning(
                            "consumer %s on stream %s is gone; waiting for it to be created again",
                            self._consumer, self._stream,
                        )
                        return
                    await self._pause(pause)
                    pause = min(pause * 2, _FETCH_ERROR_PAUSE[1])
                    continue

                failures, pause = 0, _FETCH_ERROR_PAUSE[0]
                for msg in messages:
                    self._start(msg)
        finally:
            stop_waiter.cancel()

    async def _wait(self, timeout: float) -> bool:
        """Sleep until ``_wake`` (a slot freed, a status, a stop) or ``timeout``; return whether woken."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def _consumer_exists(self) -> bool:
        try:
            await self._js.consumer_info(self._stream, self._consumer)
        except Exception as error:  # noqa: BLE001 - only "not found" is an answer here
            translated = translate(error, f"read consumer {self._consumer} on stream {self._stream}")
            if isinstance(translated, JetStreamNotFound):
                return False
            logger.warning("%s; assuming the consumer still exists", translated)
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if asked to stop meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _start(self, msg: Msg) -> None:
        if len(self._running) >= self._settings.concurrency:
            # Only after the dispatcher wrote off a pull request that delivered after all.
            self._backlog.append(msg)
            return
        ids = self._ids(msg)
        task = asyncio.create_task(self._handle(msg, ids))
        self._running[task] = _Running(msg, ids, asyncio.get_running_loop().time() + self._beat_interval)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        del self._running[task]
        if self._backlog and not self._stopping.is_set():
            self._start(self._backlog.popleft())
        self._wake()

    def _sweep(self) -> None:
        """Send in-progress heartbeats for the handlers that have run a third of the ack wait.

        One timer for all handlers: most finish long before their first beat, and a timer
        or task of their own would cost more than the rest of their dispatch. It wakes
        every sixth of the ack wait, so two beats of a long handler are at most half the
        ack wait apart.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        for running in self._running.values():
            if running.beat_at <= now:
                running.beat_at = now + self._beat_interval
                task = loop.create_task(self._heartbeat(running.msg, running.ids))
                self._beating.add(task)
                task.add_done_callback(self._beating.discard)
        self._beats = loop.call_later(self._beat_interval / 2, self._sweep)

    # --- handling ------------------------------------------------------------------------

    def _ids(self, msg: Msg) -> _Ids:
        # The ack subject carries the delivery count and stream sequence:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
        tokens = msg.reply.split(".") if msg.reply else ()
        if len(tokens) == 9 and tokens[1] == "ACK":
            delivered, seq = int(tokens[4]), int(tokens[5])
        else:
            metadata = msg.metadata
            delivered, seq = metadata.num_delivered, metadata.sequence.stream
        headers = msg.headers or {}
        if msg.subject.startswith(self._subject_prefix):
            name = msg.subject[len(self._subject_prefix):]
        else:
            name = headers.get(NAME_HEADER) or msg.subject.rsplit(".", 1)[-1]
        # The server drops Nats-Msg-Id from the copy a schedule delivers; the publisher
        # repeats the id in its own header for that case.
        msg_id = headers.get(MSG_ID_HEADER) or headers.get(_schedule.MSG_ID_HEADER) or f"{self._stream}-{seq}"
        return _Ids(
            topic=self._topic, name=name, msg_id=msg_id,
            subject=msg.subject, stream_seq=seq, delivery=delivered,
        )

    def _metrics(self, name: str) -> NameMetrics:
        found = self._names.get(name)
        if found is None:
            found = self._names[name] = self.metrics.for_name(self._topic, name)
        return found

    async def _handle(self, msg: Msg, ids: _Ids) -> None:
        metrics = self._metrics(ids.name)
        metrics.received += 1
        if ids.delivery > 1:
            metrics.redelivered += 1
        metrics.in_flight += 1
        try:
            verdict = await self._decide(msg, ids, metrics)
            await self._settle(msg, ids, verdict, metrics)
        except asyncio.CancelledError:
            # The drain deadline passed while the handler ran: hand the message back at once.
            if not msg.is_acked:
                logger.warning("%s: handler did not finish before the drain deadline; nak so another worker takes it", ids)
                await self._settle_quietly(msg.nak(), ids, "nak")
            raise
        except Exception:  # noqa: BLE001 - a bug here must not kill the fetch loop
            logger.exception("%s: settling the message failed; it is redelivered after the ack wait", ids)
        finally:
            metrics.in_flight -= 1

    async def _decide(self, msg: Msg, ids: _Ids, metrics: NameMetrics) -> _Verdict:
        """Return the outcome of one delivery: the checks, then the handler."""
        settings = self._settings

        # The server delivers once more than maxDeliver, so a worker that died during the
        # last allowed delivery does not lose the message: it is dead-lettered here.
        if ids.delivery > settings.max_deliver:
            return _Verdict(
                DeadLetter(f"delivered {ids.delivery} times, more than maxDeliver {settings.max_deliver}"),
                "MaxDeliverExceeded",
                "earlier deliveries ended without an acknowledgement (a worker stopped or its ack wait ran out)",
            )

        handler = self._worker.handler(ids.name)
        if handler is None:
            error = ConfigurationError(f"worker has no handler for {ids.name!r}; register one or narrow the Consumer's names")
            return self._failed(ids, error)

        # Poison input can never succeed, so it skips the retries.
        try:
            # Decoding first spares json.loads its detection of the byte encoding.
            payload = json.loads(msg.data.decode())
        except ValueError as error:
            return _Verdict(DeadLetter("payload is not valid JSON"), type(error).__name__, str(error))
        if not isinstance(payload, dict):
            return _Verdict(
                DeadLetter("payload is not a JSON object"), "PayloadError", f"got a JSON {type(payload).__name__}"
            )
        assert self._contract is not None
        missing = self._contract.missing_keys(ids.name, payload)
        if missing:
            return _Verdict(
                DeadLetter(f"payload lacks required key(s) {', '.join(missing)}"), "PayloadError",
                f"the topic's contract requires {', '.join(self._contract.required_keys)} for {ids.name}",
            )
        try:
            argument = handler.parse(payload)
        except pydantic.ValidationError as error:
            model = handler.model.__name__ if handler.model else "model"
            return _Verdict(
                DeadLetter(f"payload does not match {model}"), "ValidationError", _describe_validation(error)
            )

        return await self._call(handler, argument, msg, ids, metrics)

    async def _call(self, handler: Handler, argument: Any, msg: Msg, ids: _Ids, metrics: NameMetrics) -> _Verdict:
        headers = msg.headers or {}
        context = Context.create(
            msg_id=ids.msg_id, name=ids.name, topic=ids.topic, subject=ids.subject, stream_seq=ids.stream_seq,
            delivery=ids.delivery, headers=headers, publisher=self._publisher,
        )
        started = time.perf_counter()
        with _tracing.handling(headers, ids.subject, ids.name, ids.msg_id, ids.delivery) as span:
            try:
                try:
                    if handler.timeout is None:
                        outcome = resolve(await handler.func(argument, context))
                    else:
                        outcome = await self._call_with_timeout(handler, argument, context)
                except Outcome as raised:
                    outcome = raised
            except Exception as error:  # noqa: BLE001 - every handler failure becomes an outcome
                span.failed(error)
                return self._failed(ids, error)
            finally:
                duration = time.perf_counter() - started
                metrics.duration.observe(duration)
            span.set("eventrails.outcome", outcome.kind)

        if isinstance(outcome, Retry) and ids.delivery >= self._settings.max_deliver:
            return _Verdict(
                DeadLetter(f"still asking to retry after {ids.delivery} deliveries: {outcome.reason or 'no reason given'}"),
                "RetriesExhausted", outcome.reason, duration,
            )
        if isinstance(outcome, DeadLetter):
            return _Verdict(outcome, "DeadLetter", outcome.reason, duration)
        return _Verdict(outcome, duration=duration)

    @staticmethod
    async def _call_with_timeout(handler: Handler, argument: Any, context: Context) -> Outcome:
        deadline = asyncio.timeout(handler.timeout)
        try:
            async with deadline:
                return resolve(await handler.func(argument, context))
        except TimeoutError as error:
            # Only the registered timeout becomes HandlerTimeout; a TimeoutError the
            # handler raised itself stays what it is.
            if not deadline.expired():
                raise
            raise HandlerTimeout(f"handler ran longer than its {handler.timeout:g}s timeout") from error

    def _failed(self, ids: _Ids, error: BaseException) -> _Verdict:
        """Retry an unexpected failure with the backoff delay, or dead-letter it after maxDeliver."""
        max_deliver = self._settings.max_deliver
        detail = f"{type(error).__name__}: {error}"
        if ids.delivery >= max_deliver:
            logger.error("%s: handler failed on the last allowed delivery (%s)", ids, detail, exc_info=error)
            return _Verdict(
                DeadLetter(f"handler failed on all {ids.delivery} deliveries"), type(error).__name__, str(error)
            )
        delay = backoff_delay(self._settings.backoff, ids.delivery)
        logger.warning(
            "%s: handler failed (%s); redelivery in %.1fs, delivery %d of %d",
            ids, detail, delay, ids.delivery, max_deliver, exc_info=error,
        )
        return _Verdict(Retry(delay, detail), type(error).__name__, str(error))

    async def _heartbeat(self, msg: Msg, ids: _Ids) -> None:
        """Tell the server the handler is still working, so a long handler is not redelivered."""
        try:
            await msg.in_progress()
        except Exception as error:  # noqa: BLE001 - a missed heartbeat is logged, the handler goes on
            logger.warning("%s: in-progress heartbeat failed (%s); the server may redeliver", ids, error)
        else:
            logger.debug("%s: handler still running; sent an in-progress heartbeat", ids)

    # --- settling ------------------------------------------------------------------------

    async def _settle(self, msg: Msg, ids: _Ids, verdict: _Verdict, metrics: NameMetrics) -> None:
        outcome = verdict.outcome
        kind = outcome.kind
        if isinstance(outcome, Done):
            # A plain ack is a publish: it is on its way once written, and the handler's
            # outcome does not wait for the server's word (see docs/benchmarks.md).
            try:
                await msg.ack()
            except Exception as error:  # noqa: BLE001 - the server redelivers after the ack wait
                self._settle_failed(ids, "ack", error)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: done in %.3fs; acknowledged", ids, verdict.duration)
        elif isinstance(outcome, Retry):
            delay = outcome.delay if outcome.delay is not None else backoff_delay(self._settings.backoff, ids.delivery)
            outcome = Retry(delay, outcome.reason)
            await self._settle_quietly(msg.nak(delay=delay), ids, "nak")
            if not verdict.error_type:
                logger.info(
                    "%s: retry requested (%s); redelivery in %.1fs, delivery %d of %d",
                    ids, outcome.reason or "no reason given", delay, ids.delivery, self._settings.max_deliver,
                )
        elif isinstance(outcome, Skip):
            await self._settle_quietly(msg.ack(), ids, "ack")
            logger.info("%s: skipped (%s); acknowledged", ids, outcome.reason)
        else:
            kind = await self._dead_letter(msg, ids, verdict, metrics)
        metrics.outcome(kind)
        if self._settings.publish_outcomes:
            await self._announce(ids, kind, outcome.reason)

    async def _settle_quietly(self, settling: Any, ids: _Ids, action: str) -> bool:
        try:
            await settling
        except Exception as error:  # noqa: BLE001 - the server redelivers after the ack wait
            self._settle_failed(ids, action, error)
            return False
        return True

    def _settle_failed(self, ids: _Ids, action: str, error: Exception) -> None:
        logger.warning(
            "%s: could not %s (%s: %s); the server redelivers it after the ack wait of %.0fs",
            ids, action, type(error).__name__, error, self._settings.ack_wait,
        )

    async def _dead_letter(self, msg: Msg, ids: _Ids, verdict: _Verdict, metrics: NameMetrics) -> str:
        """Move the message to the dead-letter stream and ack it; return the outcome kind applied."""
        settings = self._settings
        reason = verdict.outcome.reason
        if not settings.dead_letter:
            await self._settle_quietly(msg.term(), ids, "terminate")
            metrics.dead_lettered.inc()
            logger.warning(
                "%s: terminated without a dead-letter copy (topic %s has no dead-letter stream): %s; %s",
                ids, ids.topic, reason, verdict.error,
            )
            return "dead_letter"

        headers = {key: value for key, value in (msg.headers or {}).items() if not key.startswith("Nats-")}
        headers.update({
            ORIGINAL_MSG_ID_HEADER: ids.msg_id,
            ORIGINAL_SUBJECT_HEADER: ids.subject,
            STREAM_SEQ_HEADER: str(ids.stream_seq),
            DELIVERY_HEADER: str(ids.delivery),
            DLQ_REASON_HEADER: _short(reason),
            DLQ_ERROR_TYPE_HEADER: verdict.error_type or type(verdict.outcome).__name__,
            DLQ_ERROR_HEADER: _short(verdict.error or reason),
            # One id per stored message: a crash between this publish and the ack below
            # makes the next attempt a duplicate rather than a second dead letter.
            MSG_ID_HEADER: f"{self._stream}-{ids.stream_seq}-dlq",
        })
        subject = _naming.dead_letter_subject(settings.subject_prefix, settings.namespace, ids.topic, ids.name)
        try:
            ack = await publish_with_retry(
                self._nc, self._js, subject, msg.data, headers, stream=settings.dead_letter_stream,
                description=f"dead-letter {ids} to {subject}", deadline=min(10.0, settings.ack_wait / 2),
            )
        except Exception as error:  # noqa: BLE001 - the message stays in the stream, see below
            delay = backoff_delay(settings.backoff, ids.delivery)
            await self._settle_quietly(msg.nak(delay=delay), ids, "nak")
            logger.error(
                "%s: could not dead-letter (%s) after: %s; the message stays in stream %s and is tried again "
                "in %.1fs while deliveries remain",
                ids, error, reason, self._stream, delay,
            )
            return "retry"

        await self._settle_quietly(msg.ack(), ids, "ack")
        metrics.dead_lettered.inc()
        logger.warning(
            "%s: dead-lettered to stream %s seq %d%s: %s%s",
            ids, ack.stream, ack.seq, " (already there)" if ack.duplicate else "", reason,
            f" ({verdict.error_type}: {_short(verdict.error)})" if verdict.error and verdict.error != reason else "",
        )
        return "dead_letter"

    async def _announce(self, ids: _Ids, kind: str, reason: str) -> None:
        settings = self._settings
        if not settings.publish_outcomes:
            return
        subject = _naming.outcome_subject(settings.subject_prefix, settings.namespace, ids.topic, ids.name)
        body = {
            "msgId": ids.msg_id, "topic": ids.topic, "name": ids.name, "outcome": kind, "reason": reason,
            "delivery": ids.delivery, "streamSeq": ids.stream_seq,
        }
        try:
            await self._nc.publish(subject, json.dumps(body).encode())
        except Exception as error:  # noqa: BLE001 - announcements are best effort
            logger.debug("%s: could not announce outcome %s on %s: %s", ids, kind, subject, error)

    # --- draining ------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Let in-flight handlers finish within the drain timeout and hand back the rest."""
        self._draining = True
        self.metrics.ready.set(0)
        # Delivered but never started: handed back with the late deliveries below.
        self._late.extend(self._backlog)
        self._backlog.clear()
        unfinished: set[asyncio.Task[None]] = set()
        if self._running:
            logger.info(
                "waiting up to %.0fs for %d in-flight handler(s) to finish",
                self._settings.drain_timeout, len(self._running),
            )
            _, unfinished = await asyncio.wait(set(self._running), timeout=self._settings.drain_timeout)

        # A pull that was under way when the stop came still delivers until it expires.
        # No handler runs for those messages, so they go back at once. The handlers cut
        # short are handed back after that, or the pull would take their messages back.
        leftovers = await self._end_pulls()
        for msg in leftovers:
            await self._settle_quietly(msg.nak(), self._ids(msg), "nak")
        if leftovers:
            logger.info("handed back %d fetched but unhandled message(s) with a nak", len(leftovers))

        unfinished = {task for task in unfinished if not task.done()}
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

        await self._unbind("stopped")
        self._bound = False
        if self._nc.is_connected:
            try:
                await self._nc.flush(timeout=2)
            except Exception as error:  # noqa: BLE001 - the server redelivers whatever was not settled
                logger.warning("flushing acknowledgements before stopping failed: %s", error)
        logger.info("stopped consuming %s on stream %s", self._consumer, self._stream)

    async def _end_pulls(self) -> list[Msg]:
        """Wait for the pull requests still open to end; return the messages they brought meanwhile."""
        fetch, self._pending_fetch = self._pending_fetch, None
        if fetch is not None:
            if not fetch.done():
                logger.info("waiting up to %.1fs for the fetch under way to return", self._fetch_timeout)
            try:
                self._late.extend(await asyncio.wait_for(fetch, timeout=self._fetch_timeout + 1.0))
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                pass
            except Exception as error:  # noqa: BLE001 - a failed fetch brought nothing to hand back
                logger.warning("the last fetch from consumer %s failed while draining: %s", self._consumer, error)
        if self._streaming and self._requested and self._subscription is not None:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + self._fetch_timeout + _PULL_GRACE
            # The pull expires on the server after the fetch timeout; the grace is for its word to arrive.
            logger.info(
                "waiting up to %.1fs for the fetch under way to return (%d message(s) requested)",
                self._fetch_timeout, self._requested,
            )
            while self._requested and loop.time() < give_up:
                await self._wait(give_up - loop.time())
        late, self._late = self._late, []
        return late


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop when it is installed (the ``uvloop`` extra), else on asyncio's loop.

    uvloop's transports and scheduling in C shorten the dispatch of every message; see
    docs/benchmarks.md for the difference on one machine.
    """
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    # Outside the except block: an error raised while the loop runs would otherwise carry
    # the ImportError as its context, and every traceback would open with it.
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
