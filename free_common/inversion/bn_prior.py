"""The batch-norm statistics prior of DeepInversion (used by PURER and TGR, off in FREE).

A teacher's batch norms remember the mean and variance of their inputs over the owner's
training images. Generated images whose activations match those statistics look more
like that data than images that only satisfy the classifier, so the prior

    R(x) = sum over BN layers l of ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2

is added to the inversion loss with weight ``FiveConfig.bn_weight`` (the official FREE
code defines the weight, at 0, and never registers the hooks). Teachers without batch
norm (exporters fold it into the convolutions by default) get total variation in its
place, at ``FiveConfig.tv_weight_without_bn``. A teacher exported with a fixed batch
size runs one group of images at a time, so its prior matches each group's statistics.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["BatchNormPrior"]


class BatchNormPrior:
    """Collects R(x) over one or more forward passes of `model` while the context is open.

    Example::

        with BatchNormPrior(teacher) as prior:
            logits = teacher(images)
        loss = ce + weight * prior.loss()
    """

    def __init__(self, model: nn.Module) -> None:
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._terms: list[Tensor] = []
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> BatchNormPrior:
        for norm in self._norms:
            self._handles.append(norm.register_forward_hook(self._hook))
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _trace: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def has_norms(self) -> bool:
        """True when the model has batch-norm layers to match."""
        return bool(self._norms)

    def loss(self) -> Tensor:
        """Return the prior summed over every batch-norm layer and pass seen (0 when none)."""
        if not self._terms:
            return torch.zeros(())
        return torch.stack(self._terms).sum()

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        if module.running_mean is None or module.running_var is None:
            return
        x = inputs[0]
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self._terms.append(
            torch.linalg.vector_norm(mean - module.running_mean)
            + torch.linalg.vector_norm(var - module.running_var)
        )
