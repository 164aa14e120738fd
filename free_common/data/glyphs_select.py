"""Which characters become classes: coverage counts, then rendering in rounds.

A character is a candidate when it is a class character (`glyphs_chars`) and at
least ``min_instances`` faces list it. Per script, candidates are tried in order of
how many faces list them (most first, then codepoint); a class is accepted when it
ends with ``min_instances`` distinct instances. With ``max_classes_per_script``,
trying stops once that many are accepted: later rounds render only scripts that
still need classes, and results past the cap are discarded, so the accepted set is
the same whatever the round sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

from free_common.data.glyphs_chars import is_class_character, script_of
from free_common.data.glyphs_fonts import FontFace
from free_common.data.glyphs_instances import ClassInstances, ClassTask, InstancePool, visit_order

__all__ = [
    "Advance",
    "ProgressFactory",
    "Selection",
    "class_listing",
    "select_classes",
    "visit_orders",
]

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]
"""``(description, total) -> context manager yielding advance(n)``, as `console.progress`."""

_CAP_MARGIN = 8


@cache
def _is_class(codepoint: int) -> bool:
    return is_class_character(chr(codepoint))


def class_listing(faces: Sequence[FontFace], min_faces: int) -> dict[int, npt.NDArray[np.int64]]:
    """Map each candidate character to the sorted ids of the faces listing it."""
    if not faces:
        return {}
    codepoints = [face.codepoints() for face in faces]
    owners = np.concatenate(
        [np.full(len(cps), i, dtype=np.int64) for i, cps in enumerate(codepoints)]
    )
    flat = np.concatenate(codepoints)
    unique, counts = np.unique(flat, return_counts=True)
    common = unique[counts >= min_faces]
    wanted = common[np.fromiter((_is_class(int(cp)) for cp in common), np.bool_, len(common))]
    keep = np.isin(flat, wanted)
    flat, owners = flat[keep], owners[keep]
    order = np.lexsort((owners, flat))
    flat, owners = flat[order], owners[order]
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    groups = np.split(owners, starts[1:])
    return {int(flat[s]): group for s, group in zip(starts, groups, strict=True)}


@dataclass(frozen=True)
class Selection:
    """Accepted classes (ascending codepoint) and counts of what happened on the way."""

    classes: tuple[ClassInstances, ...]
    tried: dict[int, ClassInstances]
    """Every class rendered (accepted or not), by codepoint: reusable by a later pass."""
    candidates: int
    below_min_instances: int
    refused_renders: int
    near_duplicates: int
    unreadable_faces: tuple[int, ...]

    @property
    def rendered(self) -> int:
        """How many classes were rendered (or reused) to pick the accepted ones."""
        return len(self.tried)


def _script_queues(orders: Mapping[int, tuple[int, ...]]) -> dict[str, list[int]]:
    queues: dict[str, list[int]] = {}
    for cp in sorted(orders, key=lambda c: (-len(orders[c]), c)):
        script = script_of(chr(cp))
        assert script is not None, "class characters always have a script"
        queues.setdefault(script, []).append(cp)
    return queues


def visit_orders(
    listing: Mapping[int, npt.NDArray[np.int64]], seed: int
) -> dict[int, tuple[int, ...]]:
    """Return each candidate's faces in the order its instances are tried."""
    return {cp: visit_order(cp, faces.tolist(), seed) for cp, faces in listing.items()}


def select_classes(
    orders: Mapping[int, tuple[int, ...]],
    pool: InstancePool,
    *,
    min_instances: int,
    max_classes_per_script: int | None,
    progress: ProgressFactory,
    reuse: Mapping[int, ClassInstances] | None = None,
) -> Selection:
    """Render candidates round by round until every script is full or exhausted.

    Parameters
    ----------
    orders
        Each candidate's faces in visiting order (`visit_orders`, possibly filtered).
    pool
        Renders the classes.
    min_instances, max_classes_per_script
        Acceptance and the per-script cap.
    progress
        Progress display factory.
    reuse
        Results of an earlier pass: a class is not rendered again when its kept
        faces are all still in its visiting order (dropping faces it never kept
        cannot change what it keeps).
    """
    queues = _script_queues(orders)
    position = dict.fromkeys(queues, 0)
    accepted: dict[str, list[ClassInstances]] = {script: [] for script in queues}
    tried: dict[int, ClassInstances] = {}
    below = 0
    round_number = 0
    while True:
        batch: list[tuple[str, int]] = []
        for script in sorted(queues):
            queue, start = queues[script], position[script]
            if max_classes_per_script is None:
                take = len(queue) - start
            else:
                need = max_classes_per_script - len(accepted[script])
                take = 0 if need <= 0 else min(len(queue) - start, need + need // 8 + _CAP_MARGIN)
            batch.extend((script, cp) for cp in queue[start : start + take])
            position[script] = start + take
        if not batch:
            break
        round_number += 1
        results = _render(batch, orders, pool, reuse or {}, progress, round_number)
        for (script, cp), result in zip(batch, results, strict=True):
            if (
                max_classes_per_script is not None
                and len(accepted[script]) >= max_classes_per_script
            ):
                continue
            tried[cp] = result
            if len(result.faces) >= min_instances:
                accepted[script].append(result)
            else:
                below += 1
    classes = sorted((c for group in accepted.values() for c in group), key=lambda c: c.codepoint)
    return Selection(
        classes=tuple(classes),
        tried=tried,
        candidates=len(orders),
        below_min_instances=below,
        refused_renders=sum(r.refused for r in tried.values()),
        near_duplicates=sum(r.near_duplicates for r in tried.values()),
        unreadable_faces=tuple(sorted({f for r in tried.values() for f in r.unreadable_faces})),
    )


def _render(
    batch: list[tuple[str, int]],
    orders: Mapping[int, tuple[int, ...]],
    pool: InstancePool,
    reuse: Mapping[int, ClassInstances],
    progress: ProgressFactory,
    round_number: int,
) -> list[ClassInstances]:
    results: dict[int, ClassInstances] = {}
    for _, cp in batch:
        prior = reuse.get(cp)
        if prior is not None and set(prior.faces.tolist()) <= set(orders[cp]):
            results[cp] = prior
    tasks = [ClassTask(cp, orders[cp]) for _, cp in batch if cp not in results]
    if tasks:
        label = (
            "rendering glyphs" if round_number == 1 else f"rendering glyphs, round {round_number}"
        )
        with progress(label, len(tasks)) as advance:
            results.update((r.codepoint, r) for r in pool.run(tasks, advance))
    return [results[cp] for _, cp in batch]
