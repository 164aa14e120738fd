"""Scale-free weights: found exactly, invisible to the forward pass, pinned through Adam."""

from __future__ import annotations

import pytest
import torch
from engine_tiny import validation_episodes
from torch import nn

from free_common.meta.config import EvalConfig
from free_common.meta.evaluate import finetune_accuracy
from free_common.meta.functional import batch_stat_mode
from free_common.meta.norms import NormPin, rescale_weights, scale_free_weights, weight_norms
from free_common.models.backbones import build_backbone


@pytest.mark.parametrize(
    ("arch", "side", "expected"),
    [
        ("conv4", 16, [f"features.{i}.conv.weight" for i in range(4)]),
        ("mlp", 8, ["features.1.weight", "features.4.weight"]),
    ],
)
def test_the_weights_batch_norm_follows_and_not_the_head(
    arch: str, side: int, expected: list[str]
) -> None:
    model = build_backbone(arch, 5, 1, side, width=8)
    assert scale_free_weights(model) == expected


def test_resnet_convolutions_and_shortcuts_are_all_found() -> None:
    model = build_backbone("resnet10", 5, 1, 16, width=4)
    found = scale_free_weights(model)
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert found == convs
    assert "head.weight" not in found


@pytest.mark.parametrize("arch", ["conv4", "resnet10", "mlp"])
def test_rescaling_them_leaves_the_batch_stat_forward_pass_unchanged(arch: str) -> None:
    """Exactly so with the norms' eps near 0 (with eps it holds while c^2 var(Wx) >> eps)."""
    torch.manual_seed(0)
    model = build_backbone(arch, 5, 1, 16, width=8).double()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-30
    x = torch.rand(10, 1, 16, 16, dtype=torch.float64)
    with batch_stat_mode(model):
        before = model(x)
        rescale_weights(model, scale_free_weights(model), 0.1)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_rescaling_the_head_would_change_it() -> None:
    """The control: a weight outside the list is not scale-free."""
    torch.manual_seed(0)
    model = build_backbone("conv4", 5, 1, 16, width=8)
    x = torch.rand(10, 1, 16, 16)
    with batch_stat_mode(model):
        before = model(x)
        rescale_weights(model, ["head.weight"], 0.1)
        assert not torch.allclose(model(x), before)


def test_a_smaller_norm_adapts_faster_at_the_same_learning_rate() -> None:
    """Why the scale is chosen: the same function, fine-tuned at lr 0.01, learns more."""
    torch.manual_seed(0)
    episodes = validation_episodes(count=6)
    config = EvalConfig(ways=5, shots=1, queries=2, episodes=6, steps=3, lr=0.01)
    big = build_backbone("conv4", 5, 1, 16, width=8)
    small = build_backbone("conv4", 5, 1, 16, width=8)
    small.load_state_dict(big.state_dict())
    rescale_weights(small, scale_free_weights(small), 0.1)
    score = lambda m: sum(finetune_accuracy(m, e, config) for e in episodes)  # noqa: E731
    assert score(small) > score(big)


def test_pinned_norms_hold_through_adam_steps_and_unpinned_ones_grow() -> None:
    torch.manual_seed(0)
    pinned = build_backbone("conv4", 5, 1, 16, width=8)
    free = build_backbone("conv4", 5, 1, 16, width=8)
    free.load_state_dict(pinned.state_dict())
    names = scale_free_weights(pinned)
    targets = weight_norms(pinned, names)
    opt_pinned = torch.optim.Adam(pinned.parameters(), lr=0.01)
    opt_free = torch.optim.Adam(free.parameters(), lr=0.01)
    handle = NormPin(pinned, targets).attach(opt_pinned)
    x, y = torch.rand(20, 1, 16, 16), torch.arange(20) % 5
    for _ in range(20):
        for model, opt in ((pinned, opt_pinned), (free, opt_free)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for name, norm in weight_norms(pinned, names).items():
        assert norm == pytest.approx(targets[name], rel=1e-5)
    # Gradients orthogonal to w, and Adam's steps, lengthen a scale-free weight.
    grown = weight_norms(free, names)
    assert all(grown[n] > targets[n] for n in names)
    handle.remove()
    opt_pinned.zero_grad()
    nn.functional.cross_entropy(pinned(x), y).backward()
    opt_pinned.step()
    assert weight_norms(pinned, names) != pytest.approx(targets, rel=1e-6)
