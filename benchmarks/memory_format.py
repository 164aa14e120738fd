"""One FIVE adaptation step with contiguous against channels-last tensors, on this machine.

For each teacher architecture (Conv4, ResNet-10, MLP; untrained, since a step's cost
does not depend on the weights), the teacher is exported with our recipe and converted
as intake converts it; the `cpu` preset's generator then adapts to it (screening's
8 images per class, 5 classes). Each step is timed with generator and teacher both in
one memory format, the formats taking turns so that a change in the machine's load hits
both. With ``--round-zoo`` it also times one `cpu` round over that zoo's first teachers
in the format the code builds (run it at two commits to compare a change).

Usage::

    .venv/bin/python benchmarks/memory_format.py --repeats 5 \\
        --round-zoo data-cache/zoo-bench-conv4-30 --out benchmarks/results/memory-format.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from free_common.bench.run import load_zoo
from free_common.engine.config import preset
from free_common.engine.round import run_round
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher
from free_common.models.backbones import build_backbone
from free_common.models.export import to_onnx
from free_common.models.intake import load_teacher
from free_common.types import ChannelOrder, TaskMetadata

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
ARCHS = ("conv4", "resnet10", "mlp")
STEPS = 10


def _teacher(arch: str) -> AdaptedTeacher:
    """An untrained 5-way teacher of `arch` at 1 x 32 x 32, through export and conversion."""
    task = TaskMetadata(
        num_classes=5,
        input_shape=(1, 32, 32),
        channel_order=ChannelOrder.GRAY,
        mean=(0.5,),
        std=(0.25,),
        class_names=tuple(f"c{i}" for i in range(5)),
    )
    model = build_backbone(arch, 5, 1, 32).eval()
    converted = load_teacher(to_onnx(model, task), already_accepted=True)
    return AdaptedTeacher(converted.module, converted.task, arch)


def time_steps(repeats: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per adaptation step: {arch: {format: [one per repeat]}}."""
    config = preset("cpu").for_input(1, 32)
    five = dataclasses.replace(config.five, images_per_class=8, adapt_steps=STEPS)
    generator = build_generator(config.generator, config.seed + 1, torch.device("cpu"))
    out: dict[str, dict[str, list[float]]] = {}
    for arch in ARCHS:
        teacher = _teacher(arch)
        out[arch] = {name: [] for name in FORMATS}
        for repeat in range(repeats + 1):
            for name, memory_format in FORMATS.items():
                teacher.to(memory_format=memory_format)
                meta = MetaGenerator(copy.deepcopy(generator).to(memory_format=memory_format), five)
                started = time.perf_counter()
                meta.adapt(teacher, torch.Generator().manual_seed(repeat))
                if repeat:  # the first pass warms mkldnn's caches up
                    out[arch][name].append(1000 * (time.perf_counter() - started) / STEPS)
    return out


def time_round(zoo: Path, teachers: int, steps: int) -> float:
    """Seconds of one `cpu` round of `steps` steps over the zoo's first `teachers`."""
    config = preset("cpu").for_input(1, 32)
    config = dataclasses.replace(config, steps=steps, warmup_steps=4, validate_every=10**6)
    chosen = [z.teacher for z in load_zoo(zoo, teachers)]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        run_round(chosen, config, Path(folder), device="cpu")
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--round-zoo", type=Path, help="also time a round over this zoo")
    parser.add_argument("--round-teachers", type=int, default=24)
    parser.add_argument("--round-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    steps = time_steps(args.repeats)
    result: dict[str, Any] = {
        "command": "python benchmarks/memory_format.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        },
        "ms_per_step": steps,
    }
    if args.round_zoo is not None:
        seconds = time_round(args.round_zoo, args.round_teachers, args.round_steps)
        result["round"] = {
            "teachers": args.round_teachers,
            "steps": args.round_steps,
            "seconds": round(seconds, 1),
        }
    args.out.write_text(json.dumps(result, indent=1))
    for arch, by_format in steps.items():
        medians = {name: statistics.median(v) for name, v in by_format.items()}
        line = ", ".join(f"{name} {ms:.0f} ms" for name, ms in medians.items())
        print(f"{arch}: {line} per step")
    if "round" in result:
        print(f"round: {result['round']['seconds']} s")


if __name__ == "__main__":
    main()
