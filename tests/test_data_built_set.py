"""Properties of a built glyph set: the set named by FREE_GLYPH_DATA, else the small set.

Run on the benchmark set with:
    FREE_GLYPH_DATA=data-cache/benchmark .venv/bin/python -m pytest -q tests/test_data_built_set.py
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from free_common.data.glyphs_build import build_glyph_set
from free_common.data.glyphs_chars import script_of
from free_common.data.glyphs_config import size_config
from free_common.data.glyphs_lookalike import mean_distances
from free_common.data.glyphs_store import file_sha256, read_manifest, read_split_arrays
from free_common.data.imageset import SPLITS

# Groups of cross-script confusables (Unicode's confusables.txt): members of a group
# present in the set must all sit in one split.
CONFUSABLE_GROUPS = (
    "AΑА", "BΒВ", "CСϹ", "EΕЕ", "HΗН", "IΙІӀ", "JЈ", "KΚК", "MΜМ", "NΝ", "OΟОՕ", "PΡР",
    "SЅ", "TΤТ", "XΧХ", "YΥҮ", "ZΖ", "aа", "cсϲ", "eе", "iі", "jјϳ", "oοоօ", "pрρ",
    "sѕ", "xх", "yу", "hһհ", "uս", "gց", "nո", "ɛεԑ", "ʒӡ", "θѳ", "ΦФ", "ΓГ", "ΠП",
)  # fmt: skip


@pytest.fixture(scope="session")
def glyph_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("FREE_GLYPH_DATA")
    if given:
        return Path(given)
    out = tmp_path_factory.getbasetemp() / "glyphs-small"
    build_glyph_set(out, size_config("small"), workers=2)  # reused if another module built it
    return out


@pytest.fixture(scope="session")
def manifest(glyph_dir: Path) -> dict[str, Any]:
    return read_manifest(glyph_dir)


@pytest.fixture(scope="session")
def arrays(glyph_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {split: read_split_arrays(glyph_dir / f"{split}.npz") for split in SPLITS}


def _classes(split_arrays: dict[str, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    images, labels = split_arrays["images"], split_arrays["labels"]
    for label, codepoint in enumerate(split_arrays["codepoints"].tolist()):
        yield codepoint, images[labels == label]


def test_manifest_schema_matches_the_arrays(
    glyph_dir: Path, manifest: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> None:
    assert set(manifest["splits"]) == set(SPLITS)
    assert isinstance(manifest["builder_version"], int)
    for key in ("near_duplicate_px", "min_instances", "lookalike", "render", "audit"):
        assert key in manifest["thresholds"]
    for split in SPLITS:
        info, data = manifest["splits"][split], arrays[split]
        assert info["classes"] == len(data["codepoints"]) == len(manifest["classes"][split])
        assert info["images"] == len(data["images"])
        assert info["min_instances"] == manifest["thresholds"]["min_instances"]
        assert info["sha256"] == file_sha256(glyph_dir / info["file"])
        assert sum(info["scripts"].values()) == info["classes"]
        per_class = np.bincount(data["labels"], minlength=info["classes"])
        assert [c["instances"] for c in manifest["classes"][split]] == per_class.tolist()
        assert data["images"].shape[1:] == (32, 32)
        assert data["faces"].max(initial=0) < len(manifest["fonts"])
    used = {font["package"] for font in manifest["fonts"]}
    licences = {p["name"]: p["licence"] for p in manifest["packages"]}
    assert used <= set(licences)
    assert all(licences[name] for name in used)


def test_every_class_has_enough_instances(
    manifest: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> None:
    low = manifest["thresholds"]["min_instances"]
    high = manifest["thresholds"]["max_instances"]
    for split in SPLITS:
        counts = np.bincount(arrays[split]["labels"], minlength=len(arrays[split]["codepoints"]))
        assert counts.min(initial=low) >= low
        assert high is None or counts.max(initial=0) <= high
    assert manifest["splits"]["meta-train"]["classes"] > 0
    assert manifest["splits"]["meta-test"]["classes"] > 0


def test_instances_of_a_class_are_not_near_duplicates(
    manifest: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> None:
    threshold = manifest["thresholds"]["near_duplicate_px"]
    ink = manifest["thresholds"]["render"]["ink_threshold"]
    for split in SPLITS:
        for codepoint, images in _classes(arrays[split]):
            masks = (images >= ink).reshape(len(images), -1).astype(np.int32)
            ones = masks.sum(axis=1)
            hamming = ones[:, None] + ones[None, :] - 2 * masks @ masks.T
            np.fill_diagonal(hamming, threshold)
            assert hamming.min() >= threshold, f"near-duplicate instances in U+{codepoint:04X}"


def test_no_two_classes_are_lookalikes_by_class_mean(
    manifest: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> None:
    threshold = manifest["thresholds"]["lookalike"]["mean_px"]
    names, means, splits = [], [], []
    for split in SPLITS:
        for codepoint, images in _classes(arrays[split]):
            names.append(codepoint)
            means.append(images.reshape(len(images), -1).mean(axis=0) / 255.0)
            splits.append(split)
    distances = mean_distances(np.asarray(means, np.float32), np.asarray(means, np.float32))
    np.fill_diagonal(distances, np.inf)
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    assert distances[i, j] >= threshold, (
        f"U+{names[i]:04X} ({splits[i]}) and U+{names[j]:04X} ({splits[j]}) are "
        f"{distances[i, j]:.1f} px apart"
    )


def test_known_confusables_never_straddle_splits(
    arrays: dict[str, dict[str, np.ndarray]],
) -> None:
    split_of = {cp: split for split in SPLITS for cp in arrays[split]["codepoints"].tolist()}
    for group in CONFUSABLE_GROUPS:
        where = {split_of[ord(ch)] for ch in group if ord(ch) in split_of}
        assert len(where) <= 1, f"{group} spread over {sorted(where)}"


def test_splits_are_disjoint_by_script(
    manifest: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> None:
    scripts = {
        split: {script_of(chr(cp)) for cp in arrays[split]["codepoints"].tolist()}
        for split in SPLITS
    }
    for a in SPLITS:
        assert scripts[a] == set(manifest["splits"][a]["scripts"])
        for b in SPLITS:
            if a < b:
                assert not scripts[a] & scripts[b]


def test_classes_are_undecomposed_letters_or_digits(
    arrays: dict[str, dict[str, np.ndarray]],
) -> None:
    for split in SPLITS:
        codepoints = arrays[split]["codepoints"].tolist()
        assert codepoints == sorted(set(codepoints))
        for cp in codepoints:
            char = chr(cp)
            assert unicodedata.category(char) in {"Lu", "Ll", "Lt", "Lo", "Nd"}
            if not unicodedata.name(char).startswith("HANGUL SYLLABLE"):
                assert unicodedata.normalize("NFKD", char) == char
