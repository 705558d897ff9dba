"""``eventrails outbox``: create the outbox table, run the relay, inspect and un-park rows."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Optional

import pydantic
import typer

logger = logging.getLogger("eventrails.outbox")

outbox_app = typer.Typer(
    name="outbox",
    help="The transactional outbox: create its table, relay its rows to JetStream, inspect parked rows.",
    no_args_is_help=True,
)

DsnOption = Annotated[
    str,
    typer.Option(
        envvar="EVENTRAILS_OUTBOX_DSN",
        help="PostgreSQL URI (postgresql://user@host:5432/db) or sqlite:///path/to/file.db.",
        show_default=False,
    ),
]
TableOption = Annotated[
    str, typer.Option(envvar="EVENTRAILS_OUTBOX_TABLE", help="Outbox table, optionally 'schema.table'.")
]
LogLevelOption = Annotated[str, typer.Option(help="Log level: debug, info, warning or error.")]


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _settings_problems(error: pydantic.ValidationError, prefix: str) -> str:
    return "; ".join(
        f"{prefix}{'_'.join(str(part) for part in item['loc']).upper()}: {item['msg']} (got {item.get('input')!r})"
        for item in error.errors()
    )


@outbox_app.command()
def migrate(
    dsn: DsnOption = "",
    table: TableOption = "eventrails_outbox",
    log_level: LogLevelOption = "info",
) -> None:
    """Create the outbox table, its indexes and (on PostgreSQL) its notify trigger; safe to run again."""
    _configure_logging(log_level)
    from eventrails._errors import EventrailsError
    from eventrails._outbox._dberrors import describe
    from eventrails._outbox._dsn import parse_dsn
    from eventrails._outbox._schema import migrate_outbox

    try:
        target = parse_dsn(dsn)
        migrate_outbox(dsn, table)
    except EventrailsError as error:
        raise _fail(str(error)) from None
    except Exception as error:  # noqa: BLE001 - database errors are reported, not dumped
        raise _fail(f"could not create the outbox table {table!r}: {describe(error)}", 1) from None
    typer.echo(f"outbox table {table} is ready in {target.display}")


@outbox_app.command()
def relay(
    dsn: DsnOption = "",
    table: Annotated[Optional[str], typer.Option(help="Outbox table; default EVENTRAILS_OUTBOX_TABLE or eventrails_outbox.")] = None,
    migrate: Annotated[bool, typer.Option("--migrate", help="Create the outbox table first if it is missing.")] = False,
    health_port: Annotated[Optional[int], typer.Option(help="Port of /healthz, /readyz and /metrics (default 8080).")] = None,
    log_level: LogLevelOption = "info",
) -> None:
    """Publish committed outbox rows to JetStream until SIGTERM; NATS settings come from EVENTRAILS_* variables."""
    _configure_logging(log_level)
    from eventrails._outbox._main import EXIT_CONFIGURATION, run_relay
    from eventrails._outbox._relay import OutboxRelaySettings
    from eventrails._settings import NatsSettings

    overrides: dict[str, Any] = {"dsn": dsn}
    if table is not None:
        overrides["table"] = table
    if health_port is not None:
        overrides["health_port"] = health_port
    try:
        nats_settings = NatsSettings()
        settings = OutboxRelaySettings(**overrides)
    except pydantic.ValidationError as error:
        logger.error("invalid outbox relay settings: %s", _settings_problems(error, "EVENTRAILS_OUTBOX_"))
        raise typer.Exit(EXIT_CONFIGURATION) from None
    raise typer.Exit(run_relay(nats_settings, settings, migrate=migrate))


@outbox_app.command()
def status(
    dsn: DsnOption = "",
    table: TableOption = "eventrails_outbox",
    limit: Annotated[int, typer.Option(help="Parked rows to list at most.")] = 20,
) -> None:
    """Show pending and parked rows, and the oldest pending row's age."""
    from eventrails._outbox._dsn import parse_dsn
    from eventrails._outbox._store import open_store

    async def show() -> None:
        store = open_store(parse_dsn(dsn), table)
        try:
            stats = await store.stats()
            parked = await store.parked_rows(limit)
        finally:
            await store.close()
        typer.echo(f"pending {stats.pending}, oldest pending {stats.oldest_pending_age:.1f}s, parked {stats.parked}")
        for row in parked:
            key = f" aggregate={row.aggregate_key}" if row.aggregate_key else ""
            typer.echo(f"parked {row.id} {row.topic}/{row.name}{key} attempts={row.attempts} "
                       f"at {row.parked_at.isoformat()}: {row.last_error}")

    _run_command(show)


@outbox_app.command()
def unpark(
    dsn: DsnOption = "",
    table: TableOption = "eventrails_outbox",
    row_id: Annotated[Optional[list[str]], typer.Option("--id", help="Row id (the message id) to retry; repeatable.")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Retry every parked row.")] = False,
) -> None:
    """Make parked rows pending again, with their attempt count reset, once the cause is fixed."""
    import uuid

    from eventrails._outbox._dsn import parse_dsn
    from eventrails._outbox._store import open_store

    if bool(row_id) == all_rows:
        raise _fail("pass one or more --id ROW_ID, or --all")
    for value in row_id or []:
        try:
            uuid.UUID(value)
        except ValueError:
            raise _fail(f"--id {value!r} is not a row id: outbox row ids are UUIDs") from None

    async def retry() -> None:
        store = open_store(parse_dsn(dsn), table)
        try:
            count = await store.unpark(None if all_rows else row_id)
        finally:
            await store.close()
        typer.echo(f"{count} parked row(s) are pending again")

    _run_command(retry)


def _run_command(command: Any) -> None:
    from eventrails._errors import EventrailsError
    from eventrails._outbox._dberrors import describe

    try:
        asyncio.run(command())
    except EventrailsError as error:
        raise _fail(str(error)) from None
    except Exception as error:  # noqa: BLE001 - database errors are reported, not dumped
        raise _fail(describe(error), 1) from None
