"""``eventrails dlq``: list, show and replay the dead letters of a topic.

Connection settings come from the same ``EVENTRAILS_*`` variables as every other process
(``EVENTRAILS_NATS_SERVERS``, credentials, ``EVENTRAILS_NAMESPACE``, ...); ``--servers``
and ``--namespace`` override them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Optional, TypeVar

import pydantic
import typer

from eventrails._connect import connect
from eventrails._dlq import DeadLetter, DeadLetters, Replay
from eventrails._errors import EventrailsError
from eventrails._settings import NatsSettings

app = typer.Typer(name="dlq", help="List, show and replay the dead letters of a topic.", no_args_is_help=True)

T = TypeVar("T")

Topic = Annotated[str, typer.Argument(help="Topic resource name (metadata.name).")]
Servers = Annotated[
    Optional[str], typer.Option(help="Comma-separated NATS URLs; defaults to EVENTRAILS_NATS_SERVERS.")
]
Namespace = Annotated[
    Optional[str], typer.Option("--namespace", "-n", help="Namespace of the topic; defaults to EVENTRAILS_NAMESPACE.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _settings(servers: str | None, namespace: str | None) -> NatsSettings:
    overrides: dict[str, Any] = {}
    if servers:
        overrides["nats_servers"] = servers
    if namespace:
        overrides["namespace"] = namespace
    try:
        return NatsSettings(**overrides)
    except pydantic.ValidationError as error:
        raise typer.BadParameter(str(error)) from error


def _run(settings: NatsSettings, topic: str, action: Callable[[DeadLetters], Awaitable[T]]) -> T:
    """Connect, run ``action`` on the topic's dead letters, close; exit 1 with the message on failure."""

    async def main() -> T:
        nc = await connect(settings, name="eventrails-dlq", deadline=10.0)
        try:
            return await action(DeadLetters(nc, settings, topic))
        finally:
            await nc.close()

    logging.getLogger("eventrails.connect").setLevel(logging.WARNING)
    try:
        return asyncio.run(main())
    except EventrailsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _payload(entry: DeadLetter) -> Any:
    try:
        return json.loads(entry.data)
    except ValueError:
        try:
            return entry.data.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(entry.data).decode()}


@app.command("list")
def list_(
    topic: Topic, servers: Servers = None, namespace: Namespace = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many entries.")] = 100,
    start: Annotated[int, typer.Option(min=1, help="First dead-letter sequence to show.")] = 1,
    as_json: AsJson = False,
) -> None:
    """List dead letters, oldest first: seq, time, name, deliveries, error type, reason and original subject."""
    settings = _settings(servers, namespace)

    async def action(dead: DeadLetters) -> tuple[int, list[DeadLetter]]:
        return await dead.count(), await dead.list(limit=limit, start=start)

    total, entries = _run(settings, topic, action)
    if as_json:
        typer.echo(json.dumps({"total": total, "entries": [entry.summary() for entry in entries]}, indent=2))
        return
    if not entries:
        typer.echo(f"no dead letters for topic {topic} in namespace {settings.namespace} (from seq {start})")
        return
    rows = [("SEQ", "TIME", "NAME", "DELIVERY", "ERROR TYPE", "REASON", "ORIGINAL SUBJECT")]
    for entry in entries:
        rows.append((
            str(entry.seq), entry.time.strftime("%Y-%m-%d %H:%M:%S") if entry.time else "-", entry.name,
            str(entry.delivery) if entry.delivery is not None else "-", entry.error_type or "-",
            _short(entry.reason or "-", 60), entry.original_subject or "-",
        ))
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    shown = f"{len(entries)} of {total}" if total > len(entries) else str(len(entries))
    typer.echo(f"{shown} dead letter(s) in stream {settings.namespace}_{topic}_dlq")


@app.command()
def show(
    topic: Topic, seq: Annotated[int, typer.Argument(min=1, help="Dead-letter sequence, as `dlq list` shows.")],
    servers: Servers = None, namespace: Namespace = None, as_json: AsJson = False,
) -> None:
    """Show one dead letter with its payload and headers."""
    settings = _settings(servers, namespace)

    async def action(dead: DeadLetters) -> DeadLetter:
        return await dead.get(seq)

    entry = _run(settings, topic, action)
    document = {**entry.summary(), "error": entry.error, "originalSeq": entry.original_seq,
                "headers": entry.headers, "payload": _payload(entry)}
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    for key in ("seq", "time", "name", "originalSubject", "originalMsgId", "originalSeq", "delivery", "errorType",
                "reason", "error"):
        typer.echo(f"{key + ':':<17}{document[key] if document[key] is not None else '-'}")
    typer.echo("headers:")
    for key, value in sorted(entry.headers.items()):
        typer.echo(f"  {key}: {value}")
    typer.echo("payload:")
    typer.echo(json.dumps(document["payload"], indent=2))


@app.command()
def replay(
    topic: Topic,
    seqs: Annotated[Optional[list[int]], typer.Argument(help="Dead-letter sequences to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter of the topic.")] = False,
    keep: Annotated[bool, typer.Option(help="Keep replayed entries in the dead-letter stream.")] = False,
    servers: Servers = None, namespace: Namespace = None, as_json: AsJson = False,
) -> None:
    """Publish dead letters to their original subjects again, under new message ids.

    Each entry is deleted from the dead-letter stream only after JetStream acknowledged
    its replay (kept with --keep). Exits 1 if any replay failed; those entries stay.
    """
    if bool(seqs) == replay_all:
        raise typer.BadParameter("name the sequences to replay, or pass --all (not both)")
    settings = _settings(servers, namespace)

    async def action(dead: DeadLetters) -> list[tuple[int, Replay | Exception]]:
        targets = list(seqs or [])
        if replay_all:
            # Snapshot the current entries, so entries written while replaying wait for the next run.
            targets = [entry.seq for entry in await dead.list(limit=10**9)]
        results: list[tuple[int, Replay | Exception]] = []
        for seq in targets:
            try:
                results.append((seq, await dead.replay(seq, keep=keep)))
            except EventrailsError as error:
                results.append((seq, error))
        return results

    results = _run(settings, topic, action)
    failed = [seq for seq, result in results if isinstance(result, Exception)]
    if as_json:
        typer.echo(json.dumps([
            {"seq": seq, "error": str(result)} if isinstance(result, Exception)
            else {"seq": seq, **result.model_dump(mode="json")}
            for seq, result in results
        ], indent=2))
    else:
        for seq, result in results:
            if isinstance(result, Exception):
                typer.echo(f"{seq}: not replayed, kept: {result}")
                continue
            stored = (
                f"duplicate: JetStream already had msg id {result.msg_id} (stream {result.stream} seq {result.seq}); "
                "nothing new stored"
                if result.duplicate else f"stored as stream {result.stream} seq {result.seq}, msg id {result.msg_id}"
            )
            kept = "removed from the dead-letter stream" if result.removed else "kept in the dead-letter stream"
            typer.echo(f"{seq}: replayed to {result.subject}; {stored}; {kept}")
        if not results:
            typer.echo(f"no dead letters to replay for topic {topic} in namespace {settings.namespace}")
    if failed:
        raise typer.Exit(1)
