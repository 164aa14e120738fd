"""Find font packages that draw other glyphs at a script's codepoints.

Some fonts list characters they draw as something else: a Korean font whose
hanja are their Hangul readings, Tibetan fonts that put Tibetan glyphs in the Lao
and Thai blocks. Their renders are valid pictures of the wrong character, so tofu
and emptiness checks pass them. They are found by leave-one-package-out
recognition: each instance of a (package, script) is compared with the class
prototypes built from the *other* packages only (blurred, centred, normalised
images; nearest by cosine). A package whose renders of a script are recognised as
their own character less than `AuditSpec.min_recognised` of the time (over at least
`AuditSpec.min_evidence` instances of characters other packages draw too) is
dropped for that script; with no other package to compare with, nothing is judged. Stylised but
correct fonts (brush calligraphy, hairline weights) stay well above that rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from free_common.data.glyphs_chars import script_of
from free_common.data.glyphs_instances import ClassInstances

__all__ = ["AuditSpec", "WrongGlyphs", "find_wrong_glyph_sources"]

_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


@dataclass(frozen=True)
class AuditSpec:
    """Thresholds of the wrong-glyph audit; part of the build configuration."""

    min_evidence: int = 20
    min_recognised: float = 0.05


@dataclass(frozen=True)
class WrongGlyphs:
    """A package dropped for one script, and how often its renders were recognised."""

    source: str
    script: str
    recognised: float
    instances: int


def _features(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    kernel = torch.outer(_BLUR, _BLUR)
    kernel = (kernel / kernel.sum())[None, None]
    batch = torch.from_numpy(images).to(torch.float32).unsqueeze(1) / 255.0
    flat = torch.nn.functional.conv2d(batch, kernel, padding=2).flatten(1).to(torch.float64)
    flat = flat - flat.mean(dim=1, keepdim=True)
    normalised: npt.NDArray[np.float64] = (
        flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)
    ).numpy()
    return normalised


def _class_sums(
    features: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], classes: int
) -> npt.NDArray[np.float64]:
    """Sum the rows of each label; `labels` must be non-decreasing."""
    sums = np.zeros((classes, features.shape[1]), dtype=np.float64)
    if len(labels):
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        sums[labels[starts]] = np.add.reduceat(features, starts, axis=0)
    return sums


def _audit_script(
    group: Sequence[ClassInstances], face_source: Sequence[str], spec: AuditSpec, script: str
) -> list[WrongGlyphs]:
    labels = np.concatenate([np.full(len(c.faces), i, dtype=np.int64) for i, c in enumerate(group)])
    names = sorted({face_source[int(f)] for c in group for f in c.faces})
    source_id = {name: i for i, name in enumerate(names)}
    sources = np.array([source_id[face_source[int(f)]] for c in group for f in c.faces])
    features = _features(np.concatenate([c.images for c in group]))
    sums = _class_sums(features, labels, len(group))
    counts = np.bincount(labels, minlength=len(group))
    found = []
    for source, name in enumerate(names):
        rows = np.flatnonzero(sources == source)
        if len(rows) < spec.min_evidence:
            continue
        other_counts = counts - np.bincount(labels[rows], minlength=len(group))
        others = sums - _class_sums(features[rows], labels[rows], len(group))
        # Only classes the other packages also draw can be judged.
        rows = rows[other_counts[labels[rows]] > 0]
        if len(rows) < spec.min_evidence:
            continue
        drawn = other_counts > 0
        others = others[drawn] / other_counts[drawn][:, None]
        others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-9)
        predicted = np.flatnonzero(drawn)[(features[rows] @ others.T).argmax(axis=1)]
        recognised = float(np.mean(predicted == labels[rows]))
        if recognised < spec.min_recognised:
            found.append(WrongGlyphs(name, script, recognised, len(rows)))
    return found


def find_wrong_glyph_sources(
    classes: Sequence[ClassInstances], face_source: Sequence[str], spec: AuditSpec
) -> list[WrongGlyphs]:
    """Return the (package, script) pairs whose renders are mostly other glyphs.

    Parameters
    ----------
    classes
        Accepted classes with their instances.
    face_source
        The package (or folder) of each face id.
    spec
        Thresholds.
    """
    by_script: dict[str, list[ClassInstances]] = {}
    for instances in classes:
        script = script_of(chr(instances.codepoint))
        if script is not None:
            by_script.setdefault(script, []).append(instances)
    found: list[WrongGlyphs] = []
    for script in sorted(by_script):
        group = by_script[script]
        if len(group) >= 2:
            found.extend(_audit_script(group, face_source, spec, script))
    return found
