"""``eventrails dlq list | show | replay`` against dead letters a real worker wrote to nats-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from eventrails import Context, DeadLetter, Worker
from eventrails._cli import app
from tests.integration.test_runtime import (
    Rails,
    SendEmail,
    consumer_resource,
    email,
    eventually,
    rails,
    running,
    topic_resource,
)

pytestmark = pytest.mark.integration


async def cli(rails: Rails, *args: str) -> Result:
    """Run the CLI in a thread (it runs its own event loop) against the test server."""
    command = [*args, "--servers", rails.server.url, "--namespace", "shop"]
    return await asyncio.to_thread(CliRunner().invoke, app, command)


async def dead_letters_written(rails: Rails) -> Any:
    """Dead-letter three messages: two by the handler's verdict, one poison payload."""
    topic, consumer = topic_resource(), consumer_resource(names=["send-email"])
    await rails.apply_topic(topic)
    settings = await rails.apply_consumer(consumer, topic)
    worker = Worker()

    @worker.task("send-email")
    async def refuse(payload: SendEmail, ctx: Context) -> DeadLetter:
        return DeadLetter(f"mailbox of email {payload.emailId} does not exist")

    publisher = rails.publisher()
    async with running(worker, settings):
        await publisher.enqueue("orders", "send-email", email(1), dedupe_key="email-1")
        await publisher.enqueue("orders", "send-email", email(2), dedupe_key="email-2")
        await rails.js.publish("eventrails.shop.orders.send-email", b"{oops", headers={"Nats-Msg-Id": "poison-3"})

        async def three() -> bool:
            return await rails.stream_messages("shop_orders_dlq") == 3

        await eventually(three, "three dead letters")
        for _ in range(3):
            assert (await rails.outcomes.next())["outcome"] == "dead_letter"
    return settings


async def test_list_and_show(rails: Rails) -> None:
    await dead_letters_written(rails)

    listing = await cli(rails, "dlq", "list", "orders")
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "NAME", "DELIVERY", "ERROR", "TYPE", "REASON", "ORIGINAL", "SUBJECT"]
    assert len(lines) == 5
    assert "3 dead letter(s) in stream shop_orders_dlq" in lines[-1]

    as_json = await cli(rails, "dlq", "list", "orders", "--json")
    document = json.loads(as_json.output)
    assert document["total"] == 3
    by_msg_id = {entry["originalMsgId"]: entry for entry in document["entries"]}
    assert set(by_msg_id) == {"email-1", "email-2", "poison-3"}
    assert by_msg_id["email-1"]["reason"] == "mailbox of email 1 does not exist"
    assert by_msg_id["email-1"]["errorType"] == "DeadLetter"
    assert by_msg_id["email-1"]["delivery"] == 1
    assert by_msg_id["email-1"]["name"] == "send-email"
    assert by_msg_id["email-1"]["originalSubject"] == "eventrails.shop.orders.send-email"
    assert by_msg_id["poison-3"]["reason"] == "payload is not valid JSON"
    assert by_msg_id["poison-3"]["errorType"] == "JSONDecodeError"
    assert all(entry["time"] for entry in document["entries"])

    seq = by_msg_id["email-2"]["seq"]
    shown = await cli(rails, "dlq", "show", "orders", str(seq), "--json")
    assert shown.exit_code == 0, shown.output
    entry = json.loads(shown.output)
    assert entry["payload"] == email(2)
    assert entry["headers"]["Eventrails-Organization-Id"] == "org_1"
    assert entry["headers"]["Eventrails-Dlq-Reason"] == "mailbox of email 2 does not exist"
    text = await cli(rails, "dlq", "show", "orders", str(by_msg_id["poison-3"]["seq"]))
    assert "payload:\n\"{oops\"" in text.output
    assert "reason:          payload is not valid JSON" in text.output

    # Paging: from a later sequence, at most one entry.
    page = json.loads((await cli(rails, "dlq", "list", "orders", "--start", "2", "--limit", "1", "--json")).output)
    assert [item["seq"] for item in page["entries"]] == [2]


