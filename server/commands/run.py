"""`free-server run`: ask the running server for a meta round now.

The request is a row in the store (`Store.request_round`), so this works while
the server runs, from any shell on its host; the server's scheduler starts the
oldest request within a few seconds (`free_server.scheduler`). Without
``--preset`` the round uses the home's ``rounds.preset``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from free_common.console import out_console
from free_server.commands.options import HomeOption
from free_server.home import ServerHome

__all__ = ["run"]


def run(
    home: HomeOption,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Engine preset (smoke, cpu, paper, or HOME/presets/NAME.json);"
            " default rounds.preset of the home.",
        ),
    ] = None,
) -> None:
    """Request a meta round; the running server starts it. Prints the request id."""
    opened = ServerHome.open(home)
    name = preset or opened.config.rounds.preset
    # The engine (and torch) load only once the home is known to be there.
    from free_server.rounds import engine_config

    engine_config(name, opened)
    with opened.open_store() as store:
        row = store.request_round(name)
    out_console.print(
        f"round {row.id} requested (preset {name}); a running free-server starts it shortly",
        highlight=False,
        soft_wrap=True,
    )
