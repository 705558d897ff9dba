"""The outbox relay: moves committed outbox rows to JetStream and marks them published.

One cycle claims a batch of rows under a lease, publishes them concurrently with the row
id as ``Nats-Msg-Id``, and marks those JetStream acknowledged as published. Nothing is
marked without a PubAck. Cycles overlap: while one batch waits for its PubAcks and its
mark, the loop claims and starts the next, up to ``_BATCHES_IN_FLIGHT`` batches at once.
Rows claimed by a batch still in flight keep their lease, and the claim skips the later
rows of an aggregate until the earlier one is marked, so overlapping never reorders an
aggregate and never publishes a row twice.

A relay that crashes after the PubAck and before the mark leaves the row claimed. Once
the lease runs out, a relay publishes it again, JetStream drops the copy as a duplicate
(within the topic's duplicate window), and the row is marked.

What happens to a row that fails:

- the payload or topic no longer passes the contract (PayloadError, ConfigurationError):
  parked at once, because no retry can fix it;
- NATS is unavailable (down, reconnecting, no PubAck in time): the row is released
  untouched and the whole relay pauses with a growing delay; an outage never parks rows;
- anything else (the stream is missing, the server rejects the message, marking fails):
  ``attempts`` goes up and ``available_at`` moves forward with exponential backoff, and
  after ``max_attempts`` the row is parked with its last error, a log line and a metric.

The loop never stops at a failure and never spins: after a database error it pauses
with a growing delay, and when no row is ready it waits for a notification (PostgreSQL
LISTEN/NOTIFY) or the poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventrails._durations import parse_duration
from eventrails._errors import ConfigurationError, NatsUnavailable, PayloadError, is_temporary, translate
from eventrails._outbox import _trace
from eventrails._outbox._contracts import is_event_name
from eventrails._outbox._dberrors import describe
from eventrails._outbox._port import DEFAULT_TABLE, TABLE_PATTERN
from eventrails._outbox._store import ClaimedRow, RelayStore
from eventrails._publisher import PublishIncomplete, PublishReceipt, Publisher
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.outbox")

# Pause of the whole relay after a database error or while NATS is away: first and longest.
_PAUSE_FIRST = 0.5
_PAUSE_MAX = 30.0
# How often a relay without a NATS connection looks whether the client has reconnected.
_RECONNECT_CHECK = 0.1
# Batches being published and marked at once: the next claim runs while the previous
# batch waits for its PubAcks, so a row committed mid-batch does not wait for that batch.
_BATCHES_IN_FLIGHT = 2
_PUBLISH_DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _seconds(value: object) -> object:
    if isinstance(value, str) and value.strip() and value.strip()[-1].isalpha():
        return parse_duration(value.strip())
    return value


class OutboxRelaySettings(BaseSettings):
    """Settings of ``eventrails outbox relay``, read from ``EVENTRAILS_OUTBOX_*`` variables.

    Durations take seconds or a duration such as ``30s``, ``5m`` or ``7d``.
    """

    model_config = SettingsConfigDict(env_prefix="EVENTRAILS_OUTBOX_", extra="ignore")

    dsn: str = Field(default="", description="PostgreSQL URI or sqlite:///path of the database with the outbox table.")
    table: str = Field(default=DEFAULT_TABLE, pattern=f"^{TABLE_PATTERN}$", description="Outbox table name.")
    batch_size: int = Field(default=100, ge=1, le=10000, description="Rows claimed per cycle.")
    concurrency: int = Field(
        default=64, ge=1, le=1024, description="PubAcks awaited at once per topic and task of a batch.",
    )
    lease: float = Field(default=30.0, gt=0, description="How long a claim lasts; a dead relay's rows wait this long.")
    poll_interval: float = Field(default=1.0, gt=0, description="Maximum wait between two claims when no notification arrives.")
    publish_timeout: float = Field(default=5.0, gt=0, description="Deadline of one publish, retries included.")
    max_attempts: int = Field(default=10, ge=1, description="Failed publishes of a row before it is parked.")
    backoff: float = Field(default=1.0, gt=0, description="Delay after a row's first failure; doubles each time.")
    backoff_max: float = Field(default=300.0, gt=0, description="Maximum delay between two attempts of a row.")
    retention: float = Field(default=7 * 86400.0, ge=0, description="How long published rows are kept.")
    purge_interval: float = Field(default=300.0, gt=0, description="Time between two purges of published rows.")
    stats_interval: float = Field(default=5.0, gt=0, description="Time between two refreshes of the row gauges.")
    health_port: int = Field(default=8080, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics; 0 picks one.")
    health_host: str = Field(default="0.0.0.0", description="Address the health server binds.")
    relay_id: str = Field(default="", description="Name written into claimed_by; default host name and process id.")

    _durations = field_validator(
        "lease", "poll_interval", "publish_timeout", "backoff", "backoff_max", "retention", "purge_interval",
        "stats_interval", mode="before",
    )(_seconds)

    def effective_relay_id(self) -> str:
        return self.relay_id or f"{socket.gethostname()}-{os.getpid()}"


class RelayMetrics:
    """The relay's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pending = Gauge("eventrails_outbox_pending_rows", "Rows not yet published (parked rows excluded).", registry=r)
        self.oldest_pending_age = Gauge(
            "eventrails_outbox_oldest_pending_age_seconds", "Age of the oldest row not yet published.", registry=r,
        )
        self.parked = Gauge("eventrails_outbox_parked_rows", "Rows the relay gave up on; they need a person.", registry=r)
        self.published = Counter(
            "eventrails_outbox_published", "Rows published and marked, by topic.", ("topic",), registry=r,
        )
        self.duplicates = Counter(
            "eventrails_outbox_duplicates",
            "Rows JetStream already held (a re-publish after a crash or a failed mark), by topic.", ("topic",), registry=r,
        )
        self.failures = Counter(
            "eventrails_outbox_failures",
            "Failed attempts by topic and reason (invalid, unavailable, publish, mark).", ("topic", "reason"), registry=r,
        )
        self.parked_total = Counter("eventrails_outbox_parked", "Rows parked, by topic.", ("topic",), registry=r)
        self.purged = Counter("eventrails_outbox_purged", "Published rows deleted after the retention period.", registry=r)
        self.publish_delay = Histogram(
            "eventrails_outbox_publish_delay_seconds", "Time from a row's transaction start to its PubAck.",
            buckets=_PUBLISH_DELAY_BUCKETS, registry=r,
        )
        self.database_errors = Counter(
            "eventrails_outbox_database_errors", "Failed statements against the outbox table.", registry=r,
        )
        self.ready = Gauge("eventrails_outbox_relay_ready", "1 while connected to NATS and the database.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class _Result:
    row: ClaimedRow
    receipt: PublishReceipt | None = None
    error: BaseException | None = None


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class OutboxRelay:
    """Publishes committed outbox rows from ``store`` to JetStream over ``nc``.

    ``run`` loops until ``stop``; ``run_once`` does one claim-publish-mark cycle and returns
    the number of rows it claimed. Several relays may run against one table at once.
    """

    def __init__(
        self, store: RelayStore, nc: NATS, nats_settings: NatsSettings | None = None,
        settings: OutboxRelaySettings | None = None, *, metrics: RelayMetrics | None = None,
    ) -> None:
        self.settings = settings if settings is not None else OutboxRelaySettings()
        self.relay_id = self.settings.effective_relay_id()
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self._store = store
        self._nc = nc
        self._publisher = Publisher(
            nc, nats_settings, publish_deadline=self.settings.publish_timeout,
            attempt_timeout=min(2.0, self.settings.publish_timeout),
        )
        self._semaphore = asyncio.Semaphore(self.settings.concurrency)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._nats_away = False
        self._database_ok = False
        self._next_stats = 0.0
        self._next_purge = 0.0
        self._batches: set[asyncio.Task[None]] = set()
        self._batch_error: BaseException | None = None

    @property
    def ready(self) -> bool:
        return self._database_ok and self._nc.is_connected and not self._nats_away

    def readiness(self) -> tuple[bool, str]:
        if not self._nc.is_connected or self._nats_away:
            return False, "not connected to NATS"
        if not self._database_ok:
            return False, f"the outbox database {self._store.display} is not reachable"
        return True, "ready"

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Start the next cycle now instead of after the poll interval."""
        self._wake.set()

    async def run(self) -> None:
        """Relay rows until ``stop`` is called; database and NATS failures pause the loop, never end it."""
        listener = asyncio.create_task(self._store.listen(self._wake, self._stopping), name="eventrails-outbox-listen")
        pause = _PAUSE_FIRST
        logger.info(
            "outbox relay %s started on %s: batches of %d, lease %.0fs, polling every %.1fs",
            self.relay_id, self._store.display, self.settings.batch_size, self.settings.lease, self.settings.poll_interval,
        )
        try:
            while not self._stopping.is_set():
                # Without NATS a claim would only hold rows another relay might publish.
                if not self._nc.is_connected:
                    self._set_ready()
                    logger.warning(
                        "outbox relay %s is not connected to NATS; claiming again once it reconnects", self.relay_id,
                    )
                    await self._wait_for_nats()
                    continue

                self._wake.clear()
                try:
                    claimed = await self._dispatch()
                    await self._housekeeping()
                except Exception as error:  # noqa: BLE001 - the loop must outlive any database failure
                    self._database_ok = False
                    self._set_ready()
                    self.metrics.database_errors.inc()
                    logger.warning(
                        "outbox relay %s: a statement on %s failed: %s; claimed rows wait for their lease, "
                        "retrying in %.1fs", self.relay_id, self._store.display, describe(error), pause,
                    )
                    await self._pause(pause)
                    pause = min(pause * 2, _PAUSE_MAX)
                    continue

                if self._nats_away:
                    logger.warning(
                        "outbox relay %s: NATS did not acknowledge within %.1fs; rows were released, "
                        "claiming again in %.1fs", self.relay_id, self.settings.publish_timeout, pause,
                    )
                    await self._pause(pause)
                    pause = min(pause * 2, _PAUSE_MAX)
                    continue
                pause = _PAUSE_FIRST

                # A batch that claimed rows may have left more behind it: go on at once.
                if claimed == 0:
                    await self._wait_for_work()
        finally:
            self._stopping.set()
            # The batches in flight finish their publishes and marks, each within the publish timeout.
            if self._batches:
                await asyncio.wait(self._batches)
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            self.metrics.ready.set(0)
            logger.info("outbox relay %s stopped", self.relay_id)

    async def _dispatch(self) -> int:
        """Claim a batch and start relaying it in the background; return how many rows were claimed.

        Waits first while ``_BATCHES_IN_FLIGHT`` batches are still in flight. Raises the
        database error of a claim, or of a finished batch's mark, so the loop pauses.
        """
        while len(self._batches) >= _BATCHES_IN_FLIGHT:
            await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)
        self._raise_batch_error()
        if self._stopping.is_set():
            return 0
        rows = await self._claim()
        if not rows:
            return 0
        task = asyncio.create_task(self._relay(rows), name="eventrails-outbox-batch")
        self._batches.add(task)
        task.add_done_callback(self._batch_finished)
        return len(rows)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._batch_error = self._batch_error or error
            self._wake.set()

    def _raise_batch_error(self) -> None:
        error, self._batch_error = self._batch_error, None
        if error is not None:
            raise error

    async def run_once(self) -> int:
        """Claim one batch, publish it and record each row's result; return how many rows were claimed.

        Raises the database error when a statement fails; the rows stay claimed until their lease ends.
        """
        rows = await self._claim()
        if rows:
            await self._relay(rows)
        return len(rows)

    async def _claim(self) -> list[ClaimedRow]:
        settings = self.settings
        rows = await self._store.claim(self.relay_id, settings.batch_size, settings.lease)
        self._database_ok = True
        if not rows:
            if self._nats_away:
                await self._check_nats()
            self._set_ready()
            return rows
        logger.debug("outbox relay %s claimed %d row(s)", self.relay_id, len(rows))
        return rows

    async def _relay(self, rows: list[ClaimedRow]) -> None:
        """Publish claimed ``rows``, mark the acknowledged ones and record the failures of the others."""
        results = await self._publish_all(rows)

        # Only rows with a PubAck are marked; the others get their failure recorded.
        acknowledged = [result for result in results if result.receipt is not None]
        if acknowledged:
            self._nats_away = False
            self._set_ready()
        await self._mark(acknowledged)
        unavailable = [result for result in results if result.error is not None and self._is_outage(result.error)]
        if unavailable:
            self._nats_away = True
            self._set_ready()
            for result in unavailable:
                self.metrics.failures.labels(result.row.topic, "unavailable").inc()
            first = unavailable[0]
            await self._store.release(
                [result.row.id for result in unavailable], self.relay_id,
                _error_text(first.error) if first.error else "NATS unavailable",
            )
        for result in results:
            if result.error is not None and not self._is_outage(result.error):
                await self._fail(result.row, result.error, reason="invalid" if self._is_permanent(result.error) else "publish")
        # The marks may have made the next rows of these aggregates claimable: claim again now.
        if any(row.aggregate_key is not None for row in rows):
            self._wake.set()

    # --- publishing ------------------------------------------------------------------------

    async def _publish_all(self, rows: list[ClaimedRow]) -> list[_Result]:
        """Publish ``rows`` and return one result per row, in the order of ``rows``.

        Tasks go out pipelined, one ``enqueue_many`` per topic and task name. A row that
        carries its writer's trace context, and a domain event, is published on its own,
        so its publish continues that trace.
        """
        groups: dict[tuple[str, str], list[int]] = {}
        alone: list[int] = []
        for index, row in enumerate(rows):
            if is_event_name(row.name) or _trace.carries_context(row.headers):
                alone.append(index)
            else:
                groups.setdefault((row.topic, row.name), []).append(index)
        results: list[_Result | None] = [None] * len(rows)
        outcomes = await asyncio.gather(
            *(self._publish_group([rows[index] for index in indexes]) for indexes in groups.values()),
            *(self._publish_one(rows[index]) for index in alone),
        )
        for indexes, group_results in zip([*groups.values(), *([index] for index in alone)], outcomes, strict=True):
            for index, result in zip(indexes, group_results, strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    async def _publish_group(self, rows: list[ClaimedRow]) -> list[_Result]:
        """Publish task rows of one topic and task name with one ``enqueue_many``; return their results in order."""
        first = rows[0]
        try:
            receipts: Sequence[PublishReceipt | None] = await self._publisher.enqueue_many(
                first.topic, first.name, [row.payload for row in rows], dedupe_keys=[row.msg_id for row in rows],
                max_pending=self.settings.concurrency,
            )
            missing: BaseException | None = None
        except (PayloadError, ConfigurationError):
            # enqueue_many checks every payload before sending any: find the rows at fault one by one.
            return list(await asyncio.gather(*(self._publish(row) for row in rows)))
        except PublishIncomplete as error:
            # The receipts tell which rows were stored; the error is the first missing row's.
            receipts, missing = error.receipts, translate(error.__cause__ or error, f"publishing {first.describe()}")
        except Exception as error:  # noqa: BLE001 - every failure becomes the rows' outcome
            return [_Result(row, error=error) for row in rows]

        now = datetime.now(timezone.utc)
        results = [_Result(row, receipt=receipt) for row, receipt in zip(rows, receipts, strict=True)]
        for result in results:
            if result.receipt is not None:
                self.metrics.publish_delay.observe(max((now - result.row.created_at).total_seconds(), 0.0))
            elif missing is not None and self._is_outage(missing):
                # NATS stopped responding: the row is released without waiting another deadline.
                result.error = missing
            else:
                # A rejection may concern one row only: each remaining row gets its own outcome.
                # A row JetStream stored meanwhile comes back as a duplicate.
                retried = await self._publish(result.row)
                result.receipt, result.error = retried.receipt, retried.error
        return results

    async def _publish_one(self, row: ClaimedRow) -> list[_Result]:
        return [await self._publish(row)]

    async def _publish(self, row: ClaimedRow) -> _Result:
        async with self._semaphore:
            try:
                # The publisher sets the message id and tenancy headers itself; the row's trace
                # context becomes the current one, so the publish continues the writer's trace.
                with _trace.continuing(row.headers):
                    if is_event_name(row.name):
                        receipt = await self._publisher.publish_event(
                            row.name, row.payload, topic=row.topic, dedupe_key=row.msg_id,
                        )
                    else:
                        receipt = await self._publisher.enqueue(row.topic, row.name, row.payload, dedupe_key=row.msg_id)
            except Exception as error:  # noqa: BLE001 - every failure becomes the row's outcome
                return _Result(row, error=error)
        delay = (datetime.now(timezone.utc) - row.created_at).total_seconds()
        self.metrics.publish_delay.observe(max(delay, 0.0))
        return _Result(row, receipt=receipt)

    @staticmethod
    def _is_permanent(error: BaseException) -> bool:
        return isinstance(error, (PayloadError, ConfigurationError))

    @staticmethod
    def _is_outage(error: BaseException) -> bool:
        return isinstance(error, NatsUnavailable) or is_temporary(error)

    async def _mark(self, acknowledged: Sequence[_Result]) -> None:
        if not acknowledged:
            return
        try:
            await self._store.mark_published([result.row.id for result in acknowledged])
        except Exception as error:  # noqa: BLE001 - retried row by row below
            if len(acknowledged) == 1:
                await self._mark_failed(acknowledged[0], error)
                return
            logger.warning(
                "outbox relay %s: marking %d published rows failed (%s); marking them one by one",
                self.relay_id, len(acknowledged), describe(error),
            )
            for result in acknowledged:
                try:
                    await self._store.mark_published([result.row.id])
                except Exception as row_error:  # noqa: BLE001 - recorded as the row's failure
                    await self._mark_failed(result, row_error)
                else:
                    self._count_published(result)
            return
        for result in acknowledged:
            self._count_published(result)

    def _count_published(self, result: _Result) -> None:
        row, receipt = result.row, result.receipt
        assert receipt is not None
        if receipt.duplicate:
            self.metrics.duplicates.labels(row.topic).inc()
            logger.debug(
                "%s was already in stream %s at seq %d (a re-publish); marked published",
                row.describe(), receipt.stream, receipt.seq,
            )
        else:
            self.metrics.published.labels(row.topic).inc()
            logger.debug("published %s as stream %s seq %d", row.describe(), receipt.stream, receipt.seq)

    async def _mark_failed(self, result: _Result, error: BaseException) -> None:
        receipt = result.receipt
        assert receipt is not None
        message = (
            f"published to stream {receipt.stream} as seq {receipt.seq}, but marking the row failed: {describe(error)}"
        )
        await self._fail(result.row, RuntimeError(message), reason="mark")

    async def _fail(self, row: ClaimedRow, error: BaseException, reason: str) -> None:
        settings = self.settings
        attempts = row.attempts + 1
        text = str(error) if reason == "mark" else _error_text(error)
        park = reason == "invalid" or attempts >= settings.max_attempts
        retry_in = min(settings.backoff * 2 ** (attempts - 1), settings.backoff_max) * random.uniform(0.8, 1.2)
        await self._store.record_failure(row.id, self.relay_id, text, retry_in, park)
        self.metrics.failures.labels(row.topic, reason).inc()
        if park:
            self.metrics.parked_total.labels(row.topic).inc()
            blocked = f"; later rows of aggregate {row.aggregate_key} wait behind it" if row.aggregate_key else ""
            logger.error(
                "parked %s after %d attempt(s): %s; fix the cause, then run `eventrails outbox unpark --id %s`%s",
                row.describe(), attempts, text, row.id, blocked,
            )
        else:
            logger.warning(
                "%s failed on attempt %d of %d: %s; retrying in %.1fs",
                row.describe(), attempts, settings.max_attempts, text, retry_in,
            )

    # --- waiting and housekeeping ----------------------------------------------------------

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + self.settings.stats_interval
            stats = await self._store.stats()
            self.metrics.pending.set(stats.pending)
            self.metrics.oldest_pending_age.set(stats.oldest_pending_age)
            self.metrics.parked.set(stats.parked)
        if now >= self._next_purge and self.settings.retention > 0:
            self._next_purge = now + self.settings.purge_interval
            purged = await self._store.purge(self.settings.retention)
            if purged:
                self.metrics.purged.inc(purged)
                logger.info(
                    "purged %d published outbox row(s) older than %.0fs from %s", purged, self.settings.retention,
                    self._store.display,
                )

    async def _wait_for_work(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval)

    async def _check_nats(self) -> None:
        """Clear the outage flag once the server responds to a ping again, for the readiness check."""
        try:
            await self._nc.flush(timeout=max(1, math.ceil(self.settings.publish_timeout)))
        except Exception as error:  # noqa: BLE001 - still away; the flag stays
            logger.debug("outbox relay %s: NATS still does not respond: %s; pausing again", self.relay_id, error)
        else:
            self._nats_away = False

    async def _wait_for_nats(self) -> None:
        while not self._nc.is_connected and not self._stopping.is_set():
            await self._pause(_RECONNECT_CHECK)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _set_ready(self) -> None:
        self.metrics.ready.set(1 if self.ready else 0)

