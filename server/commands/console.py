"""`free-server console`: tokens for the operator's web console (`free_server.console`).

``token`` makes a token, stores its hash in the home and prints the token once;
``withdraw`` removes every token. Both work while the server runs: the console reads
the token file on every request.
"""

from __future__ import annotations

from typing import Annotated

import typer

from free_common.console import out_console
from free_server.commands.options import HomeOption
from free_server.console.auth import add_token, withdraw_tokens
from free_server.home import ServerHome

__all__ = ["app"]

app = typer.Typer(
    help="Access to the read-only web console (free-server start --console-port).",
    no_args_is_help=True,
)


@app.command("token")
def token(
    home: HomeOption,
    replace: Annotated[
        bool, typer.Option("--replace", help="Withdraw every earlier token at the same time.")
    ] = False,
) -> None:
    """Make a console token and print it (only its hash is kept: store it now)."""
    opened = ServerHome.open(home)
    out_console.print(add_token(opened.root, replace=replace), highlight=False, soft_wrap=True)


@app.command("withdraw")
def withdraw(home: HomeOption) -> None:
    """Withdraw every console token; the console refuses them from the next request."""
    opened = ServerHome.open(home)
    count = withdraw_tokens(opened.root)
    out_console.print(f"withdrew {count} console tokens", highlight=False)
