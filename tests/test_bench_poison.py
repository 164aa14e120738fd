"""The poisoned-pool benchmark's bad models are what they claim to be."""

from __future__ import annotations

from pathlib import Path

import torch

from free_common.bench.poison import (
    KINDS,
    _constant,
    _permuted,
    _random,
    _stamp,
    poisoned_picks,
    write_report,
)
from free_common.models.backbones import build_backbone
from free_common.types import ChannelOrder, TaskMetadata

TASK = TaskMetadata(5, (1, 16, 16), ChannelOrder.GRAY, (0.5,), (0.5,), tuple("abcde"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("conv4", 5, 1, 16).eval()


def test_a_constant_model_answers_one_class_whatever_it_sees() -> None:
    answers = _constant(_model(), TASK, 2)(torch.randn(16, 1, 16, 16)).argmax(1)
    assert (answers == 2).all()


def test_a_permuted_model_gives_each_image_a_rolled_class() -> None:
    images = torch.randn(16, 1, 16, 16)
    honest = _model()(images)
    assert torch.allclose(_permuted(_model(), TASK, 0)(images), honest.roll(1, 1), atol=1e-6)


def test_a_random_model_shares_nothing_with_the_one_it_replaces() -> None:
    model = _model()
    fresh = _random(model, TASK, 3)
    assert fresh is not model and not torch.equal(fresh.head.weight, model.head.weight)


def test_the_trigger_is_a_white_corner_and_the_rest_is_kept() -> None:
    images = torch.rand(2, 1, 16, 16)
    stamped = _stamp(images)
    assert (stamped[..., -4:, -4:] == 1).all()
    assert torch.equal(stamped[..., :-4, :], images[..., :-4, :])


def test_the_report_counts_what_was_stopped(tmp_path: Path) -> None:
    figures = dict.fromkeys(
        ("recovery_agreement", "pool_agreement", "structure", "trigger_gap", "neutral_spread"), 0.5
    )
    rows = [{"name": "m", "kind": "random", "verdict": "held", "figures": figures, "seconds": 1.0}]
    summary = {"random": {"accepted": 0, "held": 1, "refused": 0}}
    result = {
        "request": {"round_steps": "24", "pool": "24"},
        "summary": summary,
        "seconds_per_model": 1.0,
        "environment": {"torch": "2", "threads": 1, "cpus": 2, "load_average": [1.0, 2.0]},
        "models": rows,
    }
    write_report(result, tmp_path / "r.md", "free-bench poison ...")
    text = (tmp_path / "r.md").read_text()
    assert "| random | 1 | 0 | 1 | 0 | 1/1 |" in text and "free-bench poison ..." in text


def test_the_poisoned_pool_takes_bad_models_of_every_kind_in_turn() -> None:
    rows = [{"name": f"{kind}-{i}", "kind": kind} for kind in KINDS for i in range(3)]
    rows.append({"name": "teacher-024", "kind": "honest"})
    picked = poisoned_picks(rows, 7)
    assert picked == [f"{kind}-0" for kind in KINDS] + ["random-1", "permuted-1"]


def test_the_report_compares_each_pool_with_the_clean_one(tmp_path: Path) -> None:
    def figure(mean: float, diff: float) -> dict[str, object]:
        return {"mean": mean, "ci95": 0.01, "minus_clean": {"mean": diff, "ci95": 0.005}}

    releases = {
        "steps": 84,
        "episodes": 600,
        "bad_models": ["random-0"],
        "let_through": [],
        "pools": {
            "clean": {"teachers": 24, "bad": 0, "selected_step": 0},
            "poisoned, no screening": {"teachers": 25, "bad": 1, "selected_step": 13},
        },
        "summary": {
            "clean": {"release": figure(0.8, 0.0), "last_state": figure(0.78, 0.0)},
            "poisoned, no screening": {
                "release": figure(0.79, -0.01),
                "last_state": figure(0.7, -0.08),
            },
        },
    }
    result = {
        "request": {"round_steps": "24", "pool": "24"},
        "summary": {},
        "seconds_per_model": 1.0,
        "environment": {"torch": "2", "threads": 1, "cpus": 2, "load_average": [1.0, 2.0]},
        "models": [],
        "releases": releases,
    }
    write_report(result, tmp_path / "r.md", "free-bench poison --releases")
    text = (tmp_path / "r.md").read_text()
    assert "| poisoned, no screening | 25 (1) | 13 | 79.00 ± 1.00 | -1.00 ± 0.50 |" in text
    assert "70.00 ± 1.00 | -8.00 ± 0.50 |" in text and "screening: none" in text
