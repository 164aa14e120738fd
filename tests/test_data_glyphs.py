"""Glyph builder: characters, fonts, rendering, look-alikes, audit, storage, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from free_common.data.glyphs_audit import AuditSpec, find_wrong_glyph_sources
from free_common.data.glyphs_build import build_glyph_set
from free_common.data.glyphs_chars import class_label, is_class_character, script_of
from free_common.data.glyphs_config import size_config
from free_common.data.glyphs_confusables import confusable_groups, cross_split_confusables
from free_common.data.glyphs_fonts import FontSource, _excluded_word, scan_fonts
from free_common.data.glyphs_instances import ClassInstances, visit_order
from free_common.data.glyphs_lookalike import (
    Lookalike,
    LookalikeSpec,
    candidate_pairs,
    choose_removals,
    find_lookalikes,
)
from free_common.data.glyphs_render import FaceRenderer, RenderSpec, notdef_probe
from free_common.data.glyphs_store import (
    load_glyph_split,
    read_split_arrays,
    write_split_arrays,
)
from free_common.errors import ConfigError, DatasetLayoutError, SplitError

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.fixture(scope="session")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "glyphs-small"
    build_glyph_set(out, size_config("small"), workers=2)  # reused if another module built it
    return out


def test_two_builds_give_identical_bytes(small_set: Path, tmp_path: Path) -> None:
    # One worker here, two for the shared set: the output must not depend on it.
    again = build_glyph_set(tmp_path / "again", size_config("small"), workers=1, force=True)
    assert not again.reused
    names = sorted(p.name for p in small_set.iterdir())
    assert names == ["manifest.json", "meta-test.npz", "meta-train.npz", "meta-val.npz"]
    for name in names:
        assert (small_set / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_an_up_to_date_build_is_reused(small_set: Path) -> None:
    result = build_glyph_set(small_set, size_config("small"))
    assert result.reused
    assert result.manifest == json.loads((small_set / "manifest.json").read_text())


def test_load_glyph_split_gives_an_imageset(small_set: Path) -> None:
    data = load_glyph_split(small_set, "test")
    assert data.split == "meta-test"
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (32, 32)
    assert data.class_names[0].startswith("U+") and len(data) == len(data.labels)
    assert data.class_counts().min() >= size_config("small").min_instances
    with pytest.raises(SplitError):
        load_glyph_split(small_set, "holdout")
    with pytest.raises(DatasetLayoutError, match="no glyph set"):
        load_glyph_split(small_set / "nowhere", "meta-train")


@pytest.mark.parametrize(
    ("char", "script"),
    [("A", "Latin"), ("Ж", "Cyrillic"), ("λ", "Greek"), ("永", "Han"), ("7", "Digits"),
     ("٣", "Arabic"), ("가", "Hangul"), ("ᐁ", "Canadian Syllabics"), ("ა", "Georgian")],
)  # fmt: skip
def test_script_comes_from_the_unicode_name(char: str, script: str) -> None:
    assert script_of(char) == script


@pytest.mark.parametrize(
    ("char", "is_class"),
    [("A", True), ("ß", True), ("가", True), ("7", True), ("À", False), ("Ё", False),
     ("ﬁ", False), ("²", False), ("Ａ", False), ("\u212a", False), ("ʰ", False), ("ᄀ", False),
     ("が", False), ("-", False), ("\u0301", False)],
)  # fmt: skip
def test_class_characters_are_undecomposed_letters_and_digits(char: str, is_class: bool) -> None:
    assert is_class_character(char) is is_class


def test_class_label_is_unique_and_readable() -> None:
    assert class_label(0x416) == "U+0416 Ж"


@pytest.mark.parametrize(
    ("name", "word"),
    [("MaterialIcons-Regular", "icons"), ("Px IBM VGA", "px"), ("NotoSansSymbols2", "symbols"),
     ("STIXMathJax_Main", "math"), ("DejaVu Sans Condensed", None),
     ("Blankenburg", None), ("3270SemiCondensed", None)],
)  # fmt: skip
def test_font_name_filter_matches_whole_words(name: str, word: str | None) -> None:
    assert _excluded_word(name) == word


def test_scan_skips_unreadable_and_duplicate_files(tmp_path: Path) -> None:
    (tmp_path / "broken.ttf").write_bytes(b"not a font at all")
    copy = tmp_path / "copy.ttf"
    copy.write_bytes(Path(DEJAVU).read_bytes())
    result = scan_fonts(
        [FontSource("a", (DEJAVU,)), FontSource("b", (str(copy), str(tmp_path / "broken.ttf")))]
    )
    assert [(f.source, f.path) for f in result.faces] == [("a", DEJAVU)]
    assert [s.path for s in result.unreadable] == [str(tmp_path / "broken.ttf")]
    assert "same bytes" in result.excluded[0].reason
    assert result.faces[0].covers(ord("A")) and not result.faces[0].covers(0xE000)


def test_render_is_centred_and_fits_and_refuses_tofu_and_blanks() -> None:
    spec = RenderSpec()
    renderer = FaceRenderer(spec)
    face = scan_fonts([FontSource("d", (DEJAVU,))]).faces[0]
    probe = notdef_probe(face.covers)
    image = renderer.render(DEJAVU, 0, ord("W"), probe)
    assert image is not None and image.shape == (32, 32)
    rows, cols = np.nonzero(image)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 in (spec.fit_px, spec.fit_px + 1)
    assert abs((rows.min() + rows.max()) / 2 - 15.5) <= 1
    assert abs((cols.min() + cols.max()) / 2 - 15.5) <= 1
    assert renderer.render(DEJAVU, 0, probe, probe) is None  # tofu
    assert renderer.render(DEJAVU, 0, ord(" "), probe) is None  # nothing drawn
    assert np.array_equal(image, FaceRenderer(spec).render(DEJAVU, 0, ord("W"), probe))


def test_visit_order_is_seeded_per_character() -> None:
    faces = list(range(30))
    assert visit_order(65, faces, 0) == visit_order(65, faces[::-1], 0)
    assert visit_order(65, faces, 0) != visit_order(66, faces, 0)
    assert visit_order(65, faces, 0) != visit_order(65, faces, 1)
    assert sorted(visit_order(65, faces, 0)) == faces


def test_lookalikes_by_mean_or_by_same_glyph_in_shared_faces() -> None:
    spec = LookalikeSpec(mean_px=50, candidate_px=100, same_face_px=40)
    base = np.zeros(1024, np.float32)
    near, mid, far = base.copy(), base.copy(), base.copy()
    near[:30] = 1.0  # 30 px from base: look-alike by class mean
    mid[900:970] = 1.0  # 70 px from base: a candidate, decided face by face
    far[300:600] = 1.0  # 300 px from everything: not even a candidate
    candidates = candidate_pairs(np.stack([base, near, mid, far]), spec)
    pairs = sorted(zip(candidates.first.tolist(), candidates.second.tolist(), strict=True))
    assert pairs == [(0, 1), (0, 2)]
    codepoints = [1, 2, 3, 4]
    listing = {cp: np.arange(6, dtype=np.int64) for cp in codepoints}

    def mask(face: int, cp: int) -> np.ndarray:
        out = np.zeros(1024, bool)
        if cp == 3 and face < 4:  # faces 0-3 draw 3 unlike 1; faces 4-5 draw them alike
            out[:100] = True
        return out

    found = find_lookalikes(codepoints, candidates, listing, mask, spec)
    assert [(p.first, p.second) for p in found] == [(1, 2), (1, 3)]
    assert found[0].reason(spec) == "class means 30.0 px apart"
    assert found[1].reason(spec) == "same glyph in 2 of 6 shared faces"
    stricter = LookalikeSpec(mean_px=50, candidate_px=100, same_face_share=0.5)
    found = find_lookalikes(codepoints, candidates, listing, mask, stricter)
    assert [(p.first, p.second) for p in found] == [(1, 2)]


def test_removal_keeps_meta_train_then_meta_test_then_lower_codepoints() -> None:
    def pair(a: int, b: int) -> Lookalike:
        return Lookalike(a, b, 10.0, 0, 0)

    split_of = {1: "meta-val", 2: "meta-train", 3: "meta-test", 4: "meta-train", 5: "meta-val"}
    removed = choose_removals([pair(1, 2), pair(1, 3), pair(2, 4), pair(3, 5)], split_of)
    assert sorted(removed) == [1, 4, 5]


def test_unicode_confusables_link_latin_greek_cyrillic() -> None:
    groups = confusable_groups()
    assert groups[ord("K")] == groups[ord("К")] == groups[ord("Κ")]
    assert groups[ord("A")] != groups[ord("B")]
    split_of = {
        ord("K"): "meta-train",
        ord("К"): "meta-test",
        ord("Κ"): "meta-val",
        ord("Ж"): "meta-test",
    }
    pairs = cross_split_confusables(sorted(split_of), split_of, groups)
    removed = choose_removals(pairs, split_of)
    assert sorted(removed) == sorted([ord("К"), ord("Κ")])
    assert all(p.reason(LookalikeSpec()) == "Unicode confusables" for p in pairs)


def _instances(codepoint: int, images: np.ndarray, faces: list[int]) -> ClassInstances:
    return ClassInstances(codepoint, np.asarray(faces, np.int32), images, 0, 0, ())


def test_audit_drops_a_package_that_draws_other_characters() -> None:
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2, (4, 32, 32)).astype(np.uint8) * 255
    # Faces 0-59 come from three honest packages, faces 60-79 from one that draws the
    # next class's pattern at each codepoint.
    sources = ["good-a"] * 20 + ["good-b"] * 20 + ["good-c"] * 20 + ["wrong"] * 20
    classes = []
    for c in range(4):
        drawn = [patterns[c]] * 60 + [patterns[(c + 1) % 4]] * 20
        classes.append(_instances(0x41 + c, np.stack(drawn), list(range(80))))
    found = find_wrong_glyph_sources(classes, sources, AuditSpec(min_evidence=20))
    assert [(w.source, w.script) for w in found] == [("wrong", "Latin")]
    assert found[0].recognised == 0.0 and found[0].instances == 80
    assert find_wrong_glyph_sources(classes, sources, AuditSpec(min_evidence=81)) == []


def test_split_files_are_deterministic_and_pickle_free(tmp_path: Path) -> None:
    arrays = {
        "images": np.arange(2 * 32 * 32, dtype=np.uint8).reshape(2, 32, 32),
        "labels": np.array([0, 1], np.int64),
        "faces": np.array([3, 4], np.int32),
        "codepoints": np.array([65, 66], np.int64),
    }
    write_split_arrays(tmp_path / "a.npz", arrays)
    write_split_arrays(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = read_split_arrays(tmp_path / "a.npz")
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    (tmp_path / "c.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:100])
    with pytest.raises(DatasetLayoutError, match="damaged"):
        read_split_arrays(tmp_path / "c.npz")


def test_config_refuses_inconsistent_instance_bounds() -> None:
    with pytest.raises(ConfigError):
        size_config("small").__class__(
            size="x", packages=(), min_instances=20, max_instances=10, max_classes_per_script=None
        )
    with pytest.raises(ConfigError, match="unknown glyph set size"):
        size_config("huge")
