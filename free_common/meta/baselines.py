"""The parameter-space baselines: random initialization and weight averaging.

- Random: a freshly initialized meta-learner, fine-tuned at test time like any other.
- Average: element-wise mean of the teachers' weights (FedAvg without data), for
  teachers that share one architecture, loaded into a model of that architecture.
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

    Raises
    ------
    ArchitectureMismatch
        The models, or `into`, do not share one architecture.
    """
    averaged = average_state_dicts([m.state_dict() for m in models])
    target = into.state_dict()
    if target.keys() != averaged.keys() or any(
        target[k].shape != v.shape for k, v in averaged.items()
    ):
        raise ArchitectureMismatch(
            "the averaged teachers and the meta-learner differ in architecture; weight "
            "averaging needs the meta-learner's architecture for every teacher"
        )
    into.load_state_dict(averaged)
    return into
