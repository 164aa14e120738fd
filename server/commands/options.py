"""Options several `free-server` commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["HomeOption"]

HomeOption = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="FREE_SERVER_HOME",
        help="The server home folder (made by `free-server init`).",
        show_default=False,
    ),
]
