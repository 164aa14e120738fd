"""Models as owners export them: five ordinary architectures, each exporter's defaults.

Every file of the trial in issue 11 (a ResNet-18, a MobileNetV2, a Softmax-headed CNN, a
SiLU/Hardswish CNN and a ViT, exported by the legacy exporter at opset 17 and by the
dynamo exporter, both with their default fixed batch of 1, plus a dynamic batch) is
accepted by the same intake the server runs, with the task given outside the file as
on the command line; the converted teacher matches the original torch model on any
batch size, and FIVE recovers images from it.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import cache
from pathlib import Path

import engine_tiny as tiny
import numpy as np
import pytest
import torch
from foreign_models import FOREIGN_MODELS, build_foreign, export_foreign
from torch import nn

from free_common.engine import EngineEvent, EngineTeacher, LearnerSpec, run_round
from free_common.engine.events import StepFinished
from free_common.inversion.config import GeneratorConfig
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher
from free_common.models.backbones import build_backbone
from free_common.models.export import to_onnx
from free_common.models.intake import load_teacher, run_intake
from free_common.models.onnx_static import FOLDED_BATCH_NORM_WARNING
from free_common.types import ChannelOrder, TaskMetadata

pytestmark = pytest.mark.slow

TASK = TaskMetadata(5, (3, 32, 32), ChannelOrder.RGB, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
EXPORTS = ("legacy", "dynamo", "legacy-dynamic")
CASES = [(name, export) for name in FOREIGN_MODELS for export in EXPORTS]


@cache
def _exported(name: str, export: str) -> bytes:
    return export_foreign(
        build_foreign(name),
        dynamo=export == "dynamo",
        dynamic_batch=export.endswith("dynamic"),
    )


def _reference(name: str, images: torch.Tensor) -> torch.Tensor:
    """The original model's logits (the Softmax-headed CNN: the logits under its softmax)."""
    model = build_foreign(name)
    with torch.no_grad():
        out = model(images)
    return torch.log(out) if name == "softmax-cnn" else out


@pytest.mark.parametrize(("name", "export"), CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_default_exports_are_accepted_and_match_the_original(name: str, export: str) -> None:
    data = _exported(name, export)
    result = run_intake(data, task=TASK)
    assert result.accepted, result.reason
    assert result.summary is not None
    assert result.summary.max_abs_diff < 1e-4
    assert result.summary.fixed_batch == (None if export.endswith("dynamic") else 1)
    assert result.summary.output_head == ("softmax" if name == "softmax-cnn" else "logits")
    # Both exporters fold batch norm into the convolutions by default: the owner is told.
    assert FOLDED_BATCH_NORM_WARNING in result.warnings
    teacher = load_teacher(data, task=TASK, already_accepted=True)
    images = torch.rand(7, 3, 32, 32)  # not the exported batch: the module runs any batch
    logits = teacher.module(images)
    want = _reference(name, images)
    # A removed Softmax leaves logits up to a constant per image: compare log-probabilities.
    assert torch.allclose(logits.log_softmax(1), want.log_softmax(1), atol=1e-4)


def test_batch_norm_kept_by_the_export_settings_reaches_the_converter() -> None:
    model = build_foreign("resnet18")
    teacher = load_teacher(to_onnx(model, TASK), task=TASK)
    assert len(teacher.module.batch_norms) == 20
    assert teacher.summary is not None and teacher.summary.num_batch_norms == 20


class _ChannelsLast(nn.Module):
    """A classifier that takes NHWC images, as Keras models exported by tf2onnx do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x.permute(0, 3, 1, 2))
        return out


def test_an_nhwc_input_with_a_leading_transpose_is_accepted(tmp_path: Path) -> None:
    inner = build_foreign("silu-cnn")
    path = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            _ChannelsLast(inner).eval(),
            (torch.rand(1, 32, 32, 3),),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
    data = path.read_bytes()
    result = run_intake(data, task=TASK)
    assert result.accepted, result.reason
    assert result.summary is not None and result.summary.channels_last
    teacher = load_teacher(data, task=TASK, already_accepted=True)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.module(images), inner(images), atol=1e-5)


def test_a_channels_last_model_with_the_wrong_layout_is_refused() -> None:
    grey = dataclasses.replace(TASK, input_shape=(3, 16, 16))
    result = run_intake(_exported("silu-cnn", "legacy"), task=grey)
    assert not result.accepted and "task metadata says" in result.reason


def _generator() -> MetaGenerator:
    config = GeneratorConfig(latent_dim=16, width=8, image_size=32, channels=3)
    return MetaGenerator(build_generator(config, 0, torch.device("cpu")), tiny.config().five)


@pytest.mark.parametrize("name", list(FOREIGN_MODELS))
def test_five_recovers_images_from_each_foreign_teacher(name: str) -> None:
    teacher = load_teacher(_exported(name, "legacy"), task=TASK, already_accepted=True)
    adapted = AdaptedTeacher(teacher.module, TASK, name)
    recovery, grads = _generator().adapt(adapted, torch.Generator().manual_seed(0))
    assert recovery.images.shape == (5 * tiny.config().five.images_per_class, 3, 32, 32)
    assert 0.0 <= recovery.teacher_accuracy <= 1.0
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)  # the teacher's gradient reached it


def test_a_round_runs_on_foreign_teachers_mixed_with_conv4(tmp_path: Path) -> None:
    pool = [
        EngineTeacher(name, load_teacher(_exported(name, "legacy"), task=TASK).module, TASK)
        for name in FOREIGN_MODELS
    ]
    for seed in range(2):
        torch.manual_seed(seed)
        conv4 = build_backbone("conv4", 5, 3, 32, width=8)
        pool.append(EngineTeacher(f"conv4-{seed}", load_teacher(to_onnx(conv4, TASK)).module, TASK))
    config = tiny.config(
        learner=LearnerSpec(arch="conv4", width=8, ways=5, channels=3, image_size=32),
        generator=GeneratorConfig(latent_dim=8, width=4, image_size=32, channels=3),
        steps=4,
        teachers_per_step=3,
    )
    events: list[EngineEvent] = []
    result = run_round(
        pool, config, tmp_path, validation=None, device="cpu", on_event=events.append
    )
    assert not result.skipped
    drawn = {t for e in events if isinstance(e, StepFinished) for t in e.teacher_ids}
    assert drawn & set(FOREIGN_MODELS) and drawn & {"conv4-0", "conv4-1"}
    meta_steps = [e for e in events if isinstance(e, StepFinished) and e.phase == "meta"]
    assert meta_steps and all(np.isfinite(e.teacher_accuracy) for e in meta_steps)
