"""Adaptation strategies, chosen on the support set only (`free_common.meta.adaptation`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from free_common.data.episodes import Episode
from free_common.engine import LearnerSpec, build_learner
from free_common.errors import ConfigError
from free_common.meta.adaptation import (
    PAPER,
    PROTOCOLS,
    Candidate,
    SelectionConfig,
    as_module,
    fit,
    predict,
    prototype_head,
    score_protocols,
    select,
)
from free_common.meta.config import EvalConfig
from free_common.meta.evaluate import evaluate

SIDE = 16


def _learner(ways: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_learner(LearnerSpec(arch="conv4", width=8, ways=ways, channels=1, image_size=SIDE))


def _episodes(count: int, ways: int, shots: int, queries: int, seed: int = 0) -> list[Episode]:
    """Tasks whose classes are fixed random patterns plus noise (learnable in a few steps)."""
    rng = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        patterns = torch.rand(ways, 1, SIDE, SIDE, generator=rng)

        def draw(per_class: int, patterns: torch.Tensor = patterns) -> torch.Tensor:
            images = patterns.repeat_interleave(per_class, 0)
            noise = 0.25 * torch.randn(images.shape, generator=rng)
            return (images + noise).clamp(0, 1)

        labels = torch.arange(ways)
        tasks.append(
            Episode(
                support_x=draw(shots),
                support_y=labels.repeat_interleave(shots),
                query_x=draw(queries),
                query_y=labels.repeat_interleave(queries),
                classes=tuple(range(ways)),
                class_names=(),
            )
        )
    return tasks


def test_the_prototype_head_holds_the_class_means_and_picks_the_nearest() -> None:
    features = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))  # (S, D)
    labels = torch.tensor([0, 1, 2, 3] * 3)
    weight, bias = prototype_head(features, labels, 4)
    means = torch.stack([features[labels == c].mean(0) for c in range(4)])  # (N, D)
    # W = 2 c / t and b = -|c|^2 / t, one temperature t for the whole head.
    temperature = 2 * means[0, 0] / weight[0, 0]
    torch.testing.assert_close(weight * temperature / 2, means)
    torch.testing.assert_close(bias * temperature, -(means**2).sum(1))
    gaps = torch.cdist(means, means) ** 2
    assert float(gaps.sum() / (4 * 3) / temperature) == pytest.approx(4.0)  # the margin
    probe = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    nearest = torch.cdist(probe, means).argmin(1)
    assert torch.equal((probe @ weight.T + bias).argmax(1), nearest)


def test_selection_never_reads_the_queries() -> None:
    model = _learner()
    clean = _episodes(3, ways=3, shots=2, queries=4)
    poisoned = [
        dataclasses.replace(e, query_x=torch.full_like(e.query_x, float("nan"))) for e in clean
    ]
    config = SelectionConfig(finetune_steps=(1, 3), probe_steps=(2,), folds=2)
    honest = score_protocols(model, clean, 3, PROTOCOLS, config)
    blind = score_protocols(model, poisoned, 3, PROTOCOLS, config)
    for protocol in PROTOCOLS:
        assert blind[protocol].chosen == honest[protocol].chosen
        assert blind[protocol].selection_scores == honest[protocol].selection_scores
    # The poison did reach the scoring: NaN logits, whose argmax is class 0.
    assert blind["auto"].accuracies == [pytest.approx(1 / 3)] * 3
    assert blind["auto"].accuracies != honest["auto"].accuracies


def test_k_fold_picks_the_setting_that_learns_over_one_listed_first() -> None:
    model = _learner()
    task = _episodes(1, ways=3, shots=4, queries=1, seed=3)[0]
    # lr 1e-7 is tried first, so a tie would keep it; it learns nothing in 8 steps.
    config = SelectionConfig(
        strategies=("finetune",), finetune_lrs=(1e-7, 0.5), finetune_steps=(8,)
    )
    selection = select(model, task.support_x, task.support_y, 3, config, ("finetune",))
    slow, fast = Candidate("finetune", 8, 1e-7), Candidate("finetune", 8, 0.5)
    assert selection.heldout == "3-fold"
    assert list(selection.scores) == [slow, fast]
    assert selection.scores[fast] == 1.0
    assert selection.scores[slow] < 0.7
    assert selection.best(("finetune",)) == fast


def test_one_shot_holds_out_shifted_copies_and_still_ranks() -> None:
    model = _learner()
    task = _episodes(1, ways=3, shots=1, queries=1, seed=4)[0]
    config = SelectionConfig(strategies=("finetune", "centroid"), finetune_lrs=(1e-7, 0.5))
    selection = select(model, task.support_x, task.support_y, 3, config)
    assert selection.heldout == "4 shifted views"
    assert (
        selection.scores[Candidate("finetune", 20, 0.5)]
        > selection.scores[Candidate("finetune", 20, 1e-7)]
    )


def test_the_paper_protocol_is_free_bench_runs_evaluation() -> None:
    model = _learner(seed=5)
    tasks = _episodes(4, ways=3, shots=1, queries=3, seed=6)
    ours = score_protocols(model, tasks, 3, ("paper",), SelectionConfig())["paper"]
    reference = evaluate(model, tasks, EvalConfig(ways=3, shots=1, queries=3, episodes=4), "x")
    assert ours.mean == pytest.approx(reference.mean, abs=1e-12)
    assert ours.ci95 == pytest.approx(reference.ci95, abs=1e-12)
    assert ours.chosen == {PAPER.label: 4}
    assert ours.selection_scores == {}


def test_fit_leaves_the_model_alone_and_gives_a_network_of_any_ways() -> None:
    model = _learner(ways=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = _episodes(1, ways=5, shots=2, queries=2, seed=7)[0]
    for candidate in (Candidate("centroid"), Candidate("finetune", 3, 0.1)):
        adapted = fit(model, task.support_x, task.support_y, 5, candidate, seed=1)
        assert adapted.params["head.weight"].shape == (5, model.feature_dim)
        network = as_module(model, adapted)
        assert network.head.out_features == 5
        with torch.no_grad():
            torch.testing.assert_close(
                predict(model, adapted, task.query_x), predict(network, adapted, task.query_x)
            )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="at least 1 step"):
        Candidate("finetune", 0, 0.1)
    with pytest.raises(ConfigError, match="strategies must be"):
        SelectionConfig(strategies=("magic",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-empty and positive"):
        SelectionConfig(finetune_lrs=())
