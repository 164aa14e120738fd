"""MAML on memory tasks: second-order gradients, replay lowers query loss, the patience rule."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from free_common.memory.episode import Episode
from free_common.meta.config import MamlConfig, ReplayConfig
from free_common.meta.functional import batch_stat_mode
from free_common.meta.maml import maml_loss
from free_common.meta.replay import replay
from free_common.models.backbones import build_backbone

SIDE = 8


class _Templates:
    """Easy tasks: each class is a fixed random image, each instance that image plus noise."""

    def __init__(self, classes: int, seed: int, noise: float = 0.25) -> None:
        self.rng = torch.Generator().manual_seed(seed)
        self.templates = torch.rand(classes, 1, SIDE, SIDE, generator=self.rng)
        self.noise = noise

    def task(self, ways: int = 5, shots: int = 1, queries: int = 5) -> Episode:
        chosen = torch.randperm(len(self.templates), generator=self.rng)[:ways]

        def draw(per_class: int) -> tuple[Tensor, Tensor]:
            base = self.templates[chosen].repeat_interleave(per_class, 0)
            noise = self.noise * torch.randn(base.shape, generator=self.rng)
            return (base + noise).clamp(0, 1), torch.arange(ways).repeat_interleave(per_class)

        (sx, sy), (qx, qy) = draw(shots), draw(queries)
        return Episode(sx, sy, qx, qy, tuple(str(int(c)) for c in chosen))


def _learner(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone("mlp", 5, 1, SIDE, width=16).to(dtype)


def test_maml_gradient_is_second_order() -> None:
    """The meta-gradient matches finite differences of the adapted query loss (float64)."""
    model = _learner(dtype=torch.float64)
    task = _Templates(10, seed=1).task()
    task = Episode(
        task.support_x.double(), task.support_y, task.query_x.double(), task.query_y, task.classes
    )
    config = MamlConfig(inner_steps=2, inner_lr=0.5)
    params = list(model.parameters())
    with batch_stat_mode(model):
        loss, _ = maml_loss(model, task, config)
        grads = torch.autograd.grad(loss, params)
        direction = [torch.randn_like(p) for p in params]
        slope = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))

        def shifted(eps: float) -> float:
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.add_(eps * d)
            value = float(maml_loss(model, task, config)[0].detach())
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.sub_(eps * d)
            return value

        eps = 1e-5
        numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
        first_order, _ = maml_loss(model, task, MamlConfig(2, inner_lr=0.5, first_order=True))
        fo_grads = torch.autograd.grad(first_order, params)
        fo_slope = sum((g * d).sum() for g, d in zip(fo_grads, direction, strict=True))
    assert abs(float(slope) - numeric) < 1e-6 * max(1.0, abs(numeric))
    assert abs(float(fo_slope) - numeric) > 1e-4  # first order is only an approximation


def test_replay_lowers_the_query_loss_on_easy_tasks() -> None:
    source = _Templates(20, seed=2)
    held_out = [source.task() for _ in range(8)]
    model = _learner()
    config = MamlConfig(ways=5, shots=1, queries=5, inner_steps=3, inner_lr=0.1)

    def mean_query_loss() -> float:
        with batch_stat_mode(model):
            losses = [float(maml_loss(model, t, config)[0].detach()) for t in held_out]
        return sum(losses) / len(losses)

    before = mean_query_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    stats = replay(
        model, optimizer, source.task, config, ReplayConfig(4, patience=3, max_batches=12)
    )
    assert stats.steps >= 4 and stats.tasks == 4 * stats.steps
    assert mean_query_loss() < before - 0.2


def test_patience_rule_stops_after_patience_batches_without_progress() -> None:
    task = _Templates(5, seed=3).task()
    model = _learner()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # accuracy can never improve
    config = MamlConfig(inner_steps=1)
    stats = replay(model, frozen, lambda: task, config, ReplayConfig(episode_batch=2, patience=3))
    assert stats.steps == 4 and stats.tasks == 8  # the first batch sets the best, then 3 stale
    capped = replay(model, frozen, lambda: task, config, ReplayConfig(2, patience=3, max_batches=2))
    assert capped.steps == 2


def test_replay_is_deterministic_given_seeds() -> None:
    def run() -> list[Tensor]:
        model, source = _learner(seed=4), _Templates(10, seed=5)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        replay(model, optimizer, source.task, MamlConfig(inner_steps=1), ReplayConfig(2, 2, 3))
        return [p.detach() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run(), strict=True))
