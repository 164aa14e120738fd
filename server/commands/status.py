"""`free-server status`: what the store holds, read directly (works while the server runs).

``--json`` prints one object::

    {"schema_version": 4,
     "clients": [{"name", "key_id", "active", "state", "node_key", "added_at",
                  "revoked_at", "replaced_at"}],
     "submissions": {"received": n, "accepted": n, "refused": n, "held": n, "withdrawn": n,
                     "recent": [{"id", "client", "client_key_id", "sha256", "size",
                                 "state", "reason", "received_at", "verdict_at",
                                 "withdrawn_at", "held_at", "hold_reason", "screening",
                                 "dp"}]},
     "rounds": [{"id", "state", "preset", "requested_at", "started_at", "finished_at",
                 "error"}],
     "releases": [{"version", "round_id", "sha256", "size", "created_at",
                   "architecture", "source_submission_ids", "metrics"}],
     "evaluations": [{"round_id", "node_id", "metrics", "created_at"}]}

Times are ISO 8601 in UTC; lists hold the newest ``--recent`` entries, oldest first.
A client is one key of an owner: ``state`` is ``active``, ``revoked`` or ``replaced``
(by `clients rotate`). A withdrawn submission (its owner was revoked) is counted under
``withdrawn`` only, and keeps its verdict ``state`` in ``recent``; a held one (screening
or the operator holds it: `free-server submissions`) is counted under ``held``, keeps its
``state`` and has ``held_at`` and ``hold_reason`` set. ``screening`` is the screening
report (``figures``, ``verdict``, ``reason``, ``seconds``) or null. ``dp`` is the
``{"epsilon", "delta"}`` the model declares it was trained to with DP-SGD, or null; a
release's ``metrics.dp`` gives the smallest and largest epsilon among its teachers.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from free_common.console import out_console
from free_common.errors import CanonicalFormError
from free_common.security.canonical import record_from_canonical
from free_common.types import ReleaseManifest
from free_server.commands.options import HomeOption
from free_server.home import ServerHome
from free_server.records import ReleaseRow, StoreSummary

__all__ = ["status", "summary_to_json"]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _release_json(row: ReleaseRow) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": row.version,
        "round_id": row.round_id,
        "sha256": row.sha256,
        "size": row.size,
        "created_at": _iso(row.created_at),
    }
    try:
        manifest = record_from_canonical(row.manifest, ReleaseManifest)
    except CanonicalFormError:
        out["damaged"] = True
        return out
    out["architecture"] = manifest.architecture
    out["source_submission_ids"] = list(manifest.source_submission_ids)
    out["metrics"] = json.loads(manifest.metrics_json)
    return out


def summary_to_json(summary: StoreSummary) -> dict[str, Any]:
    """Return the ``--json`` form of a store summary (layout in the module docstring)."""
    names = {client.key_id: client.name for client in summary.clients}
    return {
        "schema_version": summary.schema_version,
        "clients": [
            {
                "name": c.name,
                "key_id": c.key_id,
                "active": c.active,
                "state": c.state,
                "node_key": c.node_public_key is not None,
                "added_at": _iso(c.added_at),
                "revoked_at": _iso(c.revoked_at),
                "replaced_at": _iso(c.replaced_at),
            }
            for c in summary.clients
        ],
        "submissions": {
            **summary.submission_counts,
            "recent": [
                {
                    "id": s.id,
                    "client": names.get(s.client_key_id),
                    "client_key_id": s.client_key_id,
                    "sha256": s.sha256,
                    "size": s.size,
                    "state": s.state,
                    "reason": s.reason,
                    "received_at": _iso(s.received_at),
                    "verdict_at": _iso(s.verdict_at),
                    "withdrawn_at": _iso(s.withdrawn_at),
                    "held_at": _iso(s.held_at),
                    "hold_reason": s.hold_reason,
                    "screening": s.screening,
                    "dp": None if s.dp is None else {"epsilon": s.dp.epsilon, "delta": s.dp.delta},
                }
                for s in summary.submissions
            ],
        },
        "rounds": [
            {
                "id": r.id,
                "state": r.state,
                "preset": r.preset,
                "requested_at": _iso(r.requested_at),
                "started_at": _iso(r.started_at),
                "finished_at": _iso(r.finished_at),
                "error": r.error,
            }
            for r in summary.rounds
        ],
        "releases": [_release_json(row) for row in summary.releases],
        "evaluations": [
            {
                "round_id": e.round_id,
                "node_id": e.node_id,
                "metrics": e.metrics,
                "created_at": _iso(e.created_at),
            }
            for e in summary.evaluations
        ],
    }


def _dp_range(dp: dict[str, Any] | None) -> str:
    """``1-8 (3/5)``: the epsilon range among a release's DP teachers, and how many are."""
    if not dp or not dp.get("teachers_with_dp"):
        return ""
    low, high = dp["epsilon_min"], dp["epsilon_max"]
    span = f"{low:g}" if low == high else f"{low:g}-{high:g}"
    return f"{span} ({dp['teachers_with_dp']}/{dp['teachers']})"


