"""The parameter-space baselines: random initialization and weight averaging."""

from __future__ import annotations

import onnx
import pytest
import torch

from free_common.errors import ArchitectureMismatch
from free_common.meta.baselines import average_state_dicts, random_init, weight_average
from free_common.models.backbones import build_backbone
from free_common.models.convert import convert
from free_common.models.export import to_onnx
from free_common.types import ChannelOrder, TaskMetadata


def _conv4(seed: int, width: int = 4) -> torch.nn.Module:
    return random_init(lambda: build_backbone("conv4", 5, 1, 16, width=width), seed)


def test_random_init_is_seeded_and_keeps_global_state() -> None:
    before = torch.random.get_rng_state()
    a, b, c = _conv4(1), _conv4(1), _conv4(2)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_weight_average_is_the_element_wise_mean() -> None:
    teachers = [_conv4(seed) for seed in range(3)]
    for index, teacher in enumerate(teachers):
        teacher.features[0].bn.num_batches_tracked.fill_(10 + index)
    average = weight_average(teachers, _conv4(9))
    states = [t.state_dict() for t in teachers]
    for name, value in average.state_dict().items():
        if value.is_floating_point():
            expected = sum(s[name] for s in states) / 3
            assert torch.allclose(value, expected, atol=1e-6), name
    assert int(average.features[0].bn.num_batches_tracked) == 10  # taken from the first


def test_converted_onnx_teachers_average_into_the_backbone() -> None:
    task = TaskMetadata(5, (1, 16, 16), ChannelOrder.GRAY, (0.5,), (0.5,))
    sources = [_conv4(seed) for seed in range(2)]
    teachers = [convert(onnx.load_from_string(to_onnx(m, task))) for m in sources]
    from_onnx = weight_average(teachers, _conv4(9))
    from_torch = weight_average(sources, _conv4(9))
    for name, value in from_torch.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(from_onnx.state_dict()[name], value, atol=1e-6), name


def test_averaging_different_architectures_is_refused() -> None:
    with pytest.raises(ArchitectureMismatch, match="architecture"):
        weight_average([_conv4(0), _conv4(1, width=8)], _conv4(2))
    with pytest.raises(ArchitectureMismatch):
        average_state_dicts([_conv4(0).state_dict(), build_backbone("mlp", 5, 1, 16).state_dict()])
    with pytest.raises(ArchitectureMismatch, match="meta-learner"):
        weight_average([_conv4(0), _conv4(1)], _conv4(2, width=8))
