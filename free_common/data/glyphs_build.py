"""Build a glyph set end to end: fonts -> classes -> look-alikes -> splits -> files.

1. Font faces of the configured Debian packages (or of a folder): `glyphs_fonts`.
2. Candidate characters and their distinct instances, rendered in a process pool:
   `glyphs_select`, `glyphs_instances`, `glyphs_render`. Packages that draw other
   glyphs at a script's codepoints are then dropped for that script and the
   affected classes picked again (`glyphs_audit`).
3. Look-alike classes removed across and within splits (`glyphs_lookalike`), and
   Unicode confusables across splits (`glyphs_confusables`).
4. Classes assigned to splits by script (`glyphs_split`) and written with a
   manifest (`glyphs_store`, `glyphs_manifest`).

Unreadable font files are skipped, counted in the returned warnings and listed in the
manifest: one broken file in a Debian package should not stop a benchmark build.
When no usable face remains, the build stops with `FontUnreadable`.

A folder that already holds an up-to-date build (same fingerprint: configuration,
package versions, software versions) is reused unless ``force`` is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from free_common.data.debian_packages import (
    CONFUSABLES_PACKAGE,
    package_licence,
    package_versions,
    require_installed,
)
from free_common.data.glyphs_audit import WrongGlyphs, find_wrong_glyph_sources
from free_common.data.glyphs_chars import script_of
from free_common.data.glyphs_config import GlyphBuildConfig
from free_common.data.glyphs_confusables import confusable_groups, cross_split_confusables
from free_common.data.glyphs_fonts import (
    FONT_SUFFIXES,
    FontSource,
    ScanResult,
    SkippedFont,
    package_font_files,
    scan_fonts,
)
from free_common.data.glyphs_instances import ClassInstances, FaceRef, InstancePool, InstanceSpec
from free_common.data.glyphs_lookalike import (
    Lookalike,
    candidate_pairs,
    choose_removals,
    class_means,
    find_lookalikes,
    renders_needed,
)
from free_common.data.glyphs_manifest import build_fingerprint, manifest_document
from free_common.data.glyphs_render import binarise, notdef_probe
from free_common.data.glyphs_select import (
    Advance,
    ProgressFactory,
    Selection,
    class_listing,
    select_classes,
    visit_orders,
)
from free_common.data.glyphs_split import split_of_script
from free_common.data.glyphs_store import (
    MANIFEST,
    file_sha256,
    read_manifest,
    split_file,
    write_json,
    write_split_arrays,
)
from free_common.data.imageset import SPLITS
from free_common.errors import ConfigError, DataError, DatasetLayoutError, FontUnreadable

__all__ = ["GlyphBuild", "build_glyph_set", "default_workers"]

_MAX_WORKERS = 8


@dataclass(frozen=True)
class GlyphBuild:
    """The outcome of `build_glyph_set`."""

    directory: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float
    warnings: tuple[str, ...]


def default_workers() -> int:
    """Return the number of worker processes to render with: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_WORKERS))


@contextmanager
def _quiet(description: str, total: int) -> Iterator[Advance]:
    del description, total
    yield lambda n: None


