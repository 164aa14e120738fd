"""A step's per-teacher work spread over the round's processes, with one-process results.

Teacher i of a step is computed by rank ``i % world`` with its own random generator
(seeded from the round's generator, identically on every rank), so what it draws does
not depend on which rank runs it or on the teachers before it. Results come back to
every rank in teacher order, and sums are taken in teacher order too: each rank fills
its teachers' rows of a (teachers, values) tensor with zeros elsewhere, the rows are
all-reduced (x + 0 is exact), and every rank adds them up in order. So N ranks compute
the same bits as one process, at the price of an all-reduce `teachers` times longer
than one of the sum (the meta-generator's gradients are small).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from free_common.engine.distributed import Workers

__all__ = ["gather_in_order", "sum_in_order", "teacher_rngs"]

T = TypeVar("T")

_SEED_BOUND = 2**62


def teacher_rngs(count: int, rng: torch.Generator) -> list[torch.Generator]:
    """One generator per teacher of a step, seeded by draws from the round's `rng`."""
    seeds = torch.randint(0, _SEED_BOUND, (count,), generator=rng).tolist()
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def sum_in_order(
    workers: Workers, count: int, owned: Mapping[int, Sequence[Tensor]], like: Sequence[Tensor]
) -> list[Tensor] | None:
    """Sum per-teacher tensor lists over all `count` teachers, in teacher order.

    Parameters
    ----------
    workers
        The round's processes.
    count
        Teachers of the step.
    owned
        This rank's teachers' lists, by teacher index.
    like
        Tensors of the shapes and device of one teacher's list (the parameters).

    Returns
    -------
    list of Tensor or None
        The elementwise sums, shaped like `like`; None when ``count`` is 0.
    """
    if count == 0:
        return None
    shapes = [t.shape for t in like]
    sizes = [shape.numel() for shape in shapes]
    rows = torch.zeros(count, sum(sizes), device=like[0].device)
    for index, tensors in owned.items():
        rows[index] = torch.cat([t.reshape(-1) for t in tensors])
    workers.all_reduce_sum([rows])
    total = rows[0]
    for index in range(1, count):
        total = total + rows[index]
    return [part.view(shape) for part, shape in zip(torch.split(total, sizes), shapes, strict=True)]


def gather_in_order(
    workers: Workers, count: int, owned: Mapping[int, T], device: torch.device
) -> list[T]:
    """Every rank's per-teacher results, as one list in teacher order.

    Tensors (bare, or fields of dataclasses) travel on the CPU and come back on `device`.
    """
    if workers.world == 1:
        return [owned[i] for i in range(count)]
    cpu = torch.device("cpu")
    mine = {i: _moved(value, cpu) for i, value in owned.items()}
    merged: dict[int, Any] = {}
    for part in workers.all_gather_objects(mine):
        merged.update(part)
    return [_moved(merged[i], device) for i in range(count)]


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            item.name: _moved(getattr(value, item.name), device)
            for item in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value
