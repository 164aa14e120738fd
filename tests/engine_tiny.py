"""Tiny teachers, configs and meta-val episodes for the engine tests (seconds, not minutes)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from free_common.engine import EngineConfig, EngineTeacher, LearnerSpec
from free_common.inversion.config import AugmentConfig, FiveConfig, GeneratorConfig, ScratchConfig
from free_common.memory.config import MemoryConfig
from free_common.memory.episode import Episode
from free_common.meta.config import BellConfig, EvalConfig, MamlConfig, ReplayConfig
from free_common.types import ChannelOrder, TaskMetadata

SIDE = 16
WAYS = 5


def teacher(seed: int, classes: int = WAYS, names: tuple[str, ...] = ()) -> EngineTeacher:
    """A template-matching linear classifier on 16x16 grey images, with informative gradients."""
    rng = torch.Generator().manual_seed(seed)
    dim = SIDE * SIDE
    linear = nn.Linear(dim, classes)
    with torch.no_grad():
        linear.weight.copy_((torch.rand(classes, dim, generator=rng) * 2 - 1) * 4 / dim**0.5)
        linear.bias.zero_()
    task = TaskMetadata(classes, (1, SIDE, SIDE), ChannelOrder.GRAY, (0.5,), (0.5,), names)
    return EngineTeacher(f"teacher-{seed}", nn.Sequential(nn.Flatten(), linear), task)


def teachers(count: int = 3) -> list[EngineTeacher]:
    """`count` tiny 5-class teachers."""
    return [teacher(seed) for seed in range(count)]


def config(**changes: object) -> EngineConfig:
    """A round of 6 steps (2 warm-up) that takes about a second."""
    images = 2
    base = EngineConfig(
        preset="test",
        learner=LearnerSpec(arch="mlp", width=16, ways=WAYS, channels=1, image_size=SIDE),
        generator=GeneratorConfig(latent_dim=8, width=4, image_size=SIDE, channels=1),
        five=FiveConfig(images_per_class=images, augment=AugmentConfig(crop_padding=1)),
        scratch=ScratchConfig(steps=4, images_per_class=images),
        bell=BellConfig(
            maml=MamlConfig(ways=WAYS, shots=1, queries=1, inner_steps=1),
            replay=ReplayConfig(episode_batch=1, patience=1, max_batches=2),
        ),
        memory=MemoryConfig(capacity_per_class=6),
        steps=6,
        warmup_steps=2,
        teachers_per_step=2,
        min_teachers=2,
        validation=EvalConfig(ways=WAYS, shots=1, queries=2, episodes=3, steps=2),
        validate_every=2,
        checkpoint_every=1,
        seed=7,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def validation_episodes(count: int = 3, seed: int = 99) -> list[Episode]:
    """Meta-val stand-ins: each class a fixed random image, instances that image plus noise."""
    rng = torch.Generator().manual_seed(seed)
    templates = torch.rand(8, 1, SIDE, SIDE, generator=rng)
    episodes = []
    for _ in range(count):
        chosen = torch.randperm(len(templates), generator=rng)[:WAYS]

        def draw(per_class: int, chosen: torch.Tensor = chosen) -> torch.Tensor:
            base = templates[chosen].repeat_interleave(per_class, 0)
            return (base + 0.2 * torch.randn(base.shape, generator=rng)).clamp(0, 1)

        labels = torch.arange(WAYS)
        episodes.append(
            Episode(
                draw(1),
                labels,
                draw(2),
                labels.repeat_interleave(2),
                tuple(str(int(c)) for c in chosen),
            )
        )
    return episodes


def pinned_config(**changes: object) -> EngineConfig:
    """`config` choosing the learner's scale between 1 and 0.3 and pinning its norms."""
    base = config(**{"init_scales": (1.0, 0.3), **changes})
    return dataclasses.replace(base, bell=dataclasses.replace(base.bell, pin_norms=True))
