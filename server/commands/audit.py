"""`free-server audit show|verify`: the store's append-only, signed audit log.

``show --json`` prints::

    {"entries": [{"seq", "at", "kind", "body", "prev", "hash", "signature"}],
     "head": "<hash of the last entry>", "count": n}

``verify`` checks every entry's hash, its link to the one before and its signature by
the server key (`server.pub` of the home); it exits 0 when all hold, else nonzero with
the first bad entry named. Both read the store directly, so they work while the server
runs.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from free_common.console import out_console
from free_common.errors import AuditLogBroken
from free_common.security.keys import load_public_key
from free_server.commands.options import HomeOption
from free_server.home import ServerHome

__all__ = ["app"]

app = typer.Typer(
    help="The append-only, signed audit log of the server (works while it runs).",
    no_args_is_help=True,
)


@app.command("show")
def show(
    home: HomeOption,
    since: Annotated[
        int, typer.Option("--since", help="Only entries after this sequence number.")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """Print the audit log's entries, oldest first."""
    with ServerHome.open(home).open_store() as store:
        log = store.audit_log(since)
    entries = log.entries
    if as_json:
        report: dict[str, object] = {"entries": [e.to_json() for e in entries]}
        report |= {"head": log.head, "count": len(entries)}
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    table = Table("seq", "at", "kind", "details", box=None, pad_edge=False)
    for entry in entries:
        details = ", ".join(f"{k}={v}" for k, v in sorted(entry.body.items()) if v is not None)
        table.add_row(str(entry.seq), entry.at[:19], entry.kind, details)
    out_console.print(table)


@app.command("verify")
def verify(home: HomeOption) -> None:
    """Check every entry's hash, chain and signature; exit nonzero at the first bad one."""
    server_home = ServerHome.open(home)
    public_key = load_public_key(server_home.signing_pub)
    with server_home.open_store() as store:
        check = store.verify_audit(public_key)
    if not check.ok:
        raise AuditLogBroken(
            f"audit log entry {check.bad_seq} fails: {check.reason}; the {check.entries - 1}"
            " entries before it hold. Restore the store from a backup, and find out who"
            " wrote to it"
        )
    out_console.print(
        f"audit log holds: {check.entries} entries, chained and signed by the server key;"
        f" head {check.head[:16]}...",
        highlight=False,
    )
