"""`free-server init`: make a new server home."""

from __future__ import annotations

from typing import Annotated

import typer

from free_common.console import out_console
from free_common.security.keys import key_id, load_public_key
from free_server.commands.options import HomeOption
from free_server.home import create_home

__all__ = ["init"]


def init(
    home: HomeOption,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A name or address owners reach the server by (repeatable);"
            " localhost, 127.0.0.1 and ::1 are always included.",
        ),
    ] = None,
) -> None:
    """Make a server home: config, local CA, TLS certificate, signing key, store.

    Refuses to touch a folder that exists and is not empty.
    """
    made = create_home(home, host or ())
    server_key = key_id(load_public_key(made.signing_pub))
    out_console.print(f"server home created at {made.root}", highlight=False)
    out_console.print(
        f"give owners {made.ca_cert} (--ca) and {made.signing_pub} (--server-pub);"
        f" server key id {server_key}",
        highlight=False,
        soft_wrap=True,
    )
