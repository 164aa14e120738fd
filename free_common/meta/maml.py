"""MAML on one task, over parameter dictionaries (second order unless asked otherwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from free_common.meta.config import MamlConfig
from free_common.meta.episodes import EpisodeLike, as_inputs
from free_common.meta.functional import Params, call

__all__ = ["adapt", "maml_loss"]


def adapt(
    model: nn.Module,
    params: Params,
    inputs: Tensor,
    labels: Tensor,
    steps: int,
    lr: float,
    create_graph: bool,
    buffers: Params | None = None,
) -> Params:
    """Take `steps` plain gradient steps of cross-entropy on (inputs, labels) from `params`.

    Parameters
    ----------
    model
        The architecture, run with `params` in place of its own.
    params
        Where to start; gradients to them survive in the result.
    inputs, labels
        (B, C, H, W) images and (B,) labels.
    steps, lr
        Number and size of the steps.
    create_graph
        True keeps the graph of the gradients themselves (second-order MAML); False
        makes the result first-order in `params`.
    buffers
        Batch-norm buffers to use instead of the model's own.

    Returns
    -------
    Params
        The adapted parameters.
    """
    for _ in range(steps):
        loss = F.cross_entropy(call(model, params, inputs, buffers), labels)
        grads = torch.autograd.grad(
            loss, list(params.values()), create_graph=create_graph, allow_unused=True
        )
        params = {
            name: p if g is None else p - lr * g
            for (name, p), g in zip(params.items(), grads, strict=True)
        }
    return params


def maml_loss(model: nn.Module, episode: EpisodeLike, config: MamlConfig) -> tuple[Tensor, float]:
    """Query cross-entropy after adapting the model's own parameters on the support set.

    Call inside `batch_stat_mode(model)`. Backpropagating the loss reaches the model's
    parameters through the inner steps (through their second derivatives too unless
    `config.first_order`).

    Returns
    -------
    tuple
        The query loss (a scalar with graph) and the query accuracy.
    """
    param = next(model.parameters())
    support = as_inputs(episode.support_x, param.device, param.dtype)
    query = as_inputs(episode.query_x, param.device, param.dtype)
    support_y = episode.support_y.to(param.device)
    query_y = episode.query_y.to(param.device)
    fast = adapt(
        model,
        dict(model.named_parameters()),
        support,
        support_y,
        config.inner_steps,
        config.inner_lr,
        create_graph=not config.first_order,
    )
    logits = call(model, fast, query)  # (N*Q, N)
    accuracy = float((logits.detach().argmax(1) == query_y).float().mean())
    return F.cross_entropy(logits, query_y), accuracy
