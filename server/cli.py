"""`free-server`: the aggregator's command line."""

from __future__ import annotations

from typing import NoReturn

import typer

from free_common import __version__
from free_common.console import out_console, run_app

app = typer.Typer(
    name="free-server",
    help="FREE-Fed aggregator: receives signed ONNX models, meta-learns, publishes releases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keep the command group shape even while it has a single command."""


@app.command()
def version() -> None:
    """Print the installed FREE-Fed version."""
    out_console.print(f"free-server {__version__}")


def main() -> NoReturn:
    """Console-script entry point of `free-server`."""
    run_app(app)
