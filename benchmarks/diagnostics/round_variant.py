"""One engine round of a preset with overrides, scored on meta-val only: the findings' experiments.

Prints and writes the meta-val curve (step 0 included), the selected step, the chosen
initial scale, the norms of the scale-free weights at the start and the end, and the
replay tasks per step. Never reads meta-test.

    python benchmarks/diagnostics/round_variant.py --data data-cache/benchmark \
        --zoo data-cache/zoo-bench-conv4-30 --preset cpu --steps 84 \
        --set bell.pin_norms=false --set init_scales=[1.0] --out FILE
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from free_common.bench.measure import meta_val_episodes
from free_common.bench.run import BENCH_SETTINGS, load_zoo
from free_common.data import load_split
from free_common.engine import EngineEvent, preset, run_round
from free_common.engine.config import EngineConfig
from free_common.engine.events import StepFinished
from free_common.meta.norms import scale_free_weights, weight_norms


def override(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        current = getattr(config, head)
        if isinstance(current, tuple):
            value = tuple(value)
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: override(getattr(config, head), rest, value)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument(
        "--method", default="free", choices=["free", "free-no-iga", "scratch", "distill"]
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="dotted.path=JSON value")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_split(args.data, "meta-train")
    config: EngineConfig = preset(args.preset).for_input(train.channels, train.image_size[0])
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    for item in args.set:
        key, _, raw = item.partition("=")
        config = override(config, key, json.loads(raw))
    if args.method == "free-no-iga":
        config = config.with_iga(False)
    elif args.method == "scratch":
        config = config.with_recovery("scratch")
    elif args.method == "distill":
        config = config.distillation_only()
    validation = meta_val_episodes(load_split(args.data, "meta-val"), config)
    zoo = load_zoo(args.zoo, BENCH_SETTINGS[args.preset].max_teachers)
    tasks: list[int] = []

    def on_event(event: EngineEvent) -> None:
        if isinstance(event, StepFinished) and event.phase == "meta":
            tasks.append(event.replay_tasks)
        print(event, flush=True)

    started = time.perf_counter()
    result = run_round(
        [z.teacher for z in zoo],
        config,
        args.out.with_suffix(".work"),
        validation=validation,
        device=args.device,
        on_event=on_event,
        fresh=True,
    )
    learner = result.learner
    names = scale_free_weights(learner)
    report = {
        "method": args.method,
        "overrides": args.set,
        "steps": config.steps,
        "curve": [[p.step, round(100 * p.mean, 2)] for p in result.curve],
        "selected_step": result.selected_step,
        "init_scale": result.init_scale,
        "init_scale_scores": result.initialization.manifest["metrics"]["init_scale_scores"],
        "final_norms": weight_norms(learner, names),
        "replay_tasks_per_step": sum(tasks) / max(1, len(tasks)),
        "seconds": round(time.perf_counter() - started, 1),
        "device": result.initialization.manifest["device"],
    }
    print(json.dumps(report), flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
