"""What each console page shows, read from the store the way `free-server status` reads it.

Every figure comes from `Store.summary` (one snapshot, the same rows `status --json`
prints, through `summary_to_json`), from a round's journal (`free_server.round_journal`)
and, for the recovered images, from the engine's checkpoint. Nothing here writes.
"""

from __future__ import annotations

import itertools
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from free_common.errors import RecordNotFound
from free_common.security.canonical import record_from_canonical, release_document
from free_common.types import ReleaseManifest, Signed
from free_server.commands.status import summary_to_json
from free_server.home import ServerHome
from free_server.round_journal import JOURNAL_NAME, RoundProgress, read_journal, round_dir
from free_server.store import Store

if TYPE_CHECKING:
    from free_server.fleet_front import NodesSeen

__all__ = [
    "ALL",
    "ConsoleData",
    "duration_s",
    "release_deltas",
    "store_bytes",
]

ALL = sys.maxsize
"""`Store.summary`'s `recent` for "every row"."""


def duration_s(start: str | None, end: str | None) -> float | None:
    """Seconds between two ISO times of the status JSON; None when one is missing."""
    if start is None or end is None:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def store_bytes(root: Path) -> int:
    """Bytes the store folder takes on disk: database, its WAL and every blob."""
    total = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            continue  # a temp file renamed or removed while walking
    return total


def release_deltas(releases: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per release version, each numeric metric minus the previous release's."""
    out: dict[int, dict[str, float]] = {}
    previous: dict[str, Any] = {}
    for release in releases:
        metrics = release.get("metrics", {})
        out[release["version"]] = {
            key: float(value) - float(previous[key])
            for key, value in metrics.items()
            if _number(value) and _number(previous.get(key))
        }
        previous = metrics
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ConsoleData:
    """The console's read-only view of one server home.

    Parameters
    ----------
    home
        The server home.
    store
        Its store, opened read-only.
    nodes
        The SuperNodes the Flower front forwarded calls of lately, when it runs.
    """

    home: ServerHome
    store: Store
    nodes: NodesSeen | None = None
    """The Flower front's SuperNodes (None: the server runs without Flower)."""
    _journals: dict[Path, tuple[tuple[int, int], RoundProgress | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def report(self, recent: int = ALL) -> dict[str, Any]:
        """Return the ``status --json`` document, with the newest `recent` rows of each list."""
        return summary_to_json(self.store.summary(recent=recent))

    def progress(self, round_id: int) -> RoundProgress | None:
        """Return what round `round_id`'s journal says (None when it wrote none).

        A journal is read again only when its size or time changed: a finished
        round's never does, so a page of fifty rounds reads only the running one.
        """
        path = round_dir(self.home.root, round_id) / JOURNAL_NAME
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        key = (info.st_mtime_ns, info.st_size)
        cached = self._journals.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        progress = read_journal(path)
        self._journals[path] = (key, progress)
        return progress

    def overview(self) -> dict[str, Any]:
        """Return counts of owners, submissions, rounds and releases, and the server's health."""
        report = self.report(recent=10)
        usage = shutil.disk_usage(self.home.store_dir)
        running = [r for r in report["rounds"] if r["state"] == "running"]
        return {
            "report": report,
            "owners": Counter(c["state"] for c in report["clients"]),
            "rounds": Counter(row.state for row in self.store.rounds()),
            "releases": self.store.next_release_version() - 1,
            "running": [(r, self.progress(r["id"])) for r in running],
            "store_bytes": store_bytes(self.home.store_dir),
            "disk_free": usage.free,
            "schema_version": report["schema_version"],
        }

    def owners(self) -> list[dict[str, Any]]:
        """One entry per owner name: its keys and its submissions by state."""
        report = self.report()
        by_key = {c["key_id"]: c["name"] for c in report["clients"]}
        counts: dict[str, Counter[str]] = {}
        for sub in report["submissions"]["recent"]:
            name = by_key.get(sub["client_key_id"], "?")
            counts.setdefault(name, Counter())[
                "withdrawn" if sub["withdrawn_at"] else sub["state"]
            ] += 1
        owners: dict[str, dict[str, Any]] = {}
        for client in report["clients"]:
            entry = owners.setdefault(client["name"], {"name": client["name"], "keys": []})
            entry["keys"].append(client)
            entry["state"] = client["state"]  # the newest key's state is the owner's
            entry["submissions"] = counts.get(client["name"], Counter())
        return list(owners.values())

    def rounds(self) -> list[dict[str, Any]]:
        """Return every round, newest first, with its journal and the release it published."""
        report = self.report()
        releases = {r["round_id"]: r for r in report["releases"]}
        return [self._round_entry(row, releases) for row in reversed(report["rounds"])]

    def _round_entry(
        self, row: dict[str, Any], releases: dict[int | None, dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            **row,
            "seconds": duration_s(row["started_at"], row["finished_at"]),
            "progress": self.progress(row["id"]),
            "release": releases.get(row["id"]),
        }

    def round(self, round_id: int) -> dict[str, Any]:
        """Return one round in full: its rounds-page entry, the models it used, the owners' replies.

        Raises
        ------
        RecordNotFound
            No round has that id.
        """
        report = self.report()
        found = [r for r in report["rounds"] if r["id"] == round_id]
        if not found:
            raise RecordNotFound(f"no round with id {round_id}")
        entry = self._round_entry(found[0], {r["round_id"]: r for r in report["releases"]})
        release = entry["release"]
        models = []
        if release is not None:
            names = {c["key_id"]: c["name"] for c in report["clients"]}
            subs = {str(s["id"]): s for s in report["submissions"]["recent"]}
            for sub_id in release.get("source_submission_ids", []):
                sub = subs.get(sub_id)
                owner = names.get(sub["client_key_id"], "?") if sub else "?"
                models.append({"id": sub_id, "owner": owner, "submission": sub})
        return {
            **entry,
            "models": models,
            "evaluations": [e for e in report["evaluations"] if e["round_id"] == round_id],
            "holds_bank": self.bank_round() == round_id,
        }

    def bank_round(self) -> int | None:
        """Return the round whose recovered images the engine folder holds, if any.

        The engine keeps one memory bank, carried from round to round, in its newest
        checkpoint: it is the latest round whose journal records a checkpoint.
        """
        for row in reversed(self.store.rounds()):
            if row.started_at is None:
                continue
            progress = self.progress(row.id)
            if progress is not None and progress.checkpoint_step is not None:
                return row.id
        return None

    def releases(self) -> list[dict[str, Any]]:
        """Every release, newest first, with its metrics' change from the one before."""
        releases = self.report()["releases"]
        deltas = release_deltas(releases)
        previous = {r["version"]: p["version"] for p, r in itertools.pairwise(releases)}
        return [
            {**r, "delta": deltas[r["version"]], "previous": previous.get(r["version"])}
            for r in reversed(releases)
        ]

    def manifest_document(self, version: int) -> bytes:
        """Release `version`'s signed manifest, as ``manifest.json`` on an owner's disk.

        Raises
        ------
        RecordNotFound
            No release has that version.
        CanonicalFormError
            The stored manifest is damaged.
        """
        row = self.store.release(version)
        record = record_from_canonical(row.manifest, ReleaseManifest)
        return release_document(Signed(record, row.signature))