def _folder_sources(
    font_dir: Path,
) -> tuple[list[FontSource], dict[str, dict[str, str]], dict[str, str]]:
    if not font_dir.is_dir():
        raise ConfigError(f"font folder {font_dir} does not exist")
    files = tuple(
        sorted(str(p.resolve()) for p in font_dir.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
    )
    if not files:
        raise DataError(f"no font files ({' '.join(sorted(FONT_SUFFIXES))}) in {font_dir}")
    require_installed((CONFUSABLES_PACKAGE,))
    name = f"folder:{font_dir.resolve()}"
    origin = {path: file_sha256(Path(path)) for path in files}
    origin.update(package_versions((CONFUSABLES_PACKAGE,)))
    info = {name: {"version": "", "licence": "unknown (fonts from a folder)"}}
    return [FontSource(name, files)], info, origin


def _package_sources(
    config: GlyphBuildConfig,
) -> tuple[list[FontSource], dict[str, dict[str, str]], dict[str, str]]:
    needed = (*config.packages, CONFUSABLES_PACKAGE)
    require_installed(needed, config.size if config.size in ("small", "benchmark") else None)
    versions = package_versions(needed)
    info = {p: {"version": versions[p], "licence": package_licence(p)} for p in config.packages}
    return [package_font_files(p) for p in config.packages], info, versions


def _up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
    except DatasetLayoutError:
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for split in SPLITS:
        path = split_file(out, split)
        expected = manifest["splits"].get(split, {}).get("sha256")
        if not path.is_file() or file_sha256(path) != expected:
            return None
    return manifest


def _select(
    scan: ScanResult,
    listing: dict[int, npt.NDArray[np.int64]],
    pool: InstancePool,
    config: GlyphBuildConfig,
    show: ProgressFactory,
) -> tuple[Selection, list[WrongGlyphs], dict[int, npt.NDArray[np.int64]]]:
    """Pick classes; drop packages that draw other glyphs and pick again if there are any."""
    orders = visit_orders(listing, config.seed)

    def select(orders: dict[int, tuple[int, ...]], reuse: dict[int, ClassInstances]) -> Selection:
        return select_classes(
            orders,
            pool,
            min_instances=config.min_instances,
            max_classes_per_script=config.max_classes_per_script,
            progress=show,
            reuse=reuse,
        )

    first = select(orders, {})
    face_source = [face.source for face in scan.faces]
    wrong = find_wrong_glyph_sources(first.classes, face_source, config.audit)
    if not wrong:
        return first, wrong, listing
    dropped = {(w.source, w.script) for w in wrong}

    def kept(cp: int, faces: Sequence[int]) -> list[int]:
        script = script_of(chr(cp))
        return [f for f in faces if (face_source[f], script) not in dropped]

    # Filtering the first pass's visiting order (rather than shuffling the shorter
    # list anew) lets every class that never kept a dropped face be reused as is.
    orders = {cp: tuple(kept(cp, order)) for cp, order in orders.items()}
    orders = {cp: order for cp, order in orders.items() if len(order) >= config.min_instances}
    listing = {cp: np.asarray(sorted(order), dtype=np.int64) for cp, order in orders.items()}
    return select(orders, first.tried), wrong, listing


def _measured_lookalikes(
    selection: Selection,
    listing: dict[int, npt.NDArray[np.int64]],
    pool: InstancePool,
    config: GlyphBuildConfig,
    show: ProgressFactory,
) -> list[Lookalike]:
    """Find look-alike classes, drawing the face-by-face comparisons in the pool."""
    codepoints = [c.codepoint for c in selection.classes]
    candidates = candidate_pairs(
        class_means([c.images for c in selection.classes]), config.lookalike
    )
    # Kept instances are already drawn: only the other (face, character) pairs are.
    ink = config.render.ink_threshold
    masks: dict[tuple[int, int], npt.NDArray[np.bool_] | None] = {
        (int(face), c.codepoint): binarise(image, ink).reshape(-1)
        for c in selection.classes
        for face, image in zip(c.faces, c.images, strict=True)
    }
    wanted = renders_needed(codepoints, candidates, listing, config.lookalike)
    needed = {
        face: todo
        for face, cps in wanted.items()
        if (todo := [cp for cp in cps if (face, cp) not in masks])
    }
    with show("drawing look-alike candidates", len(needed)) as advance:
        masks.update(pool.masks(needed, advance))
    return find_lookalikes(
        codepoints, candidates, listing, lambda face, cp: masks[face, cp], config.lookalike
    )


def _write_splits(
    out: Path, splits: dict[str, list[ClassInstances]], face_index: dict[int, int]
) -> dict[str, str]:
    """Write the split files (the manifest goes last, elsewhere); return their sha256."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a folder without a manifest is unfinished
    hashes = {}
    for split in SPLITS:
        path = split_file(out, split)
        write_split_arrays(path, _split_arrays(splits[split], face_index))
        hashes[split] = file_sha256(path)
    return hashes


def _split_arrays(classes: list[ClassInstances], face_index: dict[int, int]) -> dict[str, Any]:
    size = classes[0].images.shape[1] if classes else 0
    return {
        "images": (
            np.concatenate([c.images for c in classes])
            if classes
            else np.zeros((0, size, size), dtype=np.uint8)
        ),
        "labels": np.concatenate(
            [np.full(len(c.faces), label, dtype=np.int64) for label, c in enumerate(classes)]
            or [np.zeros(0, dtype=np.int64)]
        ),
        "faces": np.asarray([face_index[int(f)] for c in classes for f in c.faces], dtype=np.int32),
        "codepoints": np.asarray([c.codepoint for c in classes], dtype=np.int64),
    }


def _warnings(
    scan: ScanResult, selection: Selection, splits: dict[str, list[ClassInstances]]
) -> tuple[str, ...]:
    notes = []
    skipped = len(scan.unreadable) + len(selection.unreadable_faces)
    if skipped:
        notes.append(
            f"skipped {skipped} unreadable font file(s) or face(s); see skipped_fonts in {MANIFEST}"
        )
    notes.extend(f"{split} has no classes" for split in SPLITS if not splits[split])
    return tuple(notes)


def build_glyph_set(
    out: str | Path,
    config: GlyphBuildConfig,
    *,
    font_dir: str | Path | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> GlyphBuild:
    """Build (or reuse) the glyph set of `config` in folder `out`.

    Parameters
    ----------
    out
        Output folder; created when missing. Only ``manifest.json`` and the three
        ``<split>.npz`` files are written there.
    config
        What to build (`glyphs_config.size_config`).
    font_dir
        Render the fonts of this folder instead of the configured Debian packages.
    force
        Rebuild even when `out` holds an up-to-date build.
    workers
        Rendering processes (default: `default_workers`). The output does not depend on it.
    progress
        Progress display factory (the CLI passes `free_common.console.progress`).

    Raises
    ------
    FontPackageMissing
        When a configured package is not installed.
    FontUnreadable
        When no usable font face is found.
    DataError
        When no character has ``min_instances`` distinct renders.
    ConfigError
        When `out` is not a folder or `font_dir` does not exist.
    """
    started = time.perf_counter()
    out = Path(out)
    show = progress or _quiet
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if font_dir is not None:
        sources, source_info, origin = _folder_sources(Path(font_dir))
    else:
        sources, source_info, origin = _package_sources(config)
    fingerprint = build_fingerprint(config, origin)
    if not force and (manifest := _up_to_date(out, fingerprint)) is not None:
        return GlyphBuild(out, manifest, True, time.perf_counter() - started, ())

    scan = scan_fonts(sources)
    if not scan.faces:
        raise FontUnreadable(
            f"no usable font face in {', '.join(sorted(source_info))}: {len(scan.unreadable)} "
            f"file(s) unreadable, {len(scan.excluded)} excluded (symbol, bitmap or duplicate)"
        )
    refs = [FaceRef(f.path, f.index, notdef_probe(f.covers)) for f in scan.faces]
    listing = class_listing(scan.faces, config.min_instances)
    instance_spec = InstanceSpec(config.near_duplicate_px, config.max_instances, config.seed)
    with InstancePool(refs, config.render, instance_spec, workers or default_workers()) as pool:
        selection, wrong, listing = _select(scan, listing, pool, config, show)
        if not selection.classes:
            raise DataError(
                f"no character has {config.min_instances} distinct renders among the "
                f"{len(scan.faces)} usable font faces; give more fonts"
            )
        lookalikes = _measured_lookalikes(selection, listing, pool, config, show)

    codepoints = [c.codepoint for c in selection.classes]
    split_of = {cp: split_of_script(script_of(chr(cp)) or "") for cp in codepoints}
    confusables = cross_split_confusables(codepoints, split_of, confusable_groups())
    removed = choose_removals([*lookalikes, *confusables], split_of)

    splits: dict[str, list[ClassInstances]] = {split: [] for split in SPLITS}
    for instances in selection.classes:
        if instances.codepoint not in removed:
            splits[split_of[instances.codepoint]].append(instances)
    used_faces = sorted({int(f) for group in splits.values() for c in group for f in c.faces})
    face_index = {face: i for i, face in enumerate(used_faces)}

    hashes = _write_splits(out, splits, face_index)
    manifest = manifest_document(
        config=config,
        fingerprint=fingerprint,
        splits=splits,
        files=hashes,
        faces=scan.faces,
        used_faces=used_faces,
        sources=source_info,
        selection=selection,
        wrong_glyphs=wrong,
        lookalikes=lookalikes,
        confusables=confusables,
        removed=removed,
        split_of=split_of,
        unreadable=(
            *scan.unreadable,
            *(
                SkippedFont(f"{refs[f].path}#{refs[f].index}", "Pillow cannot open it")
                for f in selection.unreadable_faces
            ),
        ),
        excluded=scan.excluded,
    )
    write_json(out / MANIFEST, manifest)
    return GlyphBuild(
        out, manifest, False, time.perf_counter() - started, _warnings(scan, selection, splits)
    )
