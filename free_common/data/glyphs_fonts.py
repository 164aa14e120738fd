"""Font discovery for the glyph benchmark: package files, ``fc-scan`` coverage, filters.

Each Debian package's files come from ``dpkg -L``; TrueType/OpenType files
(``.ttf .otf .ttc .otc``) are scanned with ``fc-scan``, which gives one line per
face with its family, style and character coverage. Web copies (``.woff``), Type 1
and bitmap files are skipped: the same designs come as TrueType/OpenType, and
bitmaps do not scale.

A face is kept when it is scalable and outline-based, is the default instance of its
file (named instances of variable fonts are not rendered), and its family, style
and file name contain none of the words that mark symbol, pixel or decorative fonts
(`EXCLUDED_NAME_WORDS`, matched as whole words). Byte-identical files shipped twice count once.

Unreadable files (``fc-scan`` reports no face) are skipped and returned as
`SkippedFont` records; the builder records them in the manifest and warns.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from free_common.errors import DataError

__all__ = [
    "EXCLUDED_NAME_WORDS",
    "FONT_SUFFIXES",
    "FontFace",
    "FontSource",
    "ScanResult",
    "SkippedFont",
    "package_font_files",
    "scan_fonts",
]

FONT_SUFFIXES = frozenset({".ttf", ".otf", ".ttc", ".otc"})

# Lower-case words in a family, style or file name that mark fonts whose "letters" are
# not letters (symbols, icons, barcodes, math alphabets, keycaps), pixel art that scaling turns
# into blocks (the PC BIOS "Px" fonts, Unifont, Misaki), or segment displays (DSEG).
EXCLUDED_NAME_WORDS = (
    "awesome",
    "barcode",
    "bitmap",
    "blank",
    "braille",
    "dingbat",
    "dseg",
    "emoji",
    "glyphicon",
    "icon",
    "keyboard",
    "lastresort",
    "math",
    "misaki",
    "music",
    "ornament",
    "pictograph",
    "pixel",
    "powerline",
    "px",
    "symbol",
    "unifont",
    "wingding",
)

_FC_FORMAT = (
    "%{file}\\t%{index}\\t%{family[0]}\\t%{style[0]}\\t%{outline}\\t%{scalable}\\t%{charset}\\n"
)
_EXCLUDED = frozenset(EXCLUDED_NAME_WORDS)
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
_SCAN_BATCH = 200
_LAST_CODEPOINT = 0x10FFFF
_NAMED_INSTANCE_SHIFT = 16


@dataclass(frozen=True)
class FontSource:
    """Font files from one origin: a Debian package, or a folder given by the user."""

    name: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class FontFace:
    """One face of a font file, with the codepoints its character map covers."""

    source: str
    path: str
    index: int
    family: str
    style: str
    coverage: tuple[tuple[int, int], ...]
    """Inclusive codepoint ranges, sorted."""

    def codepoints(self) -> npt.NDArray[np.int64]:
        """Return every covered codepoint, ascending."""
        if not self.coverage:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(lo, hi + 1, dtype=np.int64) for lo, hi in self.coverage])

    def covers(self, codepoint: int) -> bool:
        """Tell whether the character map has `codepoint`."""
        return any(lo <= codepoint <= hi for lo, hi in self.coverage)

    @property
    def label(self) -> str:
        """A short human name: family and style."""
        return f"{self.family} {self.style}".strip()


@dataclass(frozen=True)
class SkippedFont:
    """A font file or face left out, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ScanResult:
    """Faces kept (sorted by source, path, index) and what was skipped."""

    faces: tuple[FontFace, ...]
    unreadable: tuple[SkippedFont, ...]
    excluded: tuple[SkippedFont, ...]


