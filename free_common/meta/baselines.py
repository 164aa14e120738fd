"""The parameter-space baselines: random initialization and weight averaging.

- Random: a freshly initialized meta-learner, fine-tuned at test time like any other.
- Average: element-wise mean of the teachers' weights (FedAvg without data), for
  teachers that share one architecture, loaded into a model of that architecture.

Teachers arrive as converted ONNX graphs whose tensor names are not the backbone's
(``layers.n4_features_features_1_conv_Conv.weight`` for ``features.1.conv.weight``),
but they list their weights in graph order, which for the built-in backbones is the
order of the backbone's own state dict; so weights are matched by name when the
names agree and otherwise by position, shape by shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from free_common.errors import ArchitectureMismatch

__all__ = ["average_state_dicts", "random_init", "weight_average"]

M = TypeVar("M", bound=nn.Module)


def random_init(build: Callable[[], M], seed: int) -> M:
    """Build a model whose initialization is drawn from `seed` (global state kept as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def average_state_dicts(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of same-shaped state dicts.

    Floating tensors are averaged (in float64, then cast back); integer buffers (batch
    norm's batch counters) are taken from the first state.

    Raises
    ------
    ArchitectureMismatch
        The states do not have the same names and shapes.
    """
    if not states:
        raise ArchitectureMismatch("weight averaging needs at least one model")
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            raise ArchitectureMismatch(
                f"model {index} has other layers than model 0; weight averaging needs one "
                "architecture: pick teachers of the same architecture"
            )
        for name, tensor in state.items():
            if tensor.shape != first[name].shape:
                raise ArchitectureMismatch(
                    f"layer {name} is {tuple(tensor.shape)} in model {index} but "
                    f"{tuple(first[name].shape)} in model 0; weight averaging needs one "
                    "architecture"
                )
    averaged: dict[str, Tensor] = {}
    for name, tensor in first.items():
        if tensor.is_floating_point():
            stacked = torch.stack([s[name].detach().to(torch.float64) for s in states])
            averaged[name] = stacked.mean(0).to(tensor.dtype)
        else:
            averaged[name] = tensor.detach().clone()
    return averaged


def weight_average(models: Sequence[nn.Module], into: M) -> M:
    """Load the mean of `models`' weights into `into` (same architecture) and return it.

    Names are matched when `into` uses the models' names; otherwise the floating-point
    tensors are matched in order (integer buffers of `into` are then left as they are).

    Raises
    ------
    ArchitectureMismatch
        The models, or `into`, do not share one architecture.
    """
    averaged = average_state_dicts([m.state_dict() for m in models])
    target = into.state_dict()
    if target.keys() == averaged.keys() and all(
        target[k].shape == v.shape for k, v in averaged.items()
    ):
        into.load_state_dict(averaged)
        return into
    sources = [v for v in averaged.values() if v.is_floating_point()]
    slots = [k for k, v in target.items() if v.is_floating_point()]
    if len(sources) != len(slots) or any(
        target[k].shape != v.shape for k, v in zip(slots, sources, strict=True)
    ):
        raise ArchitectureMismatch(
            "the averaged teachers and the meta-learner differ in architecture; weight "
            "averaging needs the meta-learner's architecture for every teacher"
        )
    into.load_state_dict(dict(zip(slots, sources, strict=True)), strict=False)
    return into
