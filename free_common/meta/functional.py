"""The meta-learner as a function of a parameter dictionary (`torch.func.functional_call`).

Inner loops never write into the module: they build new parameter dictionaries and
call the module with them, so second-order MAML needs no monkey-patching. Batch norm
runs on batch statistics throughout meta-learning and evaluation, as in the official
code (transductive); `batch_stat_mode` sets that up without turning on dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["Params", "as_student", "batch_stat_mode", "call", "detached_params"]

Params = dict[str, Tensor]
"""Parameter name -> tensor, as in `nn.Module.named_parameters`."""

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def call(model: nn.Module, params: Params, inputs: Tensor, buffers: Params | None = None) -> Tensor:
    """Run `model` with `params` (and `buffers`) in place of its own: (B, ...) -> (B, K)."""
    tensors = params if buffers is None else (params, buffers)
    logits: Tensor = functional_call(model, tensors, (inputs,))
    return logits


def detached_params(model: nn.Module) -> Params:
    """Fresh leaf copies of the model's parameters that require gradients."""
    return {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}


@contextmanager
def batch_stat_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Batch norm on batch statistics, every other module in eval mode; restored on exit."""
    modes = {module: module.training for module in model.modules()}
    try:
        for module in model.modules():
            module.train(isinstance(module, _BATCH_NORMS))
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def as_student(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Wrap the meta-learner as FIVE's student: logits on batch statistics, no gradients.

    Its batch norms' running buffers are left as they are (copies are used), so asking
    the student does not change the meta-learner.
    """

    def student(images: Tensor) -> Tensor:
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        with torch.no_grad(), batch_stat_mode(model):
            return call(model, dict(model.named_parameters()), images, buffers)

    return student
