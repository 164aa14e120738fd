"""Debian package sets of the data layer, installed-package checks and licences."""

from __future__ import annotations

from pathlib import Path

import pytest

from free_common.data.debian_packages import (
    BENCHMARK_PACKAGES,
    DATASET_PACKAGES,
    PACKAGE_SETS,
    SMALL_PACKAGES,
    font_packages,
    missing_packages,
    package_licence,
    package_versions,
    require_installed,
)
from free_common.errors import FontPackageMissing


def test_package_sets_are_font_packages_plus_the_data_packages() -> None:
    assert set(PACKAGE_SETS) == {"small", "benchmark"}
    for names in (SMALL_PACKAGES, BENCHMARK_PACKAGES):
        assert len(set(names)) == len(names)
        assert set(DATASET_PACKAGES) <= set(names)
        assert all(n.startswith("fonts-") for n in font_packages(names))
    assert set(SMALL_PACKAGES) <= set(BENCHMARK_PACKAGES)
    assert "fonts-noto-core" in BENCHMARK_PACKAGES
    assert not {"fonts-recommended", "fonts-yozvox-yozfont"} & set(BENCHMARK_PACKAGES)
    assert len(font_packages(BENCHMARK_PACKAGES)) > 400


def test_installed_and_missing_packages() -> None:
    assert missing_packages(["fonts-dejavu-core", "fonts-does-not-exist"]) == (
        "fonts-does-not-exist",
    )
    assert set(package_versions(["fonts-dejavu-core", "fonts-does-not-exist"])) == {
        "fonts-dejavu-core"
    }
    require_installed(SMALL_PACKAGES, "small")  # `make install` put them there
    with pytest.raises(
        FontPackageMissing, match=r"fonts-a1, fonts-a2, .* and 2 more; run: apt-get install"
    ):
        require_installed([f"fonts-a{i}" for i in range(1, 8)], None)
    with pytest.raises(FontPackageMissing, match=r"--missing benchmark\)$"):
        require_installed([f"fonts-a{i}" for i in range(1, 8)], "benchmark")


def test_licence_comes_from_the_copyright_file(tmp_path: Path) -> None:
    assert package_licence("fonts-dejavu-core")
    (tmp_path / "machine").mkdir()
    (tmp_path / "machine" / "copyright").write_text("Files: *\nLicense: OFL-1.1\n")
    assert package_licence("machine", tmp_path) == "OFL-1.1"
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "copyright").write_text(
        "License: This font is distributed under the SIL Open Font License, version 1.1.\n"
    )
    assert package_licence("prose", tmp_path) == "OFL-1.1"
    assert package_licence("absent", tmp_path).startswith("unknown")
