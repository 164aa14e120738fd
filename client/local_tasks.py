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
and scores the queries (`free_common.meta.evaluate`). `load_learner` and
`score_model` are its two halves, for callers that score another model (a
random initialization of the same architecture, as `free-client finetune
--random-init` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from free_common.data.episodes import Episode, EpisodeSampler
from free_common.data.imageset import ImageSet
from free_common.engine import LearnerSpec, build_learner
from free_common.errors import ConfigError, DatasetLayoutError, SplitError
from free_common.meta.baselines import random_init
from free_common.meta.config import EvalConfig
from free_common.meta.evaluate import EvalResult, evaluate
from free_common.meta.norms import rescale_weights, scale_free_weights

__all__ = [
    "IMAGE_SUFFIXES",
    "LocalScore",
    "load_class_folders",
    "load_learner",
    "score_model",
    "score_release",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})


@dataclass(frozen=True)
class LocalScore:
    """How a release did on the owner's tasks."""

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int


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


def load_learner(
    weights: Path | None, architecture: dict[str, Any], *, seed: int = 0, init_scale: float = 1.0
) -> tuple[nn.Module, LearnerSpec]:
    """Rebuild a release's meta-learner from its manifest's architecture.

    Parameters
    ----------
    weights
        The release's ``meta.safetensors``; None draws a random initialization of
        the same architecture from `seed` (the baseline a release should beat).
    architecture
        ``config["architecture"]`` of the release manifest.
    seed
        Seeds the random initialization (only read when `weights` is None).
    init_scale
        Scale of the random initialization's scale-free weights: the release's own start
        (its ``init_scale`` metric), so the baseline differs from it in training only.

    Raises
    ------
    ConfigError
        The architecture or the weights cannot be loaded.
    """
    where = "the release" if weights is None else f"the release in {weights.parent}"
    try:
        spec = LearnerSpec(**architecture)
        model = random_init(lambda: build_learner(spec), seed)
        if weights is not None:
            model.load_state_dict(load_file(str(weights)))
        else:
            rescale_weights(model, scale_free_weights(model), init_scale)
    except (TypeError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"{where} cannot be loaded: {exc}") from None
    return model, spec


def score_model(
    model: nn.Module,
    ways: int,
    data: ImageSet,
    *,
    shots: int,
    queries: int,
    episodes: int,
    steps: int,
    lr: float,
    seed: int,
    on_episode: Callable[[], None] | None = None,
) -> LocalScore:
    """Fine-tune `model` on `episodes` local `ways`-way tasks; return its mean query accuracy.

    `on_episode` is called as each episode is drawn (progress).

    Raises
    ------
    SplitError
        The data has too few classes or images for the episodes.
    """
    fitted = _episode_shape(data, ways, shots, queries)
    sampler = EpisodeSampler(data, ways, shots, fitted, seed=seed)
    config = EvalConfig(
        ways=ways, shots=shots, queries=fitted, episodes=episodes, steps=steps, lr=lr
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tasks = sampler.episodes(episodes)
        if on_episode is not None:
            tasks = _reporting(tasks, on_episode)
        result: EvalResult = evaluate(model, tasks, config, "local")
    return LocalScore(result.mean, result.ci95, result.episodes, ways, shots, fitted)


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
        steps=steps,
        lr=lr,
        seed=seed,
    )
