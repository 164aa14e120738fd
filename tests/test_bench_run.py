"""`free-bench run`: pictures, report and episode plumbing in seconds; the whole smoke
benchmark end to end (data, zoo, run) as subprocesses in one slow test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from free_common.bench.cli import app
from free_common.bench.figures import line_chart, recovery_sheet
from free_common.bench.measure import EpisodeSet
from free_common.bench.report import render_markdown
from free_common.bench.run import METHODS, load_zoo
from free_common.data import EpisodeSampler, ImageSet
from free_common.errors import ConfigError

FREE_BENCH = Path(sys.executable).with_name("free-bench")


def test_run_is_a_free_bench_command() -> None:
    assert "run" in [command.name for command in app.registered_commands]


def test_line_chart_draws_every_series_in_its_colour() -> None:
    chart = line_chart("t", {"free": [(5, 0.5), (10, 0.6)], "free-no-iga": [(5, 0.4), (10, 0.55)]})
    colours = {colour for _, colour in chart.getcolors(maxcolors=100_000)}  # type: ignore[union-attr]
    assert chart.size == (720, 420)
    assert (31, 119, 180) in colours and (214, 39, 40) in colours


def test_recovery_sheet_puts_each_class_in_a_row_and_each_group_in_a_block() -> None:
    white = [torch.ones(2, 1, 8, 8) for _ in range(3)]
    black = [torch.zeros(1, 3, 8, 8) for _ in range(3)]
    sheet = recovery_sheet("teacher", ("a", "b", "c"), {"recovered": white, "real": black}, scale=2)
    # 3 rows of 16 px tiles below the header; 2 + 1 tiles of 16 px across the blocks.
    assert sheet.height == 34 + 3 * 18 + 4
    pixels = np.asarray(sheet)
    assert (pixels[34 : 34 + 16, 110 : 110 + 16] == 255).all()  # first white tile


def test_episode_set_fits_episodes_to_the_learner_and_repeats_them() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    data = ImageSet(images, np.repeat(np.arange(6), 10).astype(np.int64), tuple("abcdef"))
    episodes = EpisodeSet(EpisodeSampler(data, 5, 1, 3, seed=4), 7, channels=3, side=32)
    assert len(episodes) == 7
    first = episodes[2]
    assert first.support_x.shape == (5, 3, 32, 32) and first.query_x.shape == (15, 3, 32, 32)
    assert float(first.support_x.min()) >= 0 and float(first.support_x.max()) <= 1
    assert torch.equal(first.query_x, episodes[2].query_x)
    with pytest.raises(IndexError):
        episodes[7]


def test_an_empty_zoo_folder_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="free-bench zoo"):
        load_zoo(tmp_path)


@pytest.mark.slow
def test_workers_run_the_command_on_ranks_of_torchs_launcher(tmp_path: Path) -> None:
    # Nothing to run on: each of the 2 ranks stops at the same error, and the launch fails.
    (tmp_path / "zoo").mkdir()
    args = ["run", "--preset", "smoke", "--data", tmp_path / "data", "--zoo", tmp_path / "zoo"]
    done = subprocess.run(
        [str(FREE_BENCH), *map(str, args), "--out", str(tmp_path / "out"), "--workers", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.count("data folder") == 2 and "free_common.bench.cli FAILED" in done.stderr
    assert not (tmp_path / "out").exists()


def _results() -> dict[str, Any]:
    rows = [
        {
            "method": m,
            "ways": 5,
            "shots": s,
            "episodes": 60,
            "split": "meta-test",
            "mean": v,
            "ci95": 0.02,
        }
        for m, v in zip(METHODS, (0.80, 0.79, 0.70, 0.72, 0.60, 0.65), strict=True)
        for s in (1, 5)
    ]
    recovery = {
        "free_seconds_per_teacher": 0.5,
        "scratch_seconds_per_teacher": 20.0,
        "speedup": 40.0,
        "free_teacher_accuracy": 0.9,
        "free_teacher_accuracy_adv": 0.7,
        "scratch_teacher_accuracy": 1.0,
        "free_seconds_per_teacher_ce": 0.4,
        "free_teacher_accuracy_in_run": 0.8,
        "free_seconds_per_teacher_in_run": 0.6,
        "teachers": 4,
        "images_per_teacher": 50,
        "free_steps": 5,
        "scratch_steps": 200,
    }
    return {
        "preset": "cpu",
        "device": "cpu",
        "command": "free-bench run --preset cpu",
        "recovery": recovery,
        "accuracy": rows,
        "cross_domain": {"dataset": "fashion-mnist", "skipped": "not installed"},
        "methods": list(METHODS),
        "skipped_methods": {},
        "averaged_teachers": 3,
        "init_scale": {"free": 0.3},
        "init_scale_scores": {"1": 0.6, "0.3": 0.65},
        "curves": {"free": [[0, 0.65], [4, 0.8], [8, 0.78]]},
        "selected_steps": {"free": 4, "scratch": 0},
        "timings": {"free round": 1.0, "total_seconds": 60.0},
        "teachers": {"count": 4, "loaded": 4, "used": 4, "skipped": []},
        "data": {"dir": "d", "classes": {"meta-train": 9, "meta-val": 6, "meta-test": 6}},
        "zoo": "z",
        "environment": {"torch": "2", "threads": 2},
        "figures": {"meta-val curves": "figures/meta-val-curves.png"},
    }


def test_the_report_shows_every_method_the_speed_and_the_targets() -> None:
    text = render_markdown(_results())
    assert "| FREE (FIVE + BELL with iGA) | 80.00 ± 2.00 | 80.00 ± 2.00 |" in text
    assert "| random initialization | 65.00 ± 2.00 | 65.00 ± 2.00 |" in text
    assert "**40.0x**" in text and "free-bench run --preset cpu" in text
    assert "1-shot, FREE above random initialization: met (+15.00 points, needs > 2.00)" in text
    assert "FREE above weight averaging: met (+20.00 points" in text
    # 0.80 vs 0.79 with intervals of 2 points: level, not above.
    assert (
        "level with FREE without iGA: met (+1.00 points, within -2.00); above it: NOT met" in text
    )
    assert "last point within 1.5 points of its best: NOT met (2.00 below)" in text
    assert "| distillation on FIVE's images, no meta-learning | 72.00 ± 2.00 |" in text
    assert "started from x0.3" in text and "used the 3 teachers" in text
    assert "identical to the random initialization row: scratch inversion + BELL" in text
    assert "Not run: not installed" in text
    assert "![meta-val curves](figures/meta-val-curves.png)" in text


def test_a_run_without_scratch_says_the_speed_was_not_measured() -> None:
    results = _results()
    results["recovery"].update(
        scratch_seconds_per_teacher=None, speedup=None, scratch_teacher_accuracy=None
    )
    results["skipped_methods"] = {"scratch": "not run (--skip)"}
    text = render_markdown(results)
    assert "| scratch: not run (--skip scratch) | – | – |" in text
    assert "at least 30x faster than scratch inversion: not measured" in text
    assert "- scratch: not run (--skip)" in text


def _cli(*args: str | Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        [str(FREE_BENCH), *map(str, args)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_smoke_benchmark_end_to_end(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    data, zoo, out = base / "glyphs-small", base / "bench-zoo", base / "bench-smoke"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    _cli("data", "build", "--size", "small", "--out", data, env=env)  # reused when built
    _cli("zoo", "--data", data, "--models", "4", "--epochs", "10", "--out", zoo, env=env)
    started = time.perf_counter()
    run = ["run", "--preset", "smoke", "--data", data, "--zoo", zoo, "--out", out]
    # Two rounds in one process, the rest and the report in another that takes them over.
    _cli(*run, "--device", "cpu", "--rounds", "free,scratch", env=env)
    assert not (out / "results.json").exists()
    assert (out / "work" / "scratch" / "init.safetensors").exists()
    _cli(*run, "--device", "cpu", "--reuse-rounds", env=env)
    seconds = time.perf_counter() - started

    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "smoke" and results["device"] == "cpu"
    assert results["command"].startswith("free-bench run --preset smoke")
    assert "--reuse-rounds" in results["command"]
    timings = results["timings"]
    assert {"free round (earlier process)", "scratch round (earlier process)"} <= set(timings)
    assert {"free-no-iga round", "distill round"} <= set(timings)
    recovery = results["recovery"]
    for key in (
        "free_seconds_per_teacher",
        "scratch_seconds_per_teacher",
        "speedup",
        "free_teacher_accuracy",
        "free_teacher_accuracy_adv",
        "scratch_teacher_accuracy",
    ):
        assert isinstance(recovery[key], float) and math.isfinite(recovery[key]), key
    assert recovery["speedup"] > 1
    assert all(
        0 <= recovery[k] <= 1
        for k in ("free_teacher_accuracy", "free_teacher_accuracy_adv", "scratch_teacher_accuracy")
    )
    rows = results["accuracy"]
    assert {(r["method"], r["shots"]) for r in rows} == {(m, s) for m in METHODS for s in (1, 5)}
    for row in rows:
        assert row["ways"] == 5 and row["split"] == "meta-test" and row["episodes"] > 0
        assert 0.2 <= row["mean"] <= 1 and 0 <= row["ci95"] < 0.2, row
    free = [r for r in rows if r["method"] == "free"]
    assert all(r["mean"] - r["ci95"] > 0.2 for r in free)  # FREE above chance
    assert results["cross_domain"]["accuracy"], results["cross_domain"]
    assert set(results["curves"]) == {"free", "free-no-iga", "scratch", "distill"}
    assert all(results["curves"][m][0][0] == 0 for m in results["curves"])  # step 0 scored
    assert set(results["init_scale"].values()) == {results["init_scale"]["free"]}
    report = (out / "results.md").read_text()
    assert "| method | 1-shot | 5-shot |" in report and results["command"] in report
    for path in results["figures"].values():
        with Image.open(out / path) as picture:
            assert picture.width > 100 and picture.height > 100
    assert (out / "work" / "free" / "init.safetensors").exists()
    print(f"smoke benchmark: {seconds:.0f} s; {json.dumps(recovery)}")


def test_tensorboard_option_writes_each_methods_events_apart(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from free_common.bench.run_cmd import _TensorBoard
    from free_common.engine import Evaluated, RoundFinished, StepFinished

    board = _TensorBoard(tmp_path / "tb")
    for method, score in (("free", 0.6), ("free-no-iga", 0.5)):
        board(method, "a message, not an event")
        board(method, StepFinished(1, 1, 2, "meta", ("a",), 0.3, 0.8, 0.2, 1.0, 1.2, 1, 0.5))
        board(method, Evaluated(1, 1, "meta-val", score, 0.02, 10, True))
        board(method, RoundFinished(1, 2, 1, "meta-val", 3.0))
    board.close()
    for method, score in (("free", 0.6), ("free-no-iga", 0.5)):
        read = EventAccumulator(str(tmp_path / "tb" / method))
        read.Reload()
        assert [e.value for e in read.Scalars("meta_val/accuracy")] == [pytest.approx(score)]
        assert [e.step for e in read.Scalars("train/distill_loss")] == [1]
    result = subprocess.run(
        [sys.executable, "-m", "free_common.bench.cli", "run", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    )
    assert "--tensorboard" in result.stdout
