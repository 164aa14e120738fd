"""A tiny round as one rank of a launch: ``python -m torch.distributed.run ... THIS OUT WORK``.

Rank 0 writes the initialization (safetensors bytes) to OUT. ``--kill-at STEP`` makes
rank 1 kill itself right after the checkpoint of STEP, as a crashed worker would.
With no launcher it runs as a single process.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import engine_tiny as tiny
import torch

from free_common.engine import CheckpointSaved, EngineEvent, run_round
from free_common.engine.distributed import init_from_env, shutdown

TEACHERS = 4
STEPS = 6


def main() -> None:
    """Run the round of the distributed tests on this rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers, device = init_from_env(args.device)

    def on_event(event: EngineEvent) -> None:
        if isinstance(event, CheckpointSaved) and event.step == args.kill_at and workers.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    config = tiny.config(steps=STEPS, teachers_per_step=TEACHERS)
    result = run_round(
        tiny.teachers(TEACHERS),
        config,
        args.work,
        validation=tiny.validation_episodes(),
        device=device,
        on_event=on_event,
        workers=workers,
    )
    if workers.is_main:
        args.out.write_bytes(result.initialization.data)
    shutdown()


if __name__ == "__main__":
    main()
