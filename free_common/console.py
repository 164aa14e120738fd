"""Terminal plumbing shared by the three CLIs: one-line errors and progress.

Every CLI entry point runs through `run_app`, so a `FreeError` anywhere ends in
one line on stderr and the exit code of its class, never a traceback.
`progress` draws a rich bar on a terminal and falls back to plain lines when
output is piped or logged.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from free_common.errors import FreeError

__all__ = ["Advance", "err_console", "fail", "out_console", "progress", "run_app"]

out_console = Console()
err_console = Console(stderr=True)

Advance = Callable[[int], None]
"""Call with the number of units just completed."""


def fail(message: str, exit_code: int = 1) -> NoReturn:
    """Print one error line to stderr and exit with `exit_code`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


def run_app(app: typer.Typer) -> NoReturn:
    """Run a Typer app, turning every user-caused error into one line and an exit code."""
    try:
        result = app(standalone_mode=False)
    except FreeError as exc:
        fail(exc.message, exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        fail("interrupted", 130)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}", 1)
    if result == 130:
        # Typer reports Ctrl-C as a return value when not in standalone mode.
        fail("interrupted", 130)
    sys.exit(result if isinstance(result, int) else 0)


@contextmanager
def progress(description: str, total: int, *, plain_every_s: float = 5.0) -> Iterator[Advance]:
    """Show progress of `total` units; yields a function to advance it.

    On a terminal this is a rich progress bar on stderr; otherwise one plain
    line at most every `plain_every_s` seconds and one at the end, so logs of
    long runs stay readable.
    """
    if err_console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err_console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = 0
    last = time.monotonic()

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= plain_every_s:
            last = now
            print(f"{description}: {done}/{total}", file=sys.stderr, flush=True)

    yield advance
    print(f"{description}: {done}/{total} done", file=sys.stderr, flush=True)
