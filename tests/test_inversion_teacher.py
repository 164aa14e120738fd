"""The teacher adapter: resize, grey <-> colour, channel order, normalization, gradients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from free_common.inversion.config import AugmentConfig
from free_common.inversion.teacher import AdaptedTeacher, distillation_targets, teacher_accuracy
from free_common.models.backbones import build_backbone
from free_common.types import ChannelOrder, TaskMetadata


class _Recorder(nn.Module):
    """A 'teacher' that remembers what it was fed and returns fixed logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.seen: Tensor | None = None
        self.scale = nn.Parameter(torch.ones(()))
        self.classes = classes

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x
        return self.scale * x.flatten(1)[:, : self.classes]


def _task(order: ChannelOrder, side: int, mean: float = 0.5, std: float = 0.25) -> TaskMetadata:
    channels = order.channels
    return TaskMetadata(5, (channels, side, side), order, (mean,) * channels, (std,) * channels)


def test_colour_to_grey_uses_luma_then_normalizes() -> None:
    recorder = _Recorder(5)
    teacher = AdaptedTeacher(recorder, _task(ChannelOrder.GRAY, 4), "t")
    images = torch.zeros(1, 3, 4, 4)
    images[:, 0] = 1.0  # pure red
    teacher(images)
    assert recorder.seen is not None and recorder.seen.shape == (1, 1, 4, 4)
    assert torch.allclose(recorder.seen, torch.full((1, 1, 4, 4), (0.299 - 0.5) / 0.25))


def test_grey_to_colour_repeats_and_bgr_swaps() -> None:
    recorder = _Recorder(5)
    rgb = AdaptedTeacher(recorder, _task(ChannelOrder.RGB, 4, 0.0, 1.0), "t")
    grey = torch.rand(2, 1, 4, 4)
    rgb(grey)
    assert recorder.seen is not None
    assert torch.equal(recorder.seen, grey.expand(-1, 3, -1, -1))
    bgr = AdaptedTeacher(recorder, _task(ChannelOrder.BGR, 4, 0.0, 1.0), "t")
    colour = torch.rand(2, 3, 4, 4)
    bgr(colour)
    assert torch.equal(recorder.seen, colour.flip(1))


def test_resize_to_the_teachers_input_size() -> None:
    recorder = _Recorder(5)
    teacher = AdaptedTeacher(recorder, _task(ChannelOrder.RGB, 12, 0.0, 1.0), "t")
    teacher(torch.full((2, 3, 8, 8), 0.3))
    assert recorder.seen is not None and recorder.seen.shape == (2, 3, 12, 12)
    assert torch.allclose(recorder.seen, torch.full_like(recorder.seen, 0.3))


def test_gradients_reach_the_images_but_not_the_teacher() -> None:
    model = build_backbone("mlp", 5, 1, 6, width=8)
    teacher = AdaptedTeacher(model, _task(ChannelOrder.GRAY, 6), "t")
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    teacher(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_teacher_stays_in_eval_mode() -> None:
    model = build_backbone("conv4", 5, 3, 16, width=4)
    teacher = AdaptedTeacher(model, _task(ChannelOrder.RGB, 16), "t")
    teacher.train()
    assert not any(m.training for m in model.modules())


def test_teacher_accuracy_is_share_classified_as_target() -> None:
    recorder = _Recorder(2)
    task = TaskMetadata(2, (1, 1, 2), ChannelOrder.GRAY, (0.0,), (1.0,))
    teacher = AdaptedTeacher(recorder, task, "t")
    # logits = the two pixels: argmax is the brighter one.
    images = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 1, 1, 1])
    assert teacher_accuracy(teacher, images, labels) == 0.5


def test_distillation_targets_pair_augmented_images_with_teacher_logits() -> None:
    model = build_backbone("mlp", 5, 3, 8, width=8)
    teacher = AdaptedTeacher(model, _task(ChannelOrder.RGB, 8), "t")
    images = torch.rand(6, 3, 8, 8)
    inputs, logits = distillation_targets(
        teacher, images, AugmentConfig(), torch.Generator().manual_seed(0)
    )
    assert inputs.shape == images.shape and logits.shape == (6, 5)
    assert torch.allclose(logits, teacher(inputs))
