"""Choose the instances of each class: distinct renders from distinct faces.

For one character, the faces that list it are visited in an order shuffled by
``(seed, codepoint)``; each face's render is kept unless it is refused (empty,
tofu) or a near-duplicate of a render already kept: its binarised image differs
from one of them in fewer than `InstanceSpec.near_duplicate_px` pixels. Many
packages ship the same design (weights, derived families, one face in two
packages), so without this support and query images would leak into each other.
The visit stops once `InstanceSpec.max_instances` renders are kept.

The work runs in a pool of worker processes, one class per task, results in task
order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from free_common.data.glyphs_render import FaceRenderer, RenderSpec, binarise
from free_common.errors import FontUnreadable

__all__ = [
    "ClassInstances",
    "ClassTask",
    "FaceRef",
    "InstancePool",
    "InstanceSpec",
    "visit_order",
]


@dataclass(frozen=True)
class InstanceSpec:
    """How instances are chosen; part of the build configuration and the manifest."""

    near_duplicate_px: int = 40
    max_instances: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class FaceRef:
    """What a worker needs to draw with a face."""

    path: str
    index: int
    probe: int
    """A codepoint the face does not list: its drawing is the face's tofu."""


@dataclass(frozen=True)
class ClassTask:
    """One character and the ids of the faces that list it, in visiting order."""

    codepoint: int
    faces: tuple[int, ...]


@dataclass(frozen=True)
class ClassInstances:
    """The kept renders of one character, and what was dropped on the way."""

    codepoint: int
    faces: npt.NDArray[np.int32]
    images: npt.NDArray[np.uint8]
    refused: int
    near_duplicates: int
    unreadable_faces: tuple[int, ...]


def visit_order(codepoint: int, faces: Sequence[int], seed: int) -> tuple[int, ...]:
    """Return `faces` shuffled by ``(seed, codepoint)``: the order instances are tried."""
    ordered = np.asarray(sorted(faces), dtype=np.int64)
    rng = np.random.default_rng([seed, codepoint])
    return tuple(int(f) for f in ordered[rng.permutation(len(ordered))])


class _Worker:
    """Per-process state: the face table and an open-font cache."""

    def __init__(
        self, faces: Sequence[FaceRef], render: RenderSpec, instances: InstanceSpec
    ) -> None:
        self.faces = faces
        self.renderer = FaceRenderer(render)
        self.spec = instances
        self.threshold = render.ink_threshold
        self.pixels = render.canvas_px * render.canvas_px

    def run(self, task: ClassTask) -> ClassInstances:
        limit = self.spec.max_instances
        kept_faces: list[int] = []
        kept_images: list[npt.NDArray[np.uint8]] = []
        masks = np.zeros((limit or len(task.faces), self.pixels), dtype=np.bool_)
        refused = near = 0
        unreadable: list[int] = []
        for face_id in task.faces:
            if limit is not None and len(kept_faces) >= limit:
                break
            face = self.faces[face_id]
            try:
                image = self.renderer.render(face.path, face.index, task.codepoint, face.probe)
            except FontUnreadable:
                unreadable.append(face_id)
                continue
            if image is None:
                refused += 1
                continue
            mask = binarise(image, self.threshold).reshape(-1)
            n = len(kept_faces)
            if n and int(np.count_nonzero(masks[:n] != mask, axis=1).min()) < (
                self.spec.near_duplicate_px
            ):
                near += 1
                continue
            masks[n] = mask
            kept_faces.append(face_id)
            kept_images.append(image)
        size = self.renderer.spec.canvas_px
        return ClassInstances(
            codepoint=task.codepoint,
            faces=np.asarray(kept_faces, dtype=np.int32),
            images=(
                np.stack(kept_images) if kept_images else np.zeros((0, size, size), dtype=np.uint8)
            ),
            refused=refused,
            near_duplicates=near,
            unreadable_faces=tuple(unreadable),
        )

    def masks(self, task: tuple[int, tuple[int, ...]]) -> list[bytes | None]:
        """Draw characters of one face; each ink mask comes back bit-packed."""
        face_id, codepoints = task
        face = self.faces[face_id]
        out: list[bytes | None] = []
        for codepoint in codepoints:
            try:
                image = self.renderer.render(face.path, face.index, codepoint, face.probe)
            except FontUnreadable:
                image = None
            out.append(
                None if image is None else np.packbits(binarise(image, self.threshold)).tobytes()
            )
        return out


_WORKER: _Worker | None = None


def _init_worker(faces: Sequence[FaceRef], render: RenderSpec, instances: InstanceSpec) -> None:
    global _WORKER
    _WORKER = _Worker(faces, render, instances)


def _run_task(task: ClassTask) -> ClassInstances:
    assert _WORKER is not None, "pool worker used before its initializer ran"
    return _WORKER.run(task)


def _run_masks(task: tuple[int, tuple[int, ...]]) -> list[bytes | None]:
    assert _WORKER is not None, "pool worker used before its initializer ran"
    return _WORKER.masks(task)


class InstancePool(AbstractContextManager["InstancePool"]):
    """Renders classes in `workers` processes (in this process when `workers` is 1)."""

    def __init__(
        self,
        faces: Sequence[FaceRef],
        render: RenderSpec,
        instances: InstanceSpec,
        workers: int,
    ) -> None:
        self._local: _Worker | None = None
        self._pool = None
        if workers <= 1:
            self._local = _Worker(faces, render, instances)
        else:
            # fork is cheap and the parent holds no threads that workers need; other
            # systems spawn, which re-imports this module in each worker.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self._pool = context.Pool(
                workers, initializer=_init_worker, initargs=(faces, render, instances)
            )

    def run(
        self, tasks: Sequence[ClassTask], advance: Callable[[int], None] | None = None
    ) -> list[ClassInstances]:
        """Render every task; results come back in task order."""
        results: Iterator[ClassInstances]
        if self._pool is not None:
            results = self._pool.imap(_run_task, tasks, chunksize=8)
        else:
            assert self._local is not None
            results = map(self._local.run, tasks)
        out = []
        for result in results:
            out.append(result)
            if advance is not None:
                advance(1)
        return out

    def masks(
        self, requests: Mapping[int, Sequence[int]], advance: Callable[[int], None] | None = None
    ) -> dict[tuple[int, int], npt.NDArray[np.bool_] | None]:
        """Draw the requested ``{face id: codepoints}``; binarised, flattened masks back.

        A None mask means the render was refused (or the face is unreadable).
        """
        tasks = [(face, tuple(cps)) for face, cps in requests.items()]
        results: Iterator[list[bytes | None]]
        if self._pool is not None:
            results = self._pool.imap(_run_masks, tasks, chunksize=4)
        else:
            assert self._local is not None
            results = map(self._local.masks, tasks)
        out: dict[tuple[int, int], npt.NDArray[np.bool_] | None] = {}
        for (face, cps), packed in zip(tasks, results, strict=True):
            for cp, bits in zip(cps, packed, strict=True):
                out[face, cp] = (
                    None
                    if bits is None
                    else np.unpackbits(np.frombuffer(bits, dtype=np.uint8)).astype(np.bool_)
                )
            if advance is not None:
                advance(1)
        return out

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
