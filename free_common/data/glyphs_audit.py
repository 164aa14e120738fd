"""Find font packages that draw other glyphs at a script's codepoints.

Some fonts list characters they draw as something else: a Korean font whose
hanja are their Hangul readings, Tibetan fonts that put Tibetan glyphs in the Lao
and Thai blocks. Their renders are valid pictures of the wrong character, so tofu
and emptiness checks pass them. They are found by leave-one-package-out
recognition: each instance of a (package, script) is compared with the class
prototypes built from the *other* packages only (blurred, centred, normalised
images; nearest by cosine). A package whose renders of a script are recognised as
their own character less than `AuditSpec.min_recognised` of the time (over at least
`AuditSpec.min_evidence` instances) is dropped for that script. Stylised but
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


def _features(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    kernel = torch.outer(_BLUR, _BLUR)
    kernel = (kernel / kernel.sum())[None, None]
    batch = torch.from_numpy(images).to(torch.float32).unsqueeze(1) / 255.0
    flat = torch.nn.functional.conv2d(batch, kernel, padding=2).flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    normalised: torch.Tensor = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return normalised


def _audit_script(
    group: Sequence[ClassInstances], face_source: Sequence[str], spec: AuditSpec, script: str
) -> list[WrongGlyphs]:
    labels = torch.cat(
        [torch.full((len(c.faces),), i, dtype=torch.int64) for i, c in enumerate(group)]
    )
    sources = np.array([face_source[int(f)] for c in group for f in c.faces])
    features = _features(np.concatenate([c.images for c in group]))
    sums = torch.zeros(len(group), features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, features.to(torch.float64))
    counts = torch.bincount(labels, minlength=len(group)).to(torch.float64)
    found = []
    for source in sorted(set(sources.tolist())):
        rows = torch.from_numpy(np.flatnonzero(sources == source))
        if len(rows) < spec.min_evidence:
            continue
        own = torch.zeros_like(sums).index_add_(0, labels[rows], features[rows].to(torch.float64))
        own_counts = torch.bincount(labels[rows], minlength=len(group)).to(torch.float64)
        others = (sums - own) / (counts - own_counts).clamp_min(1.0)[:, None]
        others = others / others.norm(dim=1, keepdim=True).clamp_min(1e-9)
        predicted = (features[rows].to(torch.float64) @ others.T).argmax(dim=1)
        recognised = float((predicted == labels[rows]).to(torch.float64).mean())
        if recognised < spec.min_recognised:
            found.append(WrongGlyphs(source, script, recognised, len(rows)))
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