async def test_replay_one_then_all(rails: Rails) -> None:
    settings = await dead_letters_written(rails)
    entries = json.loads((await cli(rails, "dlq", "list", "orders", "--json")).output)["entries"]
    seqs = {entry["originalMsgId"]: entry["seq"] for entry in entries}

    # One entry, kept: the stream still lists it.
    kept = await cli(rails, "dlq", "replay", "orders", str(seqs["email-1"]), "--keep")
    assert kept.exit_code == 0, kept.output
    assert "stored as stream shop_orders seq" in kept.output
    assert f"msg id email-1-replay-{seqs['email-1']}" in kept.output
    assert "kept in the dead-letter stream" in kept.output
    assert await rails.stream_messages("shop_orders_dlq") == 3

    # The same entry again within the duplicate window: JetStream says duplicate, and it is removed.
    again = await cli(rails, "dlq", "replay", "orders", str(seqs["email-1"]), "--json")
    [report] = json.loads(again.output)
    assert (report["duplicate"], report["removed"]) == (True, True)
    assert await rails.stream_messages("shop_orders_dlq") == 2
    assert await rails.stream_messages("shop_orders") == 1

    replayed = await rails.js.get_last_msg("shop_orders", "eventrails.shop.orders.send-email")
    headers = replayed.headers or {}
    assert headers["Nats-Msg-Id"] == f"email-1-replay-{seqs['email-1']}"
    assert headers["Eventrails-Original-Msg-Id"] == "email-1"
    assert headers["Eventrails-Replayed-From"] == f"shop_orders_dlq:{seqs['email-1']}"
    assert not [key for key in headers if key.startswith("Eventrails-Dlq-")]
    assert json.loads(replayed.data or b"") == email(1)

    everything = await cli(rails, "dlq", "replay", "orders", "--all")
    assert everything.exit_code == 0, everything.output
    assert everything.output.count("removed from the dead-letter stream") == 2
    assert await rails.stream_messages("shop_orders_dlq") == 0
    assert await rails.stream_messages("shop_orders") == 3

    # A fixed handler now takes the replayed messages; the poison one dead-letters again.
    handled: list[tuple[int, str, str]] = []
    worker = Worker()

    @worker.task("send-email")
    async def deliver(payload: SendEmail, ctx: Context) -> None:
        handled.append((payload.emailId, ctx.msg_id, ctx.headers["Eventrails-Original-Msg-Id"]))

    async with running(worker, settings):
        outcomes = [(await rails.outcomes.next())["outcome"] for _ in range(3)]
    assert sorted(outcomes) == ["dead_letter", "done", "done"]
    assert sorted(handled) == [
        (1, f"email-1-replay-{seqs['email-1']}", "email-1"), (2, f"email-2-replay-{seqs['email-2']}", "email-2"),
    ]
    assert await rails.stream_messages("shop_orders_dlq") == 1


async def test_cli_errors(rails: Rails) -> None:
    await dead_letters_written(rails)

    missing = await cli(rails, "dlq", "show", "orders", "99")
    assert missing.exit_code == 1
    assert "dead-letter stream shop_orders_dlq has no message with seq 99" in missing.output

    unknown = await cli(rails, "dlq", "list", "invoices")
    assert unknown.exit_code == 1
    assert "topic 'invoices' has no dead-letter stream shop_invoices_dlq in namespace 'shop'" in unknown.output

    partly = await cli(rails, "dlq", "replay", "orders", "1", "99")
    assert partly.exit_code == 1
    assert "1: replayed to eventrails.shop.orders.send-email" in partly.output
    assert "99: not replayed, kept:" in partly.output

    neither = await cli(rails, "dlq", "replay", "orders")
    assert neither.exit_code == 2
    assert "--all" in neither.output
