"""Classifier backbones: the teachers' architectures and the meta-learner's.

Every backbone is an `nn.Module` with two parts, ``features`` (image to a flat
feature vector of ``feature_dim`` values) and ``head`` (an ``nn.Linear`` from
``feature_dim`` to ``num_classes`` logits), so a meta-learner can reuse the
feature extractor and swap the head. Inputs are normalized images of shape
``[N, in_channels, image_size, image_size]``.

Built only from modules the ONNX exporter writes as allow-listed operators
(Conv, BatchNormalization, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm,
Add), so every backbone passes intake after `to_onnx`.

Registered names (`BACKBONES`):

``conv4``
    4 x [Conv3x3 (width ch, pad 1), BN, ReLU, MaxPool 2], flatten, linear.
    The FREE teachers and meta-learner; width 32 as in the official code.
``resnet10`` / ``resnet18``
    CloserLook ResNet (3x3 stem, stride 1, no max-pool), basic blocks
    [1,1,1,1] or [2,2,2,2], global average pool, linear. Widths w, 2w, 4w, 8w;
    the paper uses w = 64, the default here is 16 so it trains on a CPU.
``mlp``
    flatten, [Linear, BN1d, ReLU] x 2, linear.
``conv4gn``
    Conv4 with `GroupNorm2d` (4 groups) in place of batch norm: the backbone of
    differentially private teachers. DP-SGD clips each example's gradient, which batch
    norm makes meaningless (an example's output depends on the whole batch), so Opacus
    refuses it. Group norm normalizes each example on its own and keeps no running
    statistics, so its ONNX graph gives inversion no batch-norm prior either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from free_common.errors import ConfigError

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "Conv4",
    "GroupNorm2d",
    "ResNet",
    "build_backbone",
]


class Backbone(nn.Module):
    """A classifier split into ``features`` and a linear ``head``.

    Parameters
    ----------
    features
        Maps ``[N, C, H, W]`` images to ``[N, feature_dim]``.
    feature_dim
        Width of the feature vector.
    num_classes
        Number of logits the head produces.
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]`` for images ``[N, C, H, W]``."""
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class ConvBlock(nn.Sequential):
    """Conv3x3 (padding 1) -> BatchNorm2d -> ReLU -> MaxPool 2: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)


class GroupNorm2d(nn.Module):
    """Group normalization of ``[N, C, H, W]`` written in allow-listed ONNX operators.

    `nn.GroupNorm` exports at opset 17 as InstanceNormalization, which intake does not
    take; this computes the same function from Reshape, ReduceMean, Sub, Mul, Sqrt and
    Div. Opacus has no hook for it and computes its per-example gradients with functorch.
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % groups:
            raise ConfigError(f"group norm needs channels ({channels}) divisible by {groups}")
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each example's channel groups to mean 0, variance 1, then scale and shift."""
        grouped = x.reshape(x.shape[0], self.groups, -1)  # (N, G, C/G * H * W)
        centred = grouped - grouped.mean(dim=2, keepdim=True)
        variance = (centred * centred).mean(dim=2, keepdim=True)
        normalized = (centred / torch.sqrt(variance + self.eps)).reshape(x.shape)
        return normalized * self.weight + self.bias


class GroupNormBlock(nn.Sequential):
    """Conv3x3 (padding 1) -> GroupNorm2d -> ReLU -> MaxPool 2: `ConvBlock` without batch norm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.gn = GroupNorm2d(4 if out_channels % 4 == 0 else 1, out_channels)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)


class Conv4(Backbone):
    """The Conv4 of FREE and CloserLook: four `ConvBlock` then a flattened linear head."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int,
        block: Callable[[int, int], nn.Module] = ConvBlock,
    ) -> None:
        if image_size < 16:
            raise ConfigError(
                f"conv4 needs images of at least 16x16 (four 2x poolings); got {image_size}"
            )
        side = image_size
        for _ in range(4):
            side //= 2  # MaxPool2d(2) floors odd sizes: 28 -> 14 -> 7 -> 3 -> 1
        blocks = [block(in_channels if i == 0 else width, width) for i in range(4)]
        features = nn.Sequential(*blocks, nn.Flatten())
        super().__init__(features, width * side * side, num_classes)


class BasicBlock(nn.Module):
    """Two Conv3x3+BN with a residual connection (1x1 conv + BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


class ResNet(Backbone):
    """CloserLook-style ResNet for small images: stride-1 stem, 4 stages, GAP, linear."""

    def __init__(
        self, num_classes: int, in_channels: int, width: int, blocks: tuple[int, ...]
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        # AdaptiveAvgPool2d(1) exports as GlobalAveragePool: any input size works.
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), channels, num_classes)


class MLP(Backbone):
    """Flatten, two hidden [Linear, BatchNorm1d, ReLU] layers, linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int) -> None:
        features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        super().__init__(features, width, num_classes)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it and its default width."""

    build: Callable[[int, int, int, int], Backbone]
    """``build(num_classes, in_channels, image_size, width)``."""
    default_width: int
    stem_key: str
    """State-dict key of the first weight: ``[width, in_channels, k, k]`` for convolutional
    stems, ``[width, in_channels * image_size**2]`` for the MLP."""
    summary: str


BACKBONES: dict[str, BackboneSpec] = {
    "conv4": BackboneSpec(
        Conv4, 32, "features.0.conv.weight", "4 x conv3x3-BN-ReLU-maxpool, flatten, linear"
    ),
    "resnet10": BackboneSpec(
        lambda n, c, _s, w: ResNet(n, c, w, (1, 1, 1, 1)),
        16,
        "features.0.weight",
        "ResNet-10 (CloserLook), GAP",
    ),
    "resnet18": BackboneSpec(
        lambda n, c, _s, w: ResNet(n, c, w, (2, 2, 2, 2)),
        16,
        "features.0.weight",
        "ResNet-18 (CloserLook), GAP",
    ),
    "mlp": BackboneSpec(MLP, 256, "features.1.weight", "flatten, 2 x linear-BN1d-ReLU, linear"),
    "conv4gn": BackboneSpec(
        lambda n, c, s, w: Conv4(n, c, s, w, GroupNormBlock),
        32,
        "features.0.conv.weight",
        "4 x conv3x3-GroupNorm-ReLU-maxpool, flatten, linear (DP teachers)",
    ),
}


def build_backbone(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: int | None = None,
) -> Backbone:
    """Build a registered backbone with freshly initialized weights.

    Parameters
    ----------
    name
        A key of `BACKBONES`: ``conv4``, ``resnet10``, ``resnet18``, ``mlp`` or ``conv4gn``.
    num_classes
        Number of output logits.
    in_channels
        1 for grey images, 3 for colour.
    image_size
        Side of the square input images.
    width
        Base width (conv4: channels per block; resnet: first stage; mlp: hidden
        size); the backbone's default when omitted.

    Returns
    -------
    Backbone
        Maps ``[N, in_channels, image_size, image_size]`` to ``[N, num_classes]``.

    Raises
    ------
    ConfigError
        Unknown name, or sizes the architecture cannot take.
    """
    spec = BACKBONES.get(name)
    if spec is None:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(BACKBONES)}")
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ConfigError(
            f"num_classes, in_channels and image_size must be positive; "
            f"got {num_classes}, {in_channels}, {image_size}"
        )
    chosen = spec.default_width if width is None else width
    if chosen < 1:
        raise ConfigError(f"width must be positive; got {chosen}")
    return spec.build(num_classes, in_channels, image_size, chosen)
