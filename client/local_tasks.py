"""An owner's local few-shot tasks, and how well a release adapts to them.

The ``--data`` folder holds one sub-folder per class, named after the class,
with that class's images (PNG, JPEG, BMP or GIF; any size, colour or grey)::

    DATA/
      cat/      001.png 002.png ...
      dog/      a.png b.jpg ...
      ...

At least as many classes as the release's ways (5 by default) need ``shots + 1``
images each; 20 or more per class give steadier scores. Images are read as the
release's meta-learner expects them (grey or RGB, resized to its square size,
pixels in [0, 1]). Files whose names start with ``.`` are ignored.

`score_release` draws seeded N-way K-shot episodes from those classes and, for
each, fine-tunes the release's whole network on the support images (10 plain
gradient steps at lr 0.01, batch-norm on batch statistics, as FREE evaluates)
and scores the queries. `free_common.engine.release_model.load_learner` and
`score_model` are its two halves,
for callers that score another model (a random initialization of the same
architecture, as `free-client finetune --random-init` does) or adapt it another
way (`free_common.meta.adaptation`: a protocol that chooses its strategy, steps
and lr on each task's support set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from free_common.data.episodes import Episode, EpisodeSampler
from free_common.data.imageset import ImageSet
from free_common.engine.release_model import load_learner
from free_common.errors import DatasetLayoutError, SplitError
from free_common.meta.adaptation import PAPER, Candidate, Protocol, SelectionConfig, score_protocols

__all__ = [
    "IMAGE_SUFFIXES",
    "LocalScore",
    "load_class_folders",
    "score_model",
    "score_release",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})


@dataclass(frozen=True)
class LocalScore:
    """How a release did on the owner's tasks, and what its protocol chose on them.

    ``chosen`` counts the tasks each setting was chosen on (`Candidate.label`);
    ``selection_scores`` is each setting's mean held-out accuracy on the support sets,
    and ``heldout`` how they were held out (both empty for the paper protocol).
    """

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int
    protocol: Protocol = "paper"
    chosen: dict[str, int] = field(default_factory=dict)
    selection_scores: dict[str, float] = field(default_factory=dict)
    heldout: str = ""


def _read(path: Path, channels: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            if converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(converted, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetLayoutError(f"cannot read image {path}: {exc}") from None


def load_class_folders(root: Path, channels: int, image_size: int) -> ImageSet:
    """Read ``root/<class>/<image>`` into an `ImageSet` of the given format.

    Raises
    ------
    DatasetLayoutError
        `root` is not a folder of class folders with images, or an image is unreadable.
    """
    if not root.is_dir():
        raise DatasetLayoutError(f"--data {root} is not a folder (expected DATA/<class>/*.png)")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[np.ndarray[Any, np.dtype[np.uint8]]] = []
    labels: list[int] = []
    names: list[str] = []
    for folder in classes:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            continue
        label = len(names)
        names.append(folder.name)
        for path in files:
            images.append(_read(path, channels, image_size))
            labels.append(label)
    if not names:
        raise DatasetLayoutError(
            f"--data {root} has no class folders with images (expected DATA/<class>/*.png)"
        )
    return ImageSet(
        np.stack(images), np.asarray(labels, dtype=np.int64), tuple(names), split=str(root)
    )


def _episode_shape(data: ImageSet, ways: int, shots: int, queries: int) -> int:
    """Return the queries per class that the data allows (at most `queries`)."""
    counts = sorted(data.class_counts().tolist(), reverse=True)
    if len(counts) < ways:
        raise SplitError(
            f"the release learns {ways}-way tasks but --data has {len(counts)} classes:"
            f" add class folders until there are at least {ways}"
        )
    fits = counts[ways - 1] - shots
    if fits < 1:
        raise SplitError(
            f"{ways}-way {shots}-shot tasks need {ways} classes with at least {shots + 1}"
            " images each in --data: add images or use fewer --shots"
        )
    return min(queries, int(fits))


def score_model(
    model: nn.Module,
    ways: int,
    data: ImageSet,
    *,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    protocol: Protocol = "paper",
    paper: Candidate = PAPER,
    selection: SelectionConfig | None = None,
    on_episode: Callable[[], None] | None = None,
) -> LocalScore:
    """Adapt `model` to `episodes` local `ways`-way tasks; return its mean query accuracy.

    `protocol` says how (`free_common.meta.adaptation`): ``paper`` fine-tunes with
    `paper`'s steps and lr, the others choose on each support set from `selection`'s
    grid (its seed is taken from `seed`). `on_episode` is called as each episode is
    drawn (progress).

    Raises
    ------
    SplitError
        The data has too few classes or images for the episodes.
    """
    fitted = _episode_shape(data, ways, shots, queries)
    sampler = EpisodeSampler(data, ways, shots, fitted, seed=seed)
    config = dataclasses.replace(selection or SelectionConfig(), seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tasks = sampler.episodes(episodes)
        if on_episode is not None:
            tasks = _reporting(tasks, on_episode)
        result = score_protocols(model, tasks, ways, (protocol,), config, paper)[protocol]
    return LocalScore(
        result.mean,
        result.ci95,
        len(result.accuracies),
        ways,
        shots,
        fitted,
        protocol,
        dict(result.chosen),
        result.selection_scores,
        result.heldout,
    )


def _reporting(episodes: Iterator[Episode], call: Callable[[], None]) -> Iterator[Episode]:
    for episode in episodes:
        call()
        yield episode


def score_release(
    weights: Path,
    architecture: dict[str, Any],
    data: ImageSet,
    *,
    shots: int,
    queries: int,
    episodes: int,
    steps: int,
    lr: float,
    seed: int,
) -> LocalScore:
    """Fine-tune the release on `episodes` local tasks and return its mean query accuracy.

    Raises
    ------
    ConfigError
        The release's architecture or weights cannot be loaded.
    SplitError
        The data has too few classes or images for the episodes.
    """
    model, spec = load_learner(weights, architecture)
    return score_model(
        model,
        spec.ways,
        data,
        shots=shots,
        queries=queries,
        episodes=episodes,
        seed=seed,
        paper=Candidate("finetune", steps, lr),
    )
