"""Look-alike classes: characters that are drawn (nearly) the same, like A, Α and А.

Two classes are look-alikes when either

- their class means are closer than `LookalikeSpec.mean_px`: the L1 distance of the
  mean images (grey levels in [0, 1], summed over the 32x32 pixels), or
- they are closer than `LookalikeSpec.candidate_px` and, in at least a third of the
  faces that have both (up to `LookalikeSpec.faces_compared` of them, spread evenly
  over the sorted list so that one family does not decide), the two renders differ
  in fewer than `LookalikeSpec.same_face_px` binarised pixels: those fonts draw them
  with the same glyph, up to the near-duplicate tolerance. A third, not a half:
  Armenian Տ is Latin S in some families and its own shape in others, and a
  learner that meets both cannot tell them apart.

The second test catches homoglyphs whose class means differ only because their
instances come from different fonts (Latin O and Cyrillic О are 40 to 80 px apart
on average, yet the same outline in every font that has both); it measures what
Unicode's confusables list records, measured on the fonts at hand.

Of each look-alike pair one class goes: across splits, the one in the split that
ranks lower in `SPLIT_PRIORITY` (meta-train keeps its classes, then meta-test);
within a split, the one with the higher codepoint (``l`` goes, ``I`` stays).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "SPLIT_PRIORITY",
    "Candidates",
    "Lookalike",
    "LookalikeSpec",
    "candidate_pairs",
    "choose_removals",
    "class_means",
    "faces_to_compare",
    "find_lookalikes",
    "mean_distances",
    "renders_needed",
]

SPLIT_PRIORITY = ("meta-train", "meta-test", "meta-val")
_ROWS_PER_BLOCK = 1024

MaskFn = Callable[[int, int], "npt.NDArray[np.bool_] | None"]
"""``(face id, codepoint) -> binarised render, or None when refused``."""


@dataclass(frozen=True)
class LookalikeSpec:
    """Thresholds of the look-alike test; part of the build configuration."""

    mean_px: float = 50.0
    candidate_px: float = 100.0
    same_face_px: int = 40
    faces_compared: int = 12
    same_face_share: float = 1 / 3


@dataclass(frozen=True)
class Lookalike:
    """A pair of look-alike classes (``first < second``) and the evidence."""

    first: int
    second: int
    mean_px: float
    same_faces: int
    faces_compared: int
    confusable: bool = False
    """Paired by Unicode's confusables rather than measured (`glyphs_confusables`)."""

    def reason(self, spec: LookalikeSpec) -> str:
        """Say in words why the pair counts as look-alike."""
        if self.confusable:
            return "Unicode confusables"
        if self.mean_px < spec.mean_px:
            return f"class means {self.mean_px:.1f} px apart"
        return f"same glyph in {self.same_faces} of {self.faces_compared} shared faces"


