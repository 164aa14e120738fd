"""`free-bench data` through the real CLI: bad input ends in one line and an exit code."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from free_common.bench.cli import main
from free_common.data import debian_packages
from free_common.data.glyphs_build import build_glyph_set
from free_common.data.glyphs_config import size_config

DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")


@pytest.fixture(scope="session")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "glyphs-small"
    build_glyph_set(out, size_config("small"), workers=2)  # reused if another module built it
    return out


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run `free-bench data ARGS` as its console script does (through run_app)."""
    monkeypatch.setattr(sys, "argv", ["free-bench", "data", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    captured = capsys.readouterr()
    code = stopped.value.code
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_font_package(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(
        ["build", "--package", "fonts-does-not-exist", "--out", str(tmp_path / "g")],
        capsys,
        monkeypatch,
    )
    assert code == 3
    line = _one_line(err)
    assert "not installed: fonts-does-not-exist" in line and "apt-get install" in line


def test_unreadable_fonts_only(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "fonts").mkdir()
    (tmp_path / "fonts" / "broken.ttf").write_bytes(b"\x00\x01\x00\x00garbage")
    code, _, err = run_cli(
        ["build", "--font-dir", str(tmp_path / "fonts"), "--out", str(tmp_path / "g")],
        capsys,
        monkeypatch,
    )
    assert code == 3
    assert "no usable font face" in _one_line(err) and "1 file(s) unreadable" in err


def test_unreadable_font_among_good_ones_is_skipped_with_a_warning(tmp_path: Path) -> None:
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf"):
        shutil.copy(DEJAVU_DIR / name, fonts / name)
    (fonts / "broken.otf").write_bytes(b"OTTO and nothing else")
    config = dataclasses.replace(size_config("small"), min_instances=2, max_instances=3)
    result = build_glyph_set(tmp_path / "g", config, font_dir=fonts, workers=1)
    assert result.warnings[0].startswith("skipped 1 unreadable font file")
    assert result.manifest["skipped_fonts"]["unreadable"][0]["path"].endswith("broken.otf")
    assert result.manifest["splits"]["meta-train"]["classes"] > 50


def test_wrong_dataset_layout(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "stray" / "photos").mkdir(parents=True)
    code, _, err = run_cli(
        ["show", str(tmp_path / "stray"), "--out", str(tmp_path / "x.png")], capsys, monkeypatch
    )
    assert code == 3 and "matches no known data layout" in _one_line(err)
    code, _, err = run_cli(
        [
            "show",
            str(tmp_path / "stray"),
            "--kind",
            "mini-imagenet",
            "--out",
            str(tmp_path / "x.png"),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 3 and "has no train.csv (expected ROOT/images/*.jpg" in _one_line(err)


def test_corrupt_idx_file(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header + bytes(100)))
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10))
        )
    code, _, err = run_cli(["fashion-mnist", "--root", str(tmp_path)], capsys, monkeypatch)
    assert code == 3
    assert "is truncated: shape (10, 28, 28) needs 7840 payload bytes, found 100" in _one_line(err)


def test_conflicting_options_and_impossible_episodes(
    small_set: Path,
    tmp_path: Path,
    capsys,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    code, _, err = run_cli(
        [
            "build",
            "--package",
            "fonts-dejavu-core",
            "--font-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "g"),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "not both" in _one_line(err)
    code, _, err = run_cli(
        ["show", str(small_set), "--ways", "5", "--shots", "25", "--out", str(tmp_path / "x.png")],
        capsys,
        monkeypatch,
    )
    assert code == 3 and "use fewer ways, shots or queries" in _one_line(err)


def test_build_reuses_and_show_draws_an_episode(
    small_set: Path, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(
        ["build", "--size", "small", "--out", str(small_set)], capsys, monkeypatch
    )
    assert code == 0 and "up to date" in out and "meta-test" in out
    picture = tmp_path / "pics" / "episode.png"
    args = [
        "show",
        str(small_set),
        "--split",
        "meta-test",
        "--ways",
        "4",
        "--shots",
        "2",
        "--queries",
        "3",
    ]
    code, out, _ = run_cli([*args, "--out", str(picture), "--scale", "2"], capsys, monkeypatch)
    assert code == 0 and "4-way 2-shot episode of meta-test" in out
    with Image.open(picture) as image:
        assert image.size == (150 + 5 * 72 + 4, 22 + 4 * 72)


def test_console_script_prints_one_line_and_exit_code(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("free-bench")
    result = subprocess.run(
        [
            str(script),
            "data",
            "build",
            "--package",
            "fonts-does-not-exist",
            "--out",
            str(tmp_path / "g"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3
    assert _one_line(result.stderr).startswith("error: Debian packages not installed")


def test_missing_packages_are_listed_for_the_makefile(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(
        debian_packages.PACKAGE_SETS,
        "small",
        ("fonts-dejavu-core", "fonts-zz-absent", "fonts-aa-absent"),
    )
    assert debian_packages.main(["--missing", "small"]) == 0
    assert capsys.readouterr().out == "fonts-aa-absent fonts-zz-absent\n"
    monkeypatch.setitem(debian_packages.PACKAGE_SETS, "small", ("fonts-dejavu-core",))
    assert debian_packages.main(["--missing", "small"]) == 0
    assert capsys.readouterr().out == ""
    # Several sets at once, as `make install` asks with the development tools.
    monkeypatch.setattr(debian_packages, "BROWSER_PACKAGES", ("zz-browser-absent",))
    assert debian_packages.main(["--missing", "small", "browser"]) == 0
    assert capsys.readouterr().out == "zz-browser-absent\n"
