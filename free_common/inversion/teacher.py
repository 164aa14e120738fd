"""A teacher behind a fixed differentiable adapter, so every teacher reads the generator's images.

The generator draws images in the meta-learner's format (C_s channels, S x S, [0, 1]).
Teachers come from many owners and expect their own input: another size, grey or
colour, RGB or BGR, their own normalization (`TaskMetadata`). The adapter maps one to
the other with differentiable operations only, so inversion gradients reach the
generator through it.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from free_common.inversion.augment import augment
from free_common.inversion.config import AugmentConfig
from free_common.types import ChannelOrder, TaskMetadata

__all__ = ["AdaptedTeacher", "distillation_targets", "teacher_accuracy", "teacher_labels"]

_T = TypeVar("_T", bound="AdaptedTeacher")

# ITU-R BT.601 luma, the weights of PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


class AdaptedTeacher(nn.Module):
    """A frozen classifier that takes images in the meta-learner's format.

    Parameters
    ----------
    model
        The teacher: (B, C_t, H_t, W_t) normalized images -> (B, K) logits. It is put
        in eval mode (its batch norms use their running statistics) and frozen.
    task
        What the teacher expects: input shape, channel order, normalization, classes.
    teacher_id
        Stable name of the teacher (a submission id); pseudo-classes are keyed by it.
    """

    mean: Tensor  # (1, C_t, 1, 1) buffers, moved with the module
    std: Tensor

    def __init__(self, model: nn.Module, task: TaskMetadata, teacher_id: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.task = task
        self.teacher_id = teacher_id
        shape = (1, len(task.mean), 1, 1)
        self.register_buffer("mean", torch.tensor(task.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(task.std).view(shape), persistent=False)

    @property
    def num_classes(self) -> int:
        """Number of the teacher's classes (K)."""
        return self.task.num_classes

    def train(self: _T, mode: bool = True) -> _T:
        """Keep the teacher in eval mode whatever the caller asks: it is never trained."""
        del mode
        super().train(False)
        return self

    def adapt(self, images: Tensor) -> Tensor:
        """(B, C_s, S, S) in [0, 1] -> (B, C_t, H_t, W_t), normalized as the teacher expects."""
        _, height, width = self.task.input_shape
        out = images
        if out.shape[-2:] != (height, width):
            # Antialiasing keeps a downscale from aliasing; it is differentiable too.
            out = F.interpolate(
                out, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
        out = _convert_channels(out, self.task.channel_order)
        mean = self.mean.to(out.dtype)  # (1, C_t, 1, 1)
        std = self.std.to(out.dtype)
        return (out - mean) / std

    def forward(self, images: Tensor) -> Tensor:
        """(B, C_s, S, S) in [0, 1] -> (B, K) teacher logits."""
        logits: Tensor = self.model(self.adapt(images))
        return logits


def _convert_channels(images: Tensor, order: ChannelOrder) -> Tensor:
    source = images.shape[1]
    if order is ChannelOrder.GRAY:
        if source == 1:
            return images
        weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)  # (B, 1, H, W)
    rgb = images.expand(-1, 3, -1, -1) if source == 1 else images  # (B, 3, H, W)
    return rgb.flip(1) if order is ChannelOrder.BGR else rgb


@torch.no_grad()
def teacher_labels(teacher: nn.Module, images: Tensor) -> Tensor:
    """(B,) the class the teacher gives each of `images` ((B, C_s, S, S) in [0, 1]).

    Recovered images are stored in memory under these labels, not under the class they
    were generated for: where the two differ (about one image in eight after FIVE's
    five steps), the target is a label the teacher itself does not give.
    """
    with torch.no_grad():
        labels: Tensor = teacher(images).argmax(dim=1)
    return labels


def teacher_accuracy(teacher: AdaptedTeacher, images: Tensor, labels: Tensor) -> float:
    """Share of `images` the teacher classifies as the label they were generated for.

    Parameters
    ----------
    teacher
        The adapted teacher.
    images
        (B, C_s, S, S) recovered images in [0, 1], not augmented.
    labels
        (B,) the target class of each image.
    """
    predicted = teacher(images).argmax(dim=1)  # (B,)
    return float((predicted == labels).float().mean())


@torch.no_grad()
def distillation_targets(
    teacher: AdaptedTeacher, images: Tensor, config: AugmentConfig, rng: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Augment recovered images once and read the teacher's logits on them.

    The official BELL step distils on augmented images (the same crop and flip for
    student and teacher); this gives both halves of that pair.

    Returns
    -------
    tuple of Tensor
        (B, C_s, S, S) augmented images for the student, and (B, K) teacher logits.
    """
    inputs = augment(images, config, rng)
    return inputs, teacher(inputs)
