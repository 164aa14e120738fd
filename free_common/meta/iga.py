"""BELL's distillation step: implicit gradient alignment (iGA), and FREE without it.

iGA (Reptile / Fish across teachers): a copy theta~ of the meta-learner takes one
inner step per teacher, in turn, on the distillation loss to that teacher; the main
optimizer then descends the pseudo-gradient

    g = s * (theta - theta~_n) = -s * Delta,    Delta = theta~_n - theta,  s = 67 (official).

Sign convention: with a plain SGD outer step of size eta, theta <- theta + eta * s * Delta,
so eta * s = 1 lands on theta~_n. With SGD inner steps of size a and g_i, H_i the
gradient and Hessian of teacher i's loss at theta,

    Delta = -a * sum_i g_i + a^2 * sum_{i<j} H_j g_i + O(a^3),

and the a^2 term, averaged over teacher orders, is (a^2 / 2) grad sum_{i<j} <g_i, g_j>:
the step implicitly raises the agreement of the teachers' gradients.
(tests/test_meta_iga.py checks this expansion numerically.)

Without iGA, the per-teacher gradients at theta are summed into one plain step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from free_common.meta.config import IgaConfig, KlForm
from free_common.meta.functional import Params, batch_stat_mode, call, detached_params
from free_common.meta.kd import distillation_loss

__all__ = [
    "DistillStats",
    "KdBatch",
    "iga_displacement",
    "iga_step",
    "summed_gradient_step",
]


@dataclass(frozen=True)
class KdBatch:
    """One teacher's recovered images and that teacher's view of them.

    Attributes
    ----------
    inputs
        (B, C, H, W) images in [0, 1] as the meta-learner reads them (augmented).
    teacher_logits
        (B, K) the teacher's logits on the same images.
    """

    inputs: Tensor
    teacher_logits: Tensor


@dataclass(frozen=True)
class DistillStats:
    """Per teacher, the distillation loss and the share of argmax agreement, before the step.

    ``alignment`` is the mean cosine similarity, over pairs of the step's teachers, of
    their distillation gradients (with iGA each taken where its inner step began; without,
    at theta): what iGA's update raises implicitly. None with fewer than two teachers.
    """

    losses: tuple[float, ...]
    agreement: tuple[float, ...]
    alignment: float | None = None


def iga_displacement(
    model: nn.Module,
    batches: Sequence[KdBatch],
    config: IgaConfig,
    lr_scale: Mapping[str, float] | None = None,
) -> tuple[Params, DistillStats]:
    """Delta = theta~_n - theta after one inner step per batch, in order; theta is untouched.

    `lr_scale` multiplies the inner rate of the named parameters (1 for the others).

    Returns
    -------
    tuple
        Delta per parameter name (detached), and what each teacher's loss was when its
        inner step began.
    """
    fast = detached_params(model)
    scales = lr_scale or {}
    by_rate: dict[float, list[Tensor]] = {}
    for name, param in fast.items():
        by_rate.setdefault(config.inner_lr * scales.get(name, 1.0), []).append(param)
    groups = [{"params": params, "lr": lr} for lr, params in by_rate.items()]
    inner: torch.optim.Optimizer
    if config.inner_optimizer == "adam":
        inner = torch.optim.Adam(groups, lr=config.inner_lr)
    else:
        inner = torch.optim.SGD(groups, lr=config.inner_lr)
    losses, agreement, gradients = [], [], []
    with batch_stat_mode(model):
        for batch in batches:
            logits = call(model, fast, batch.inputs)  # (B, K)
            loss = distillation_loss(logits, batch.teacher_logits, config.kl_form)
            inner.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            gradients.append(_flat_grad(fast.values()))
            inner.step()
            losses.append(float(loss.detach()))
            agreement.append(_agreement(logits, batch.teacher_logits))
    delta = {name: fast[name].detach() - p.detach() for name, p in model.named_parameters()}
    return delta, DistillStats(tuple(losses), tuple(agreement), _mean_cosine(gradients))


def iga_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[KdBatch],
    config: IgaConfig,
) -> DistillStats:
    """One iGA update of `model` by `optimizer` (the main one, shared with replay).

    Parameters
    ----------
    model
        The meta-learner theta; its parameters must be those `optimizer` steps.
    optimizer
        The main outer optimizer (Adam, lr 1e-3 in the paper).
    batches
        One batch per teacher of the step, in the order the inner steps take them.
    config
        Inner optimizer and rate, pseudo-gradient scale, KL form.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    # Inner steps follow the outer groups' relative rates (`bell.set_outer_lr`).
    lr_scale = {
        names[id(p)]: float(group.get("lr_scale", 1.0))
        for group in optimizer.param_groups
        for p in group["params"]
    }
    delta, stats = iga_displacement(model, batches, config, lr_scale)
    optimizer.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():
        param.grad = -config.pseudo_grad_scale * delta[name]
    optimizer.step()
    return stats


def summed_gradient_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[KdBatch],
    kl_form: KlForm,
) -> DistillStats:
    """FREE without iGA: sum the teachers' distillation gradients at theta, one plain step."""
    losses, agreement, gradients = [], [], []
    optimizer.zero_grad(set_to_none=True)
    summed: Tensor | None = None
    with batch_stat_mode(model):
        for batch in batches:
            logits = model(batch.inputs)  # (B, K)
            loss = distillation_loss(logits, batch.teacher_logits, kl_form)
            torch.autograd.backward(loss)  # .grad accumulates: the sum over teachers
            total = _flat_grad(model.parameters())
            gradients.append(total if summed is None else total - summed)
            summed = total
            losses.append(float(loss.detach()))
            agreement.append(_agreement(logits, batch.teacher_logits))
    optimizer.step()
    return DistillStats(tuple(losses), tuple(agreement), _mean_cosine(gradients))


def _flat_grad(params: Iterable[Tensor]) -> Tensor:
    """Flatten the parameters' .grad into one (P,) vector, zeros where one has none."""
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).detach().flatten() for p in params]
    )


def _mean_cosine(vectors: Sequence[Tensor]) -> float | None:
    """Mean cosine similarity over the pairs of `vectors`; None with fewer than two."""
    if len(vectors) < 2:
        return None
    unit = torch.nn.functional.normalize(torch.stack(list(vectors)), dim=1)  # (n, P)
    cosines = unit @ unit.T  # (n, n)
    n = len(vectors)
    return float((cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1)))


def _agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    same = student_logits.detach().argmax(1) == teacher_logits.argmax(1)
    return float(same.float().mean())
