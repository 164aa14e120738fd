"""`free-client`: the data owner's command line."""

from __future__ import annotations

from typing import NoReturn

import typer

from free_client.audit import audit
from free_client.export import export
from free_client.fetch import fetch
from free_client.finetune import finetune
from free_client.inspect import inspect
from free_client.join import join
from free_client.keygen import keygen
from free_client.submit import submit
from free_common import __version__
from free_common.console import out_console, run_app

app = typer.Typer(
    name="free-client",
    help="FREE-Fed data owner: export, inspect and submit models; fetch and fine-tune releases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Root of the command group: every command is a subcommand."""


@app.command()
def version() -> None:
    """Print the installed FREE-Fed version."""
    out_console.print(f"free-client {__version__}")


app.command("keygen")(keygen)
app.command("export")(export)
app.command("inspect")(inspect)
app.command("submit")(submit)
app.command("fetch")(fetch)
app.command("join")(join)
app.command("finetune")(finetune)
app.command("audit")(audit)


def main() -> NoReturn:
    """Console-script entry point of `free-client`."""
    run_app(app)
