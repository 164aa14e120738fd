"""Weights that batch norm makes scale-free, and keeping their norms where they were chosen.

A convolution (or linear layer) followed by batch norm on batch statistics computes the
same function at any positive scale of its weight: the norm cancels in the
normalization, and so does a bias (exactly with the norm's eps at 0; with eps, while
the scaled variance stays well above it). Fine-tuning does not ignore it: the gradient of such
a weight shrinks as 1/||w|| and the direction it turns by per step as lr/||w||^2. The
evaluation protocol (10 steps at a fixed lr) therefore rewards a small norm for its own
sake, and any norm growth during meta-training (gradients orthogonal to w only ever lengthen it)
slows the adaptation the model was selected for (`docs/engine-findings.md`).

So the engine chooses the norm once, on meta-val, and pins it: after every step of the
main optimizer each scale-free weight is put back to its norm, which leaves the
network's function as the step made it and the adaptation rate as it was chosen.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["NormPin", "rescale_weights", "scale_free_weights", "weight_norms"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def scale_free_weights(model: nn.Module) -> list[str]:
    """Names of the weights that a batch norm right after their layer makes scale-free.

    A layer counts when the next leaf module in registration order is a batch norm
    over its output channels: the order every built-in backbone (and a plain
    ``nn.Sequential``) registers its layers in. A residual sum after the norm does not
    matter, the norm's output does not depend on the weight's scale.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    found = []
    for (name, layer), (_, after) in itertools.pairwise(leaves):
        if not isinstance(layer, _LAYERS) or not isinstance(after, nn.modules.batchnorm._BatchNorm):
            continue
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if after.num_features == channels:
            found.append(f"{name}.weight" if name else "weight")
    return found


def weight_norms(model: nn.Module, names: list[str]) -> dict[str, float]:
    """Frobenius norm of each named parameter."""
    params = dict(model.named_parameters())
    return {name: float(params[name].detach().norm()) for name in names}


def rescale_weights(model: nn.Module, names: list[str], factor: float) -> None:
    """Multiply each named parameter by `factor` in place (the function of the model is kept)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].mul_(factor)


class NormPin:
    """Puts the scale-free weights of a model back to fixed norms after each optimizer step.

    Parameters
    ----------
    model
        The meta-learner.
    targets
        Parameter name -> the norm to keep (`weight_norms` at the chosen scale).
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, float]) -> None:
        params = dict(model.named_parameters())
        self.targets = dict(targets)
        self._params = [(params[name], norm) for name, norm in self.targets.items()]

    def project(self) -> None:
        """Rescale every pinned weight to its target norm."""
        with torch.no_grad():
            for param, norm in self._params:
                param.mul_(norm / param.norm().clamp_min(1e-12))

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Project after every `optimizer.step()`; the handle's ``remove()`` undoes it."""

        def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            self.project()

        return optimizer.register_step_post_hook(hook)
