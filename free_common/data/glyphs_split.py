"""Which split each script (alphabet) goes to: a fixed table, as Omniglot splits by alphabet.

Scripts that share shapes with Latin are spread so that each split keeps a real
alphabet after look-alike removal: Latin stays in meta-train whole, Greek goes to
meta-val and Cyrillic to meta-test, losing their Latin look-alikes there. CJK and
the scripts of South and South-East Asia are spread over the three splits too.
A script missing from the table goes to meta-train.
"""

from __future__ import annotations

from collections.abc import Iterable

from free_common.data.imageset import SPLITS

__all__ = ["DEFAULT_SPLIT", "SCRIPT_SPLITS", "split_of_script", "split_table"]

DEFAULT_SPLIT = "meta-train"

SCRIPT_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "Latin", "Digits", "Han", "Arabic", "Bengali", "Canadian Syllabics", "Coptic",
            "Devanagari", "Ethiopic", "Gujarati", "Gurmukhi", "Myanmar", "Runic",
            "Sinhala", "Telugu", "Tibetan",
        ),
        "meta-train",
    ),
    **dict.fromkeys(
        ("Greek", "Armenian", "Hebrew", "Lao", "Tamil", "Malayalam", "Kannada", "Syriac"),
        "meta-val",
    ),
    **dict.fromkeys(
        (
            "Cyrillic", "Georgian", "Hiragana", "Katakana", "Cherokee", "Thai", "Khmer",
            "Hangul",
        ),
        "meta-test",
    ),
}  # fmt: skip


def split_of_script(script: str) -> str:
    """Return the split of a script (meta-train when the table does not name it)."""
    return SCRIPT_SPLITS.get(script, DEFAULT_SPLIT)


def split_table(scripts: Iterable[str]) -> dict[str, list[str]]:
    """Return, for each split, the sorted scripts among `scripts` assigned to it."""
    table: dict[str, list[str]] = {split: [] for split in SPLITS}
    for script in sorted(set(scripts)):
        table[split_of_script(script)].append(script)
    return table
