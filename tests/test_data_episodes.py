"""Episode sampler: seeded, one split only, shapes, label remap, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from free_common.data.episodes import EpisodeSampler, sample_episode, to_tensor
from free_common.data.imageset import ImageSet, canonical_split
from free_common.errors import SplitError


def _numbered_set(classes: int = 8, per_class: int = 6, rgb: bool = False) -> ImageSet:
    """Image i is filled with value i (as uint8), so an episode's images can be traced."""
    count = classes * per_class
    values = np.arange(count, dtype=np.uint8)
    shape = (count, 4, 5, 3) if rgb else (count, 4, 5)
    images = np.broadcast_to(values.reshape(-1, *([1] * (len(shape) - 1))), shape).copy()
    labels = np.arange(classes, dtype=np.int64).repeat(per_class)
    names = tuple(f"c{c}" for c in range(classes))
    return ImageSet(images, labels, names, "meta-train")


def _ids(batch: torch.Tensor) -> list[int]:
    return [round(float(v) * 255) for v in batch[:, 0, 0, 0]]


def test_episode_shapes_labels_and_remap() -> None:
    data = _numbered_set()
    episode = EpisodeSampler(data, ways=5, shots=2, queries=3, seed=1).episode(0)
    assert episode.support_x.shape == (10, 1, 4, 5) and episode.support_x.dtype == torch.float32
    assert episode.query_x.shape == (15, 1, 4, 5)
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert episode.query_y.tolist() == [j for j in range(5) for _ in range(3)]
    assert episode.ways == 5 and len(set(episode.classes)) == 5
    assert episode.class_names == tuple(f"c{c}" for c in episode.classes)
    support, query = _ids(episode.support_x), _ids(episode.query_x)
    assert not set(support) & set(query) and len(set(support + query)) == 25
    # Every image sits under the episode label of its own class.
    for ids, labels in ((support, episode.support_y), (query, episode.query_y)):
        for image_id, label in zip(ids, labels.tolist(), strict=True):
            assert data.labels[image_id] == episode.classes[label]


def test_episodes_are_reproducible_by_seed_and_index() -> None:
    data = _numbered_set()
    a = EpisodeSampler(data, 3, 1, 2, seed=7)
    b = EpisodeSampler(data, 3, 1, 2, seed=7)
    assert torch.equal(a.episode(4).query_x, b.episode(4).query_x)
    assert a.episode(4).classes == b.episode(4).classes
    assert [e.classes for e in a.episodes(3, start=2)] == [b.episode(i).classes for i in (2, 3, 4)]
    seen = {a.episode(i).classes for i in range(20)}
    assert len(seen) > 5
    other = EpisodeSampler(data, 3, 1, 2, seed=8)
    assert [other.episode(i).classes for i in range(5)] != [a.episode(i).classes for i in range(5)]
    assert sample_episode(data, 3, 1, 2, seed=7).classes == a.episode(0).classes


def test_classes_come_from_the_given_split_only_and_small_classes_are_skipped() -> None:
    data = _numbered_set(classes=6, per_class=4)
    # Make class 5 too small for 2 shots + 2 queries: drop two of its images.
    keep = np.ones(len(data), bool)
    keep[-2:] = False
    small = ImageSet(data.images[keep], data.labels[keep], data.class_names, "meta-test")
    sampler = EpisodeSampler(small, ways=5, shots=2, queries=2, seed=0)
    for index in range(20):
        assert set(sampler.episode(index).classes) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    ("ways", "shots", "queries", "match"),
    [
        (9, 1, 1, "only 8 of 8"),
        (5, 4, 3, "only 0 of 8"),
        (0, 1, 1, "ways >= 1"),
        (2, 0, 1, "shots"),
    ],
)
def test_sampler_refuses_impossible_episodes(
    ways: int, shots: int, queries: int, match: str
) -> None:
    with pytest.raises(SplitError, match=match):
        EpisodeSampler(_numbered_set(), ways, shots, queries)


def test_rgb_images_become_three_channels() -> None:
    episode = sample_episode(_numbered_set(rgb=True), 2, 1, 1)
    assert episode.support_x.shape == (2, 3, 4, 5)
    assert to_tensor(np.full((1, 2, 2), 255, np.uint8)).tolist() == [[[[1.0, 1.0], [1.0, 1.0]]]]


def test_imageset_checks_its_arrays() -> None:
    images = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, np.zeros(2, np.int32), ("a",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0\.\.0"):
        ImageSet(images, np.array([0, 1]), ("a",))
    with pytest.raises(ValueError, match="unique"):
        ImageSet(images, np.array([0, 1]), ("a", "a"))
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images.astype(np.float32), np.array([0, 0]), ("a",))  # type: ignore[arg-type]
    assert canonical_split("val") == "meta-val"
    with pytest.raises(SplitError):
        canonical_split("dev")
