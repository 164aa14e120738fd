"""The demo's closing tables, drawn from its summary (`free_common.bench.demo`)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from free_common.console import out_console

__all__ = ["print_report"]

_LOG_WIDTH = 120


def _percent(score: dict[str, Any] | None) -> str:
    if not score or score.get("accuracy") is None:
        return "-"
    return f"{score['accuracy']:.1%} +- {score.get('ci95') or 0.0:.1%}"


def _federated(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each joined owner's reply to the round's push, by owner name."""
    round_id = summary["round"]["id"]
    return {
        e["node_id"]: e["metrics"]
        for e in summary["status"]["evaluations"]
        if e["round_id"] == round_id
    }


def _recovery_method(summary: dict[str, Any]) -> str:
    """``FIVE, 5 steps`` (or ``scratch, 200 steps``), as the release's config says."""
    try:
        engine = json.loads(summary["fetch"]["manifest"]["config_json"])["engine"]
        if engine["recovery"] == "scratch":
            return f"scratch inversion, {engine['scratch']['steps']} steps"
        return f"FIVE, {engine['five']['adapt_steps']} steps"
    except (KeyError, TypeError, ValueError):
        return "recovery"


def _owners_table(summary: dict[str, Any]) -> Table:
    federated = _federated(summary)
    stored = {j["name"]: j for j in summary["joined"]}
    fetcher = summary["fetch"]["owner"]
    table = Table(title="data owners")
    for column in ("owner", "model", "submission", "receipt", "verdict", "release", "accuracy"):
        table.add_column(column)
    for owner in summary["owners"]:
        name = owner["name"]
        if name in stored:
            entry = stored[name]
            ok = entry.get("stored") and entry.get("matches_fetch")
            release = "pushed, verified, stored" if ok else "not stored"
            accuracy = _percent(federated.get(name))
        elif name == fetcher:
            release = "fetched, verified"
            accuracy = _percent(summary["finetune"]["score"])
        else:
            release, accuracy = "-", "-"
        table.add_row(
            name,
            owner["model"],
            str(owner["submission_id"]),
            "verified" if owner["receipt_verified"] else "NOT verified",
            owner["verdict"] or "-",
            release,
            accuracy,
        )
    return table


def _results_table(summary: dict[str, Any]) -> Table:
    release = summary["release"]
    metrics = release.get("metrics") or {}
    accepted = sum(1 for o in summary["owners"] if o["verdict"] == "accepted")
    meta = summary["meta_test"]
    table = Table(title="FREE-Fed demo: one meta round on loopback")
    table.add_column("what")
    table.add_column("result")
    table.add_row("accepted models", f"{accepted} of {len(summary['owners'])}")
    seconds = metrics.get("recovery_seconds_per_teacher")
    recovery = (
        "-" if seconds is None else f"{seconds:.2f} s per teacher ({_recovery_method(summary)})"
    )
    if metrics.get("recoveries"):
        recovery += f", {metrics['recoveries']} recoveries"
    if metrics.get("teacher_accuracy") is not None:
        recovery += f"; teachers {metrics['teacher_accuracy']:.0%} right on recovered images"
    table.add_row("recovery time", recovery)
    round_seconds = metrics.get("round_seconds")
    table.add_row(
        "meta round",
        f"round {summary['round']['id']}, preset {summary['round']['preset']},"
        f" {summary['preset']['steps']} steps"
        + ("" if round_seconds is None else f", {round_seconds:.0f} s of engine time"),
    )
    table.add_row(
        "release",
        f"version {release['version']}, {release.get('architecture', '?')},"
        f" sha256 {release['sha256'][:16]}..., from {len(release.get('source_submission_ids', []))}"
        " models",
    )
    for task in meta["tasks"]:
        table.add_row(
            f"meta-test {task['ways']}-way {task['shots']}-shot ({task['episodes']} tasks,"
            " paper protocol)",
            f"release {_percent(task['release'])} vs random init {_percent(task['random_init'])}",
        )
    federated = _federated(summary)
    for name, metrics_ in sorted(federated.items()):
        table.add_row(f"federated accuracy, {name}", _percent(metrics_))
    inspect = summary["inspect"]
    table.add_row(
        "exported adapted model",
        f"{summary['fetch']['owner']}: free-client inspect says {inspect['verdict']}",
    )
    phases = summary["phases"]
    table.add_row(
        "runtime",
        f"{phases['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items() if k != "total")
        + ")",
    )
    return table


def print_report(summary: dict[str, Any]) -> None:
    """Print the owners' table and the results table of a finished demo."""
    # Piped or logged output gets 80 columns by default, too narrow for the tables.
    console = out_console if out_console.is_terminal else Console(width=_LOG_WIDTH)
    console.print(_owners_table(summary))
    console.print(_results_table(summary))
