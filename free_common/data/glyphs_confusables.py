"""Unicode's confusables (``confusables.txt``), as shipped by a Debian package.

``python3-confusable-homoglyphs`` carries Unicode's confusable mappings as JSON
(``confusables.json``: each character with the characters confusable with it). Only
that data file is read, as data: nothing of the package's code runs. Characters
linked by the mappings, directly or through others, form one group (Latin K, Greek
Κ, Cyrillic К, Coptic Ⲕ, ...).

The glyph builder uses the groups across splits only: a meta-val or meta-test class
confusable with a class of another split goes, even when the fonts at hand draw the
two differently (Cyrillic К is narrower than Latin K in most of them). Within a
split only measured look-alikes are removed: ``O`` and ``0`` are confusable, yet a
learner can tell them apart at 32 px.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from free_common.data.debian_packages import CONFUSABLES_PACKAGE
from free_common.data.glyphs_lookalike import SPLIT_PRIORITY, Lookalike
from free_common.errors import DataError

__all__ = [
    "CONFUSABLES_FILE",
    "CONFUSABLES_PACKAGE",
    "confusable_groups",
    "cross_split_confusables",
]

CONFUSABLES_FILE = Path("/usr/lib/python3/dist-packages/confusable_homoglyphs/confusables.json")
_DIRECTION_MARKS = "\u200e\u200f"


def _single(text: str) -> int | None:
    stripped = text.strip(_DIRECTION_MARKS)
    return ord(stripped) if len(stripped) == 1 else None


def confusable_groups(path: Path = CONFUSABLES_FILE) -> dict[int, int]:
    """Map each confusable codepoint to its group's id (the group's lowest codepoint).

    Raises
    ------
    DataError
        When the file is missing or not the expected JSON.
    """
    hint = f"run: apt-get install --reinstall {CONFUSABLES_PACKAGE}"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read Unicode confusables {path} ({exc}); {hint}") from exc
    if not isinstance(document, dict):
        raise DataError(f"{path} is not a confusables mapping; {hint}")
    parent: dict[int, int] = {}

    def root(cp: int) -> int:
        parent.setdefault(cp, cp)
        while parent[cp] != cp:
            parent[cp] = parent[parent[cp]]
            cp = parent[cp]
        return cp

    for key, entries in document.items():
        source = _single(key)
        if source is None or not isinstance(entries, list):
            continue
        for entry in entries:
            target = _single(entry.get("c", "")) if isinstance(entry, dict) else None
            if target is not None:
                a, b = root(source), root(target)
                parent[max(a, b)] = min(a, b)
    return {cp: root(cp) for cp in parent}


def cross_split_confusables(
    codepoints: Sequence[int], split_of: Mapping[int, str], groups: Mapping[int, int]
) -> list[Lookalike]:
    """Return the confusable pairs among `codepoints` that lie in different splits.

    Each class is paired with the group member of the highest-priority split
    (`SPLIT_PRIORITY`), lowest codepoint first, so removal keeps that one.
    """
    rank = {split: i for i, split in enumerate(SPLIT_PRIORITY)}
    members: dict[int, list[int]] = {}
    for cp in sorted(codepoints):
        if cp in groups:
            members.setdefault(groups[cp], []).append(cp)
    pairs = []
    for group in members.values():
        keeper = min(group, key=lambda cp: (rank[split_of[cp]], cp))
        for cp in group:
            if split_of[cp] != split_of[keeper]:
                pairs.append(
                    Lookalike(min(cp, keeper), max(cp, keeper), float("nan"), 0, 0, confusable=True)
                )
    return sorted(pairs, key=lambda p: (p.first, p.second))
