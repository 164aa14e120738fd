"""Differentially private teachers: DP-SGD through Opacus, the guarantee it spends.

An owner who trains with DP-SGD (Abadi et al., CCS 2016) bounds what any use of the
model, inversion and membership inference included, can reveal about one training
image: the model is (epsilon, delta)-DP with respect to adding or removing one image.
Opacus (`opacus.PrivacyEngine`) clips each example's gradient, adds Gaussian noise
calibrated to a target epsilon over the planned epochs, samples batches by Poisson
sampling, and its accountant reports the epsilon spent.

Batch norm mixes the examples of a batch, so a per-example gradient is not defined and
Opacus refuses it: DP teachers use the ``conv4gn`` backbone (group norm). Selecting the
best epoch on held-out images does not touch the training images, so the guarantee
stays that of the training run.

Opacus is the optional ``privacy`` extra; it is imported only when a DP model is trained.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from free_common.errors import ConfigError

__all__ = ["DP_BACKBONES", "DpConfig", "DpResult", "train_private"]

DP_BACKBONES = {"conv4": "conv4gn"}
"""The batch-norm-free backbone a DP teacher of each zoo architecture trains as."""


@dataclass(frozen=True)
class DpConfig:
    """The privacy target of DP-SGD training.

    Attributes
    ----------
    epsilon
        Target epsilon over the whole training run.
    delta
        Target delta; it should be well below 1 / (training images).
    max_grad_norm
        Per-example gradient clipping bound.
    lr
        Adam learning rate under DP (0.01, the non-private Conv4 recipe, measured best of
        0.003 and 0.01 on held-out accuracy at epsilon 8).
    batch_size
        Expected batch size of Poisson sampling.
    """

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    lr: float = 1e-2
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"--dp-epsilon must be a positive number, got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"--dp-delta must be between 0 and 1, got {self.delta}")
        if self.max_grad_norm <= 0 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError("DP max_grad_norm, lr and batch_size must be positive")


@dataclass(frozen=True)
class DpResult:
    """What DP training gave: the model's best held-out accuracy and the privacy spent."""

    heldout_accuracy: float
    best_epoch: int
    epsilon: float
    """Epsilon the accountant reports for the whole run (at most the target)."""
    delta: float
    noise_multiplier: float


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ConfigError(
            "DP training needs Opacus: pip install 'free-fed[privacy]' (or opacus>=1.5)"
        ) from None
    return opacus


def train_private(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    dp: DpConfig,
    seed: int,
) -> DpResult:
    """Train `model` in place with DP-SGD (Adam) to `dp`'s target; keep the best held-out epoch.

    Parameters
    ----------
    model
        A batch-norm-free classifier (Opacus refuses batch norm); left in eval mode with
        the best epoch's weights.
    train, heldout
        Normalized images and labels.
    epochs
        Planned epochs: the noise is calibrated so that all of them spend `dp.epsilon`.
    dp
        The privacy target and optimizer settings.
    seed
        Seeds Poisson sampling and the noise (not cryptographically secure: a simulation).
    """
    opacus = _opacus()
    errors = opacus.validators.ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"Opacus cannot train this model privately: {errors[0]}")
    torch.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(*train),
        batch_size=dp.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=dp.lr)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off (a seeded simulation, on purpose) and torch
        # that its backward hooks fire on a first layer whose input needs no gradient.
        warnings.simplefilter("ignore", UserWarning)
        engine = opacus.PrivacyEngine(accountant="prv")
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=dp.epsilon,
            target_delta=dp.delta,
            epochs=epochs,
            max_grad_norm=dp.max_grad_norm,
        )
        best = (-1.0, 0, {k: v.clone() for k, v in model.state_dict().items()})
        for epoch in range(1, epochs + 1):
            private.train()
            for x, y in loader:
                if len(x) == 0:  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad()
                torch.autograd.backward(F.cross_entropy(private(x), y))
                optimizer.step()
            model.eval()
            with torch.no_grad():
                accuracy = float((model(heldout[0]).argmax(1) == heldout[1]).float().mean())
            if accuracy > best[0]:
                best = (accuracy, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        # The accountant warns when its largest order is the optimal one: the bound is
        # then a little loose (an epsilon at most the target, as reported).
        spent = float(engine.get_epsilon(dp.delta))
    private._close()  # removes Opacus's hooks: `model` is a plain module again
    model.load_state_dict(best[2])
    model.eval()
    return DpResult(best[0], best[1], spent, dp.delta, float(optimizer.noise_multiplier))
