"""The manifest of a glyph set: what went in, what came out, and a build fingerprint."""

from __future__ import annotations

import hashlib
import json
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL
from PIL import features

from free_common.data.glyphs_audit import WrongGlyphs
from free_common.data.glyphs_chars import UNICODE_VERSION, class_label, script_of
from free_common.data.glyphs_config import BUILDER_VERSION, GlyphBuildConfig
from free_common.data.glyphs_fonts import FontFace, SkippedFont
from free_common.data.glyphs_instances import ClassInstances
from free_common.data.glyphs_lookalike import Lookalike
from free_common.data.glyphs_select import Selection
from free_common.data.glyphs_split import split_table
from free_common.data.imageset import SPLITS

__all__ = ["FORMAT", "build_fingerprint", "manifest_document", "software_versions"]

FORMAT = "free-fed glyph set"


def software_versions() -> dict[str, str]:
    """Return the versions that can change renders (recorded, and part of the fingerprint)."""
    return {
        "pillow": PIL.__version__,
        "freetype": str(features.version("freetype2")),
        "numpy": np.__version__,
        "unicode": UNICODE_VERSION,
        "python": platform.python_version(),
    }


def build_fingerprint(config: GlyphBuildConfig, origin: Mapping[str, str]) -> str:
    """Return a hash of everything that decides a build's output.

    `origin` maps each font package to its installed version (or each font file of a
    folder to its sha256).
    """
    document = {
        "builder_version": BUILDER_VERSION,
        "size": config.size,
        "thresholds": config.thresholds(),
        "origin": dict(sorted(origin.items())),
        "software": software_versions(),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _class_entry(instances: ClassInstances) -> dict[str, Any]:
    return {
        "name": class_label(instances.codepoint),
        "script": script_of(chr(instances.codepoint)),
        "instances": len(instances.faces),
    }


def manifest_document(
    *,
    config: GlyphBuildConfig,
    fingerprint: str,
    splits: Mapping[str, Sequence[ClassInstances]],
    files: Mapping[str, str],
    faces: Sequence[FontFace],
    used_faces: Sequence[int],
    sources: Mapping[str, dict[str, str]],
    selection: Selection,
    wrong_glyphs: Sequence[WrongGlyphs],
    lookalikes: Sequence[Lookalike],
    confusables: Sequence[Lookalike],
    removed: Mapping[int, Lookalike],
    split_of: Mapping[int, str],
    unreadable: Sequence[SkippedFont],
    excluded: Sequence[SkippedFont],
) -> dict[str, Any]:
    """Assemble the manifest (no timestamps or paths of the output: equal builds, equal bytes).

    `files` maps each split to its array file's sha256; `sources` maps each font
    package (or folder) to ``{"version": ..., "licence": ...}``.
    """
    split_docs: dict[str, Any] = {}
    for split in SPLITS:
        classes = splits[split]
        counts = [len(c.faces) for c in classes]
        split_docs[split] = {
            "classes": len(classes),
            "images": int(sum(counts)),
            "min_instances": config.min_instances,
            "max_instances": config.max_instances,
            "instances_per_class": {
                "min": min(counts, default=0),
                "max": max(counts, default=0),
                "mean": round(float(np.mean(counts)), 2) if counts else 0.0,
            },
            "scripts": dict(sorted(Counter(script_of(chr(c.codepoint)) for c in classes).items())),
            "file": f"{split}.npz",
            "sha256": files[split],
        }
    used_by_source = Counter(faces[i].source for i in used_faces)
    return {
        "format": FORMAT,
        "builder_version": BUILDER_VERSION,
        "size": config.size,
        "fingerprint": fingerprint,
        "thresholds": config.thresholds(),
        "software": software_versions(),
        "splits": split_docs,
        "script_splits": split_table(script_of(chr(c.codepoint)) or "" for c in selection.classes),
        "classes": {split: [_class_entry(c) for c in splits[split]] for split in SPLITS},
        "wrong_glyph_sources": [
            {
                "package": w.source,
                "script": w.script,
                "recognised": round(w.recognised, 4),
                "instances": w.instances,
            }
            for w in wrong_glyphs
        ],
        "removed_lookalikes": [
            {
                "removed": class_label(cp),
                "removed_split": split_of[cp],
                "kept": class_label(pair.first if cp == pair.second else pair.second),
                "kept_split": split_of[pair.first if cp == pair.second else pair.second],
                "reason": pair.reason(config.lookalike),
            }
            for cp, pair in sorted(removed.items())
        ],
        "fonts": [
            {
                "package": faces[i].source,
                "file": faces[i].path,
                "index": faces[i].index,
                "family": faces[i].family,
                "style": faces[i].style,
            }
            for i in used_faces
        ],
        "packages": [
            {"name": name, **info, "faces_used": used_by_source.get(name, 0)}
            for name, info in sorted(sources.items())
        ],
        "skipped_fonts": {
            "unreadable": [{"path": s.path, "reason": s.reason} for s in unreadable],
            "excluded": [{"path": s.path, "reason": s.reason} for s in excluded],
        },
        "stats": {
            "faces_scanned": len(faces),
            "candidate_classes": selection.candidates,
            "rendered_classes": selection.rendered,
            "classes_below_min_instances": selection.below_min_instances,
            "renders_refused": selection.refused_renders,
            "near_duplicates_dropped": selection.near_duplicates,
            "lookalike_pairs": len(lookalikes),
            "cross_split_confusable_pairs": len(confusables),
            "lookalike_classes_removed": len(removed),
        },
    }
