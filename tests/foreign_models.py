"""Ordinary classifiers written in plain PyTorch, the way owners write them, for intake tests.

Five small architectures people train (a ResNet-18-style net, a MobileNetV2-style net
with depthwise convolutions and ReLU6, a CNN ending in Softmax, a CNN with SiLU and
Hardswish, a two-layer ViT with LayerNorm and GELU), each small enough to export,
check and convert in about a second, and `export_foreign` to export one the way
`torch.onnx.export` does by default (fixed batch 1) or with a dynamic batch axis.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["FOREIGN_MODELS", "build_foreign", "export_foreign"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's layout (2-2-2-2 basic blocks, max-pool stem), narrow."""

    def __init__(self, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for index in range(2):
                stride = 2 if stage and not index else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))
        return out


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x) if self.residual else self.body(x)
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2's inverted residuals: 1x1 expand, depthwise 3x3, ReLU6, linear 1x1."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            _InvertedResidual(8, 8, 1, 2),
            _InvertedResidual(8, 16, 2, 4),
            _InvertedResidual(16, 16, 1, 4),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x).mean((2, 3)))
        return out


class SoftmaxCNN(nn.Module):
    """A small CNN whose forward ends in Softmax, as many tutorials write it."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(16 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.softmax(self.fc(x.view(x.size(0), -1)), dim=1)


class SiluCNN(nn.Module):
    """A CNN with SiLU and Hardswish activations (EfficientNet / MobileNetV3 style)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.SiLU(),
            nn.Conv2d(8, 16, 3, 2, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.features(x).flatten(1))
        return out


class TinyViT(nn.Module):
    """A two-layer ViT: 8x8 patches, class token, pre-norm blocks with LayerNorm and GELU."""

    def __init__(self, classes: int = 5, dim: int = 32, heads: int = 4, size: int = 32) -> None:
        super().__init__()
        patches = (size // 8) ** 2
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, P, D)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        out: torch.Tensor = self.fc(self.norm(self.encoder(tokens))[:, 0])
        return out


FOREIGN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "softmax-cnn": SoftmaxCNN,
    "silu-cnn": SiluCNN,
    "vit": TinyViT,
}
"""Name to constructor; every model takes [N, 3, 32, 32] images and has 5 classes."""


def _settle(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, and batch-norm statistics that are not the identity (as after training)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def build_foreign(name: str, seed: int = 0) -> nn.Module:
    """The seeded model called `name` in `FOREIGN_MODELS`, in eval mode."""
    torch.manual_seed(seed)
    return _settle(FOREIGN_MODELS[name](), seed)


def export_foreign(model: nn.Module, *, dynamo: bool, dynamic_batch: bool = False) -> bytes:
    """Export `model` as `torch.onnx.export` does with the given settings, to bytes.

    ``dynamo=False`` uses opset 17 (the legacy exporter's defaults otherwise);
    ``dynamo=True`` the new exporter's defaults (optimized, its own opset).
    """
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")  # the exporters' deprecation and progress notices
        path = Path(folder, "model.onnx")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes)
            assert program is not None
            program.save(path, external_data=False)
        else:
            axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(
                model,
                (x,),
                path,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=axes,
            )
        return path.read_bytes()
