"""Every backbone round-trips: torch, ONNX with BN kept, intake, torch: same outputs, gradients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from free_common.errors import ConfigError
from free_common.models.backbones import BACKBONES, Backbone, build_backbone
from free_common.models.convert import OnnxModule, convert
from free_common.models.export import INPUT_NAME, to_onnx
from free_common.models.intake import run_intake
from free_common.models.metadata import read_metadata
from free_common.models.onnx_static import check_static
from free_common.types import ChannelOrder, TaskMetadata

ATOL = 1e-4
"""Stated tolerance: converted logits and input gradients within 1e-4 of the original."""

# (arch, channels, image size); every registered architecture appears at least once.
VARIANTS = [("conv4", 1, 28), ("conv4", 3, 32), ("resnet10", 3, 32), ("resnet18", 1, 16),
            ("mlp", 1, 28), ("conv4gn", 1, 28)]  # fmt: skip


@dataclass(frozen=True)
class Exported:
    original: Backbone
    task: TaskMetadata
    data: bytes
    converted: OnnxModule


def _trained_like(arch: str, channels: int, size: int, seed: int) -> Backbone:
    """A backbone whose BN layers have non-trivial running statistics (and, for some, affine)."""
    torch.manual_seed(seed)
    model = build_backbone(arch, 5, channels, size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, channels, size, size) * 2 + 0.5)
        if seed % 2:  # leave fresh BN affine on the others: the exporter then shares tensors
            for bn in (
                m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            ):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
    return model.eval()


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}x{v[2]}")
def exported(request: pytest.FixtureRequest) -> Exported:
    arch, channels, size = request.param
    model = _trained_like(arch, channels, size, seed=VARIANTS.index(request.param))
    order = ChannelOrder.GRAY if channels == 1 else ChannelOrder.RGB
    task = TaskMetadata(5, (channels, size, size), order, (0.5,) * channels, (0.25,) * channels)
    data = to_onnx(model, task)
    return Exported(model, task, data, convert(check_static(data).model))


def test_registry_is_covered() -> None:
    assert {v[0] for v in VARIANTS} == set(BACKBONES)


def test_export_keeps_batch_norm_and_metadata(exported: Exported) -> None:
    report = check_static(exported.data)
    original_bns = [
        m for m in exported.original.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    assert report.task == exported.task == read_metadata(report.model)
    assert report.input_dims == ("batch", *exported.task.input_shape)
    if not original_bns:  # the group-norm backbone of DP teachers: intake says what it lacks
        assert "BatchNormalization" not in report.op_counts
        assert len(report.warnings) == 1 and "batch" in report.warnings[0].lower()
        return
    assert report.op_counts.get("BatchNormalization", 0) == len(original_bns)
    assert report.warnings == ()
    converted_bns = exported.converted.batch_norms
    assert len(converted_bns) == len(original_bns)
    for ours, theirs in zip(converted_bns, original_bns, strict=True):
        assert type(ours) is type(theirs)
        assert ours.running_mean is not None and theirs.running_mean is not None
        assert torch.equal(ours.running_mean, theirs.running_mean)
        assert torch.equal(ours.running_var, theirs.running_var)  # type: ignore[arg-type]


def _inputs(task: TaskMetadata, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *task.input_shape, generator=generator)
    labels = torch.randint(0, task.num_classes, (batch,), generator=generator)
    return x, labels


def test_converted_outputs_match_torch_and_onnxruntime(exported: Exported) -> None:
    x, _ = _inputs(exported.task)
    with torch.no_grad():
        want = exported.original(x)
        got = exported.converted(x)
    assert torch.allclose(got, want, atol=ATOL, rtol=0)
    session = ort.InferenceSession(exported.data, providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(None, {INPUT_NAME: x.numpy()})
    np.testing.assert_allclose(got.numpy(), ort_logits, atol=ATOL, rtol=0)


def test_input_gradient_matches_the_original(exported: Exported) -> None:
    x, labels = _inputs(exported.task)
    grads = []
    for module in (exported.original, exported.converted):
        image = x.clone().requires_grad_(True)
        F.cross_entropy(module(image), labels).backward()
        assert image.grad is not None
        grads.append(image.grad)
    scale = grads[0].abs().max().item()
    assert scale > 0
    assert (grads[1] - grads[0]).abs().max().item() <= ATOL * max(scale, 1.0)


def test_full_intake_accepts_the_export(exported: Exported) -> None:
    result = run_intake(exported.data)
    assert result.accepted, result.reason
    assert result.summary is not None
    assert result.summary.max_abs_diff <= ATOL
    assert result.summary.num_batch_norms == len(exported.converted.batch_norms)


def test_export_leaves_the_model_as_it_was() -> None:
    model = _trained_like("conv4", 1, 28, seed=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_onnx(model, TaskMetadata(5, (1, 28, 28), ChannelOrder.GRAY, (0.5,), (0.5,)))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (TaskMetadata(4, (1, 28, 28), ChannelOrder.GRAY, (0.5,), (0.5,)), "declares 4 classes"),
        (TaskMetadata(5, (3, 28, 28), ChannelOrder.RGB, (0.5,) * 3, (0.5,) * 3), "cannot take"),
    ],
)
def test_export_refuses_a_task_that_does_not_fit_the_model(
    task: TaskMetadata, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        to_onnx(build_backbone("conv4", 5, 1, 28), task)
