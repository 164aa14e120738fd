"""`free-server`: the aggregator's command line."""

from __future__ import annotations

from typing import NoReturn

import typer

from free_common import __version__
from free_common.console import out_console, run_app
from free_server.commands import audit, clients, submissions
from free_server.commands.console import app as console_app
from free_server.commands.init import init
from free_server.commands.run import run
from free_server.commands.start import start
from free_server.commands.status import status

app = typer.Typer(
    name="free-server",
    help="FREE-Fed aggregator: receives signed ONNX models, meta-learns, publishes releases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Group the subcommands (no options of its own yet)."""


@app.command()
def version() -> None:
    """Print the installed FREE-Fed version."""
    out_console.print(f"free-server {__version__}")


app.command("init")(init)
app.command("start")(start)
app.command("status")(status)
app.command("run")(run)
app.add_typer(clients.app, name="clients")
app.add_typer(audit.app, name="audit")
app.add_typer(submissions.app, name="submissions")
app.add_typer(console_app, name="console")


def main() -> NoReturn:
    """Console-script entry point of `free-server`."""
    run_app(app)
