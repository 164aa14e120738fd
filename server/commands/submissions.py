"""`free-server submissions hold|release|refuse ID`: the operator's decisions on a model.

Screening holds a model it cannot clear (`free_common.screening`); the operator then
releases it into the pool or refuses it with a reason its owner will read. The
operator may also hold an accepted model, which takes it out of every later round until
released. Each decision is written to the store (and its audit log) at once, so these
work while the server runs; a held model's screening figures are in ``status --json``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from free_common.console import out_console
from free_server.commands.options import HomeOption
from free_server.home import ServerHome
from free_server.records import SubmissionRow

__all__ = ["app"]

app = typer.Typer(
    help="Hold, release or refuse a submitted model (works while the server runs).",
    no_args_is_help=True,
)

IdArgument = Annotated[int, typer.Argument(help="Submission id (see free-server status).")]


def _done(row: SubmissionRow, what: str) -> None:
    out_console.print(f"submission {row.id} {what}; it is now {row.status}", highlight=False)


@app.command("hold")
def hold(
    home: HomeOption,
    submission_id: IdArgument,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (kept in the audit log).")
    ] = "held by the operator",
) -> None:
    """Take a received or accepted model out of intake and of every later round."""
    with ServerHome.open(home).open_store() as store:
        _done(store.hold(submission_id, reason), "held")


@app.command("release")
def release(home: HomeOption, submission_id: IdArgument) -> None:
    """Release a held model into the pool (accepted; the next round counts it)."""
    with ServerHome.open(home).open_store() as store:
        _done(store.release_held(submission_id), "released")


@app.command("refuse")
def refuse(
    home: HomeOption,
    submission_id: IdArgument,
    reason: Annotated[str, typer.Option("--reason", help="What its owner reads.")],
) -> None:
    """Refuse a held model with a reason its owner reads in the verdict `submit` waits for."""
    with ServerHome.open(home).open_store() as store:
        _done(store.refuse_held(submission_id, reason), "refused")
