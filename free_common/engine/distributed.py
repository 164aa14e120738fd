"""The process group of a meta round: who this process is, and the collectives a round uses.

A round runs the same code in one process or in several started by torch's launcher
(``python -m torch.distributed.run --nproc-per-node N ...``): `current` returns a
`Workers` for the default process group when one is initialized, else a single-process
one whose collectives return their input. Backend: gloo on CPU, NCCL on CUDA
(`init_from_env`).

Every collective adds its wall time to `Workers.comm_seconds`, which includes waiting
for the slowest rank, so "communication share" measures both the wire and imbalance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from free_common.errors import ConfigError

__all__ = ["Workers", "current", "init_from_env", "shutdown"]


@dataclass
class Workers:
    """A process's place among the round's processes, and the collectives between them.

    Attributes
    ----------
    rank, world
        This process's rank and the number of processes (1: no process group).
    comm_seconds
        Wall time spent in collectives so far.
    """

    rank: int = 0
    world: int = 1
    comm_seconds: float = 0.0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and results."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item `index` of a step (a teacher) is this rank's to compute (round robin)."""
        return index % self.world == self.rank

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sum each tensor over the ranks (in place where distributed); returns them."""
        if self.world == 1:
            return list(tensors)
        with self._timed():
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return list(tensors)

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable; tensors on the CPU), in rank order."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        with self._timed():
            dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            with self._timed():
                dist.barrier()

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.comm_seconds += time.perf_counter() - started


def current() -> Workers:
    """Return the default process group as `Workers`, or one process when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size())
    return Workers()


def init_from_env(device: str = "auto") -> tuple[Workers, torch.device]:
    """Join the process group torch's launcher describes in the environment.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``: gloo for the CPU, NCCL
        with one GPU per rank (``cuda:LOCAL_RANK``) for CUDA.

    Returns
    -------
    tuple
        The workers, and the device this rank computes on. Without the launcher's
        variables (a plain ``python`` start) it is a single process.

    Raises
    ------
    ConfigError
        CUDA asked for without a GPU for this rank.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if torch.cuda.device_count() <= local:
            raise ConfigError(
                f"rank with LOCAL_RANK {local} has no GPU of its own "
                f"({torch.cuda.device_count()} visible): start at most that many processes"
            )
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, device_id=chosen if use_cuda else None)
    return current(), chosen


def shutdown() -> None:
    """Leave the process group (if any) once every rank is done, for a clean exit.

    Call it on success only: after an error the launcher stops the other ranks.
    """
    if dist.is_available() and dist.is_initialized():
        # Together: a rank tearing down while its peer still does aborted now and then
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