def class_means(images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """Return each class's mean image in [0, 1], flattened: ``(classes, H*W)``."""
    if not images:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(
        [
            batch.reshape(batch.shape[0], -1).mean(axis=0, dtype=np.float64) / 255.0
            for batch in images
        ]
    ).astype(np.float32)


def mean_distances(
    rows: npt.NDArray[np.float32], cols: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Return the L1 distances (px) between class means, ``(len(rows), len(cols))``."""
    out = np.empty((len(rows), len(cols)), dtype=np.float32)
    if out.size == 0:
        return out
    right = torch.from_numpy(np.ascontiguousarray(cols))
    for start in range(0, len(rows), _ROWS_PER_BLOCK):
        left = torch.from_numpy(np.ascontiguousarray(rows[start : start + _ROWS_PER_BLOCK]))
        out[start : start + len(left)] = torch.cdist(left, right, p=1).numpy()
    return out


@dataclass(frozen=True)
class Candidates:
    """Class pairs (row indices ``first < second``) closer than the candidate threshold."""

    first: npt.NDArray[np.int64]
    second: npt.NDArray[np.int64]
    mean_px: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.first.size)


def candidate_pairs(means: npt.NDArray[np.float32], spec: LookalikeSpec) -> Candidates:
    """Return the class pairs whose means are closer than `LookalikeSpec.candidate_px`."""
    firsts, seconds, values = [], [], []
    for start in range(0, len(means), _ROWS_PER_BLOCK):
        block = mean_distances(means[start : start + _ROWS_PER_BLOCK], means)
        rows, cols = np.nonzero(block < spec.candidate_px)
        rows += start
        upper = cols > rows
        firsts.append(rows[upper])
        seconds.append(cols[upper])
        values.append(block[rows[upper] - start, cols[upper]])
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return Candidates(empty, empty, np.zeros(0, dtype=np.float32))
    return Candidates(
        np.concatenate(firsts).astype(np.int64),
        np.concatenate(seconds).astype(np.int64),
        np.concatenate(values).astype(np.float32),
    )


def find_lookalikes(
    codepoints: Sequence[int],
    candidates: Candidates,
    listing: Mapping[int, npt.NDArray[np.int64]],
    mask: MaskFn,
    spec: LookalikeSpec,
) -> list[Lookalike]:
    """Return the look-alike pairs among `candidates`, in candidate order.

    Parameters
    ----------
    codepoints
        The classes, in the row order of the means the candidates came from.
    candidates
        From `candidate_pairs`.
    listing
        For each codepoint, the sorted ids of every face that lists it.
    mask
        Renders one character of one face, binarised.
    spec
        Thresholds.
    """
    found: list[Lookalike] = []
    for i, j, apart in zip(
        candidates.first.tolist(),
        candidates.second.tolist(),
        candidates.mean_px.tolist(),
        strict=True,
    ):
        a, b = codepoints[i], codepoints[j]
        same = compared = 0
        if apart >= spec.mean_px:
            for face in faces_to_compare(listing[a], listing[b], spec):
                left, right = mask(face, a), mask(face, b)
                if left is None or right is None:
                    continue
                compared += 1
                same += int(np.count_nonzero(left != right) < spec.same_face_px)
        if apart < spec.mean_px or (compared >= 2 and same >= spec.same_face_share * compared):
            found.append(Lookalike(min(a, b), max(a, b), apart, same, compared))
    return found


def faces_to_compare(
    first: npt.NDArray[np.int64], second: npt.NDArray[np.int64], spec: LookalikeSpec
) -> list[int]:
    """Return the faces two classes are compared in: shared ones, evenly spaced."""
    shared = np.intersect1d(first, second)
    if len(shared) <= spec.faces_compared:
        return [int(f) for f in shared]
    picks = np.linspace(0, len(shared) - 1, spec.faces_compared).round().astype(np.int64)
    return [int(f) for f in shared[picks]]


def renders_needed(
    codepoints: Sequence[int],
    candidates: Candidates,
    listing: Mapping[int, npt.NDArray[np.int64]],
    spec: LookalikeSpec,
) -> dict[int, list[int]]:
    """Return, per face, the characters `find_lookalikes` will ask it to draw."""
    needed: dict[int, set[int]] = {}
    for i, j, apart in zip(
        candidates.first.tolist(),
        candidates.second.tolist(),
        candidates.mean_px.tolist(),
        strict=True,
    ):
        if apart < spec.mean_px:
            continue
        a, b = codepoints[i], codepoints[j]
        for face in faces_to_compare(listing[a], listing[b], spec):
            needed.setdefault(face, set()).update((a, b))
    return {face: sorted(cps) for face, cps in sorted(needed.items())}


def choose_removals(
    lookalikes: Sequence[Lookalike], split_of: Mapping[int, str]
) -> dict[int, Lookalike]:
    """Return the classes to remove, each with the pair that condemned it.

    Across splits the class in the lower-priority split goes (`SPLIT_PRIORITY`);
    within a split, the higher codepoint.
    """
    rank = {split: i for i, split in enumerate(SPLIT_PRIORITY)}
    removed: dict[int, Lookalike] = {}
    for pair in lookalikes:
        a, b = pair.first, pair.second
        loser = b if rank[split_of[a]] <= rank[split_of[b]] else a
        removed.setdefault(loser, pair)
    return removed
