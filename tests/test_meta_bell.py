"""One FREE step end to end on tiny parts: FIVE -> memory -> BELL, with and without iGA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from free_common.inversion.config import FiveConfig, GeneratorConfig
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher, distillation_targets
from free_common.memory.bank import MemoryBank
from free_common.meta.bell import bell_update, outer_optimizer
from free_common.meta.config import BellConfig, MamlConfig, ReplayConfig
from free_common.meta.functional import as_student
from free_common.meta.iga import KdBatch
from free_common.models.backbones import build_backbone
from free_common.types import ChannelOrder, TaskMetadata

CPU = torch.device("cpu")
SIDE = 16


def _teacher(seed: int, device: torch.device) -> AdaptedTeacher:
    torch.manual_seed(seed)
    # Grey 12 x 12 teachers fed by a colour 16 x 16 generator: the adapter does the rest.
    task = TaskMetadata(5, (1, 12, 12), ChannelOrder.GRAY, (0.5,), (0.5,))
    model = build_backbone("mlp", 5, 1, 12, width=16)
    return AdaptedTeacher(model, task, f"t{seed}").to(device)


def _round(use_iga: bool, device: torch.device = CPU) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(0)
    learner = build_backbone("conv4", 5, 3, SIDE, width=4).to(device)
    config = BellConfig(
        use_iga=use_iga,
        maml=MamlConfig(shots=1, queries=2, inner_steps=1),
        replay=ReplayConfig(episode_batch=2, patience=1, max_batches=2),
    )
    optimizer = outer_optimizer(learner, config)
    generator = build_generator(GeneratorConfig(latent_dim=8, width=4, image_size=SIDE), 0, device)
    meta = MetaGenerator(generator, FiveConfig(images_per_class=3))
    bank = MemoryBank((3, SIDE, SIDE))
    rng = torch.Generator().manual_seed(0)
    teachers = [_teacher(seed, device) for seed in range(3)]
    recoveries = meta.step(teachers, rng, student=as_student(learner))
    batches = []
    for teacher, recovery in zip(teachers, recoveries, strict=True):
        bank.add(recovery.teacher_id, recovery.images, recovery.labels)
        inputs, logits = distillation_targets(teacher, recovery.images, meta.config.augment, rng)
        batches.append(KdBatch(inputs, logits))
    stats = bell_update(
        learner, optimizer, batches, lambda: bank.sample_task(5, 1, 2, rng, device), config
    )
    assert len(stats.distill.losses) == 3
    assert stats.replay is not None and stats.replay.steps == 2
    return [p.detach().cpu().clone() for p in learner.parameters()], len(bank.classes)


def test_one_step_runs_end_to_end_and_is_deterministic() -> None:
    first, classes = _round(use_iga=True)
    second, _ = _round(use_iga=True)
    assert classes == 15  # 3 teachers x 5 classes, each its own pseudo-class
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_without_iga_the_update_differs() -> None:
    with_iga, _ = _round(use_iga=True)
    without, _ = _round(use_iga=False)
    assert any(not torch.equal(a, b) for a, b in zip(with_iga, without, strict=True))


@pytest.mark.gpu
def test_the_same_code_runs_on_cuda() -> None:
    on_gpu, classes = _round(use_iga=True, device=torch.device("cuda"))
    on_cpu, _ = _round(use_iga=True)
    assert classes == 15
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.shape == cpu.shape and torch.isfinite(gpu).all()


def test_replay_can_be_skipped() -> None:
    learner = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    batch = KdBatch(torch.rand(4, 3, 4, 4), torch.randn(4, 5))
    config = BellConfig()
    stats = bell_update(learner, outer_optimizer(learner, config), [batch], None, config)
    assert stats.replay is None and len(stats.distill.losses) == 1