def package_font_files(package: str) -> FontSource:
    """List the TrueType/OpenType files an installed Debian package ships.

    Raises
    ------
    DataError
        When ``dpkg`` is not available.
    """
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        raise DataError("dpkg not found: the glyph benchmark is built from Debian font packages")
    listed = subprocess.run(
        [dpkg, "-L", package], capture_output=True, text=True, check=False
    ).stdout
    files = sorted(
        {
            os.path.realpath(line)
            for line in listed.splitlines()
            if Path(line).suffix.lower() in FONT_SUFFIXES and os.path.isfile(line)
        }
    )
    return FontSource(name=package, files=tuple(files))


def _parse_charset(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for token in text.split():
        lo, _, hi = token.partition("-")
        start, stop = int(lo, 16), min(int(hi or lo, 16), _LAST_CODEPOINT)
        if start <= stop:  # some fonts map codes beyond Unicode
            ranges.append((start, stop))
    return tuple(sorted(ranges))


def _fc_scan(files: Sequence[str]) -> list[list[str]]:
    fc_scan = shutil.which("fc-scan")
    if fc_scan is None:
        raise DataError("fc-scan not found: run `apt-get install -y fontconfig`")
    rows: list[list[str]] = []
    for start in range(0, len(files), _SCAN_BATCH):
        batch = list(files[start : start + _SCAN_BATCH])
        # A file fc-scan cannot read yields no line (and a non-zero exit): it is
        # reported as unreadable by the caller, so the exit code is not checked.
        out = subprocess.run(
            [fc_scan, "--format", _FC_FORMAT, *batch],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        rows.extend(line.split("\t") for line in out.splitlines() if line.count("\t") == 6)
    return rows


def _excluded_word(*names: str) -> str | None:
    # Whole words (camel case split too), so "SemiCondensed" is not an "icon" font and
    # "Blankenburg" is not "Adobe Blank"; a plural "s" still matches ("MaterialIcons").
    for name in names:
        for token in _WORD.findall(name):
            word = str(token).lower()
            if word in _EXCLUDED or word.removesuffix("s") in _EXCLUDED:
                return word
    return None


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_fonts(sources: Iterable[FontSource]) -> ScanResult:
    """Scan every file of `sources` with fc-scan and keep the usable faces.

    Sources are visited in name order, files in path order, so the same fonts always
    give the same faces in the same order.
    """
    ordered = sorted(sources, key=lambda s: s.name)
    owner: dict[str, str] = {}
    seen_digests: dict[str, str] = {}
    excluded: list[SkippedFont] = []
    for source in ordered:
        for path in source.files:
            if path in owner:
                continue
            digest = _file_digest(path)
            if digest in seen_digests:
                excluded.append(SkippedFont(path, f"same bytes as {seen_digests[digest]}"))
                continue
            seen_digests[digest] = path
            owner[path] = source.name
    rows = _fc_scan(list(owner))
    scanned = {row[0] for row in rows}
    unreadable = [
        SkippedFont(path, "fc-scan found no font in it") for path in owner if path not in scanned
    ]
    faces: list[FontFace] = []
    for path, index_text, family, style, outline, scalable, charset in rows:
        if path not in owner:
            continue
        index = int(index_text)
        reason = None
        if index >> _NAMED_INSTANCE_SHIFT:
            continue  # named instance of a variable font: only the default is rendered
        if outline != "True" or scalable != "True":
            reason = "bitmap font"
        elif (word := _excluded_word(family, style, Path(path).name)) is not None:
            reason = f"name contains {word!r}"
        if reason is not None:
            excluded.append(SkippedFont(f"{path}#{index}", reason))
            continue
        faces.append(
            FontFace(
                source=owner[path],
                path=path,
                index=index,
                family=family,
                style=style,
                coverage=_parse_charset(charset),
            )
        )
    faces.sort(key=lambda f: (f.source, f.path, f.index))
    excluded.sort(key=lambda s: s.path)
    unreadable.sort(key=lambda s: s.path)
    return ScanResult(tuple(faces), tuple(unreadable), tuple(excluded))
