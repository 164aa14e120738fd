"""Steps per second of a meta round on 1 and on 2 processes (torch.distributed, gloo).

The script launches itself under torch's launcher once per process count
(``python -m torch.distributed.run --standalone --nproc-per-node N``); every rank runs the
same round (`free_common.engine.run_round` with the launcher's process group) on random
Conv4 teachers, and rank 0 writes what each rank measured. Per step: wall time, and the
time spent in collectives (`Workers.comm_seconds`, which includes waiting for the
slower rank). Warm-up steps (FIVE alone, all of it sharded) and meta steps (FIVE
sharded, then BELL replicated on every rank) are reported apart. No checkpoint or
meta-val inside the timed steps: one checkpoint at the end.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed_steps.py --workers 1 2 \\
        --out benchmarks/results/distributed-steps.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from free_common.bench.launch import launcher_command
from free_common.engine import EngineConfig, EngineEvent, EngineTeacher, StepFinished, run_round
from free_common.engine.config import LearnerSpec
from free_common.engine.distributed import init_from_env, shutdown
from free_common.inversion.config import FiveConfig, GeneratorConfig
from free_common.memory.config import MemoryConfig
from free_common.meta.config import BellConfig, MamlConfig, ReplayConfig
from free_common.models.backbones import build_backbone
from free_common.types import ChannelOrder, TaskMetadata

SIDE, WAYS, TEACHERS = 28, 5, 8
TASK = TaskMetadata(WAYS, (1, SIDE, SIDE), ChannelOrder.GRAY, (0.5,), (0.25,))


def bench_config(steps: int, teachers_per_step: int) -> EngineConfig:
    """A small Conv4 round: big enough that a step is compute, not overhead."""
    return EngineConfig(
        preset="bench-distributed",
        learner=LearnerSpec(arch="conv4", width=32, ways=WAYS, channels=1, image_size=SIDE),
        generator=GeneratorConfig(latent_dim=64, width=16, image_size=SIDE, channels=1),
        five=FiveConfig(images_per_class=5),
        bell=BellConfig(
            maml=MamlConfig(ways=WAYS, shots=1, queries=2, inner_steps=2),
            replay=ReplayConfig(episode_batch=2, patience=1, max_batches=2),
        ),
        memory=MemoryConfig(capacity_per_class=20),
        steps=steps,
        warmup_steps=2,
        teachers_per_step=teachers_per_step,
        min_teachers=2,
        checkpoint_every=steps,
        seed=7,
    )


def _teachers() -> list[EngineTeacher]:
    out = []
    for seed in range(TEACHERS):
        torch.manual_seed(seed)
        model = build_backbone("conv4", WAYS, 1, SIDE, width=32).eval()
        out.append(EngineTeacher(f"teacher-{seed}", model, TASK))
    return out


def _rank(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    workers, device = init_from_env("cpu")
    steps: list[dict[str, Any]] = []
    last_comm = 0.0

    def on_event(event: EngineEvent) -> None:
        nonlocal last_comm
        if isinstance(event, StepFinished):
            comm = workers.comm_seconds - last_comm
            last_comm = workers.comm_seconds
            steps.append(
                {
                    "step": event.step,
                    "phase": event.phase,
                    "seconds": event.seconds,
                    "comm_seconds": comm,
                    # FIVE's adaptations of all the step's teachers, summed over ranks.
                    "recovery_seconds": event.recovery_seconds,
                }
            )

    with tempfile.TemporaryDirectory() as work:
        run_round(
            _teachers(),
            bench_config(args.steps, args.teachers_per_step),
            Path(work),
            device=device,
            on_event=on_event,
            workers=workers,
            fresh=True,
        )
    everyone = workers.all_gather_objects(steps)
    if workers.is_main:
        Path(args.rank_out).write_text(json.dumps(everyone))
    shutdown()


def _summary(ranks: list[list[dict[str, Any]]], phase: str) -> dict[str, Any]:
    # A step ends when its slowest rank ends: the round's pace is the max over ranks.
    chosen = [[s for s in steps if s["phase"] == phase] for steps in ranks]
    wall = [max(r[i]["seconds"] for r in chosen) for i in range(len(chosen[0]))]
    comm = [sum(s["comm_seconds"] for s in r) for r in chosen]
    seconds = [sum(s["seconds"] for s in r) for r in chosen]
    return {
        "steps": len(wall),
        "seconds_per_step": math.fsum(wall) / len(wall),
        "steps_per_second": len(wall) / math.fsum(wall),
        "comm_share_by_rank": [c / s for c, s in zip(comm, seconds, strict=True)],
        "five_seconds_per_step": math.fsum(s["recovery_seconds"] for s in chosen[0]) / len(wall),
    }


def _launch(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rank_out = Path(tmp) / "ranks.json"
        command = launcher_command(
            workers,
            [
                __file__,
                "--rank",
                "--rank-out",
                str(rank_out),
                "--steps",
                str(args.steps),
                "--teachers-per-step",
                str(args.teachers_per_step),
            ],
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, env=env, check=True)
        ranks = json.loads(rank_out.read_text())
    return {
        "workers": workers,
        "warmup": _summary(ranks, "warmup"),
        "meta": _summary(ranks, "meta"),
        "per_rank_steps": ranks,
    }


def main() -> None:
    """Measure each process count and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--teachers-per-step", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        _rank(args)
        return
    # Wall times on a machine shared with other work: the load says how busy it was.
    load_before = os.getloadavg()[0]
    runs = [_launch(n, args) for n in args.workers]
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    base = runs[0]
    for run in runs:
        for phase in ("warmup", "meta"):
            run[phase]["speedup_vs_first"] = (
                run[phase]["steps_per_second"] / base[phase]["steps_per_second"]
            )
    result = {
        "command": "python benchmarks/distributed_steps.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_start_end": load,
        },
        "torch": torch.__version__,
        "backend": "gloo",
        "config": {
            "steps": args.steps,
            "warmup_steps": 2,
            "teachers_per_step": args.teachers_per_step,
            "learner": f"conv4 width 32, {SIDE}x{SIDE} grey, {WAYS}-way",
            "teachers": f"{TEACHERS} random Conv4 (width 32)",
            "threads_per_rank": 1,
        },
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    for run in runs:
        for phase in ("warmup", "meta"):
            s = run[phase]
            shares = ", ".join(f"{100 * c:.1f}%" for c in s["comm_share_by_rank"])
            print(
                f"{run['workers']} rank(s) {phase:>6}: {s['steps_per_second']:.3f} steps/s "
                f"({s['speedup_vs_first']:.2f}x), communication {shares}"
            )


if __name__ == "__main__":
    main()
