"""Evaluation: the interval formula, batch statistics in batch norm, selection on meta-val."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from free_common.errors import EngineError
from free_common.memory.episode import Episode
from free_common.meta.config import EvalConfig
from free_common.meta.evaluate import EvalResult, confidence_interval, evaluate
from free_common.meta.functional import as_student, batch_stat_mode
from free_common.meta.selection import ValidationSelector
from free_common.models.backbones import build_backbone

SIDE = 8


def _episodes(seed: int, shots: int = 5, queries: int = 15) -> Iterator[Episode]:
    """Endless easy 5-way tasks: class = a fixed random image, instance = it plus noise."""
    rng = torch.Generator().manual_seed(seed)
    templates = torch.rand(20, 1, SIDE, SIDE, generator=rng)
    while True:
        chosen = torch.randperm(20, generator=rng)[:5]

        def draw(n: int, chosen: torch.Tensor = chosen) -> torch.Tensor:
            base = templates[chosen].repeat_interleave(n, 0)
            return (base + 0.2 * torch.randn(base.shape, generator=rng)).clamp(0, 1)

        labels = torch.arange(5)
        yield Episode(
            draw(shots),
            labels.repeat_interleave(shots),
            draw(queries),
            labels.repeat_interleave(queries),
            tuple(str(int(c)) for c in chosen),
        )


def _learner() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("mlp", 5, 1, SIDE, width=32)


def test_confidence_interval_is_1_96_population_std_over_root_n() -> None:
    accuracies = [0.2, 0.6, 0.6, 1.0, 0.8]
    mean, ci95 = confidence_interval(accuracies)
    assert mean == pytest.approx(np.mean(accuracies))
    assert ci95 == pytest.approx(1.96 * np.std(accuracies) / math.sqrt(5))
    assert confidence_interval([0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(EngineError):
        confidence_interval([])


def test_evaluate_scores_configured_episodes_and_leaves_the_model_alone() -> None:
    model = _learner()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = EvalConfig(shots=5, episodes=12, steps=10, lr=0.1)
    result = evaluate(model, _episodes(1), config, "meta-val")
    assert result.episodes == 12 and result.split == "meta-val"
    assert result.mean > 0.8  # easy tasks; chance is 0.2
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = evaluate(model, _episodes(1), config, "meta-val")
    assert again == result  # deterministic


def test_more_fine_tuning_steps_help_a_random_init() -> None:
    model, episodes = _learner(), list(itertools.islice(_episodes(2), 10))
    untuned = EvalConfig(shots=5, episodes=10, steps=1, lr=1e-9)
    none = evaluate(model, episodes, untuned, "meta-val")
    tuned = evaluate(model, episodes, EvalConfig(shots=5, episodes=10, lr=0.1), "meta-val")
    assert tuned.mean > none.mean + 0.2


def test_batch_norm_runs_on_batch_statistics() -> None:
    model, episodes = _learner(), list(itertools.islice(_episodes(3), 6))
    config = EvalConfig(shots=5, episodes=6, lr=0.1)
    clean = evaluate(model, episodes, config, "meta-val")
    for module in model.modules():  # absurd running statistics: unused if batch stats are
        if isinstance(module, nn.BatchNorm1d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.fill_(1e3)
            module.running_var.fill_(1e-6)
    assert evaluate(model, episodes, config, "meta-val") == clean


def test_episodes_of_another_shape_are_refused() -> None:
    with pytest.raises(EngineError, match="5-way 1-shot"):
        evaluate(_learner(), _episodes(5, shots=5), EvalConfig(shots=1, episodes=2), "meta-val")


def test_batch_stat_mode_trains_only_batch_norm_and_restores_modes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.eval()
    with batch_stat_mode(model):
        assert [m.training for m in model] == [False, True, False]
    assert not any(m.training for m in model.modules())


def test_student_view_does_not_touch_running_statistics() -> None:
    model = _learner()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    logits = as_student(model)(torch.rand(10, 1, SIDE, SIDE))
    assert logits.shape == (10, 5) and not logits.requires_grad
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())


def test_uint8_episodes_read_as_unit_range() -> None:
    model = _learner()
    episode = next(_episodes(4))
    as_bytes = Episode(
        (episode.support_x * 255).round().to(torch.uint8),
        episode.support_y,
        (episode.query_x * 255).round().to(torch.uint8),
        episode.query_y,
        episode.classes,
    )
    rounded = Episode(
        as_bytes.support_x / 255.0,
        episode.support_y,
        as_bytes.query_x / 255.0,
        episode.query_y,
        episode.classes,
    )
    config = EvalConfig(shots=5, episodes=1)
    assert evaluate(model, [as_bytes], config, "x") == evaluate(model, [rounded], config, "x")


def test_selection_keeps_the_best_meta_val_state_and_refuses_meta_test() -> None:
    model, selector = _learner(), ValidationSelector()
    assert selector.offer(EvalResult("meta-val", 0.5, 0.01, 10), model, step=1)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not selector.offer(EvalResult("meta-val", 0.4, 0.01, 10), model, step=2)
    assert selector.best_step == 1 and selector.state is not None
    assert all(torch.equal(kept[k], v) for k, v in selector.state.items())
    with pytest.raises(EngineError, match="meta-val results only"):
        selector.offer(EvalResult("meta-test", 0.9, 0.01, 10), model, step=3)
