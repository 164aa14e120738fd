"""Data: the glyph benchmark, Fashion-MNIST, standard few-shot folders, episodes.

Public API (stable; other layers use only these names)::

    ImageSet(images, labels, class_names, split="")
        images uint8 (N, H, W) grey or (N, H, W, 3) RGB; labels int64 (N,) in
        0..len(class_names)-1. One split of one source: never a mix.
    SPLITS = ("meta-train", "meta-val", "meta-test");  canonical_split("test") -> "meta-test"

    load_split(source, split, *, kind=None, image_size=None) -> ImageSet
        source: a glyph set folder (free-bench data build), "fashion-mnist", or a
        CIFAR-FS / miniImageNet / CUB folder in its usual layout (see `sources`).

    EpisodeSampler(data, ways, shots, queries, seed=0).episode(i) -> Episode
    sample_episode(data, ways, shots, queries, seed=0) -> Episode
        Episode.support_x (ways*shots, C, H, W) float32 in [0, 1], support_y int64
        (0..ways-1, class by class), query_x, query_y; .classes (ImageSet labels),
        .class_names. Episode i depends only on (seed, i). SplitError when fewer
        than `ways` classes have shots+queries images.
    to_tensor(images uint8) -> float (N, C, H, W) in [0, 1]

    build_glyph_set(out, size_config("small"|"benchmark"), *, font_dir=None,
                    force=False, workers=None, progress=None) -> GlyphBuild
    load_glyph_split(folder, split) -> ImageSet         class names "U+0416 Ж"
    load_fashion_mnist(split="test", root=...) -> ImageSet   splits train/test/all
    load_cifar_fs(root, split, image_size=32), load_mini_imagenet(root, split, 84),
    load_cub(root, split, 84) -> ImageSet
    read_idx(path, *, ndim=None, dtype=None, hint="") -> ndarray   (strict IDX reader)

Errors (all `free_common.errors.DataError`): FontPackageMissing, FontUnreadable,
DatasetLayoutError, IdxFormatError, SplitError.

The glyph set (``free-bench data build``) is stored as ``DIR/manifest.json`` plus
``DIR/{meta-train,meta-val,meta-test}.npz`` (plain arrays, no pickle); see
`glyphs_store` for the arrays and `glyphs_build` for how it is made.
"""

from free_common.data.cifar_fs import load_cifar_fs
from free_common.data.cub import load_cub
from free_common.data.episodes import Episode, EpisodeSampler, sample_episode, to_tensor
from free_common.data.fashion_mnist import load_fashion_mnist
from free_common.data.glyphs_build import GlyphBuild, build_glyph_set
from free_common.data.glyphs_config import GlyphBuildConfig, size_config
from free_common.data.glyphs_store import load_glyph_split
from free_common.data.idx import read_idx
from free_common.data.imageset import SPLITS, ImageSet, canonical_split
from free_common.data.mini_imagenet import load_mini_imagenet
from free_common.data.sources import load_split

__all__ = [
    "SPLITS",
    "Episode",
    "EpisodeSampler",
    "GlyphBuild",
    "GlyphBuildConfig",
    "ImageSet",
    "build_glyph_set",
    "canonical_split",
    "load_cifar_fs",
    "load_cub",
    "load_fashion_mnist",
    "load_glyph_split",
    "load_mini_imagenet",
    "load_split",
    "read_idx",
    "sample_episode",
    "size_config",
    "to_tensor",
]