def _short(moment: str | None) -> str:
    return "" if moment is None else moment[:16].replace("T", " ")


def _print(report: dict[str, Any]) -> None:
    show = out_console.print
    states = [c["state"] for c in report["clients"]]
    show(
        f"[bold]clients[/] {states.count('active')} active, {states.count('revoked')} revoked,"
        f" {states.count('replaced')} replaced keys"
    )
    subs = report["submissions"]
    show(
        f"[bold]submissions[/] {subs['received']} waiting for intake, {subs['accepted']} accepted,"
        f" {subs['refused']} refused, {subs['held']} held, {subs['withdrawn']} withdrawn"
    )
    if subs["recent"]:
        table = Table("id", "client", "size", "received", "state", "DP epsilon")
        table.add_column("reason", overflow="fold")
        for s in subs["recent"]:
            table.add_row(
                str(s["id"]),
                s["client"] or s["client_key_id"][:12],
                f"{s['size']:,}",
                _short(s["received_at"]),
                s["state"]
                + (", withdrawn" if s["withdrawn_at"] else "")
                + (", held" if s["held_at"] else ""),
                "" if s["dp"] is None else f"{s['dp']['epsilon']:g}",
                s["reason"] or s["hold_reason"] or "",
            )
        show(table)
    show(f"[bold]rounds[/] {len(report['rounds'])}")
    if report["rounds"]:
        table = Table("id", "state", "preset", "requested", "finished")
        table.add_column("error", overflow="fold")
        for r in report["rounds"]:
            table.add_row(
                str(r["id"]),
                r["state"],
                r["preset"] or "",
                _short(r["requested_at"]),
                _short(r["finished_at"]),
                r["error"] or "",
            )
        show(table)
    show(f"[bold]releases[/] {len(report['releases'])}")
    if report["releases"]:
        table = Table(
            "version", "round", "architecture", "size", "created", "sources", "DP epsilon"
        )
        for rel in report["releases"]:
            table.add_row(
                str(rel["version"]),
                "" if rel["round_id"] is None else str(rel["round_id"]),
                rel.get("architecture", "DAMAGED"),
                f"{rel['size']:,}",
                _short(rel["created_at"]),
                str(len(rel.get("source_submission_ids", []))),
                _dp_range(rel.get("metrics", {}).get("dp")),
            )
        show(table)
    show(f"[bold]evaluations[/] {len(report['evaluations'])}")
    if report["evaluations"]:
        table = Table("round", "node", "created")
        table.add_column("metrics", overflow="fold")
        for e in report["evaluations"]:
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(e["metrics"].items()))
            table.add_row(str(e["round_id"]), e["node_id"], _short(e["created_at"]), metrics)
        show(table)


def status(
    home: HomeOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    recent: Annotated[
        int, typer.Option("--recent", min=1, help="How many of the newest entries to list.")
    ] = 50,
) -> None:
    """Show clients, submissions and their verdicts, rounds, releases and evaluations."""
    with ServerHome.open(home).open_store() as store:
        report = summary_to_json(store.summary(recent=recent))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)
