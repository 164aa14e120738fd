"""N-way K-shot episodes drawn from one `ImageSet` (one split, never a mix).

An episode picks `ways` classes among those with at least ``shots + queries``
images, then ``shots`` support and ``queries`` query images of each, all distinct.
Labels are remapped to ``0 .. ways-1`` in the order the classes were picked.
Episode ``i`` of a sampler depends only on ``(seed, i)``, so a fixed evaluation
set is ``[sampler.episode(i) for i in range(600)]`` whatever else ran before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from free_common.data.imageset import ImageSet
from free_common.errors import SplitError

__all__ = ["Episode", "EpisodeSampler", "sample_episode", "to_tensor"]


@dataclass(frozen=True, eq=False)
class Episode:
    """One few-shot task.

    ``support_x`` is ``(ways*shots, C, H, W)`` and ``query_x`` ``(ways*queries, C, H, W)``,
    float32 in ``[0, 1]``; ``support_y``/``query_y`` are int64 in ``0 .. ways-1``, class
    by class (``[0]*shots + [1]*shots + ...``). ``classes[j]`` is the `ImageSet` label
    behind episode label ``j``, ``class_names[j]`` its name.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: tuple[int, ...]
    class_names: tuple[str, ...]

    @property
    def ways(self) -> int:
        """Number of classes in the episode."""
        return len(self.classes)


def to_tensor(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    """Return uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` images as float ``(N, C, H, W)`` in [0, 1]."""
    batch = torch.from_numpy(np.ascontiguousarray(images))
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    return batch.to(torch.float32).div_(255.0).contiguous()


class EpisodeSampler:
    """Draws reproducible episodes from one split.

    Parameters
    ----------
    data
        The split to draw from.
    ways, shots, queries
        Classes per episode, support and query images per class.
    seed
        Episode ``i`` depends only on ``(seed, i)``.

    Raises
    ------
    SplitError
        When fewer than `ways` classes have ``shots + queries`` images, or a count is
        out of range.
    """

    def __init__(self, data: ImageSet, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        if ways < 1 or shots < 1 or queries < 0:
            raise SplitError(
                f"an episode needs ways >= 1, shots >= 1 and queries >= 0 "
                f"(got {ways}, {shots}, {queries})"
            )
        need = shots + queries
        counts = data.class_counts()
        eligible = np.flatnonzero(counts >= need)
        if eligible.size < ways:
            where = f" of {data.split}" if data.split else ""
            raise SplitError(
                f"{ways}-way {shots}-shot {queries}-query episodes need {ways} classes with "
                f">= {need} images each; only {eligible.size} of {data.num_classes} "
                f"classes{where} have that many: use fewer ways, shots or queries"
            )
        self.data = data
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        self._eligible = eligible
        order = np.argsort(data.labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        self._members = [order[starts[c] : starts[c + 1]] for c in range(data.num_classes)]

    def episode(self, index: int) -> Episode:
        """Return episode number `index` (the same for the same seed and index)."""
        rng = np.random.default_rng([self.seed, index])
        picked = rng.choice(self._eligible, size=self.ways, replace=False)
        need = self.shots + self.queries
        rows = np.stack([rng.choice(self._members[c], size=need, replace=False) for c in picked])
        support, query = rows[:, : self.shots].reshape(-1), rows[:, self.shots :].reshape(-1)
        labels = torch.arange(self.ways, dtype=torch.int64)
        return Episode(
            support_x=to_tensor(self.data.images[support]),
            support_y=labels.repeat_interleave(self.shots),
            query_x=to_tensor(self.data.images[query]),
            query_y=labels.repeat_interleave(self.queries),
            classes=tuple(int(c) for c in picked),
            class_names=tuple(self.data.class_names[c] for c in picked),
        )

    def episodes(self, count: int, start: int = 0) -> Iterator[Episode]:
        """Yield episodes ``start .. start+count-1``."""
        for index in range(start, start + count):
            yield self.episode(index)


def sample_episode(data: ImageSet, ways: int, shots: int, queries: int, seed: int = 0) -> Episode:
    """Return one episode: ``EpisodeSampler(data, ways, shots, queries, seed).episode(0)``."""
    return EpisodeSampler(data, ways, shots, queries, seed).episode(0)
