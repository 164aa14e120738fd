"""The ceiling of replay: MAML on REAL meta-train tasks from the engine's start, meta-val only.

If meta-learning on real glyph tasks cannot lift the well-scaled random initialization on
meta-val within the cpu preset's replay budget, no data-free method can be expected to;
if it can, the recovered tasks are what falls short. Same start (the seed's Conv4 at the
chosen scale, norms pinned), same main Adam, the same replay rule and MAML settings as
the cpu preset; only the tasks differ (never meta-test).

    python benchmarks/diagnostics/real_task_maml.py --data data-cache/benchmark \
        --scale 0.2 --steps 26 --out benchmarks/results/diagnostics/real-task-maml.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from free_common.bench.measure import EpisodeSet
from free_common.data import EpisodeSampler, load_split
from free_common.engine import build_learner, preset
from free_common.meta.baselines import random_init
from free_common.meta.bell import outer_optimizer
from free_common.meta.evaluate import evaluate
from free_common.meta.norms import NormPin, rescale_weights, scale_free_weights, weight_norms
from free_common.meta.replay import replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=78, help="replay calls (meta steps)")
    parser.add_argument("--every", type=int, default=13)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val = load_split(args.data, "meta-train"), load_split(args.data, "meta-val")
    config = preset("cpu").for_input(train.channels, train.image_size[0])
    maml = config.bell.maml
    learner = random_init(lambda: build_learner(config.learner), config.seed)
    names = scale_free_weights(learner)
    rescale_weights(learner, names, args.scale)
    optimizer = outer_optimizer(learner, config.bell)
    NormPin(learner, weight_norms(learner, names)).attach(optimizer)
    tasks = EpisodeSampler(train, maml.ways, maml.shots, maml.queries, config.seed + 7)
    counter = itertools.count()
    validation = EpisodeSet(
        EpisodeSampler(val, 5, 1, 15, config.seed), 100, train.channels, train.image_size[0]
    )

    def score() -> float:
        return round(100 * evaluate(learner, validation, config.validation, "meta-val").mean, 2)

    curve = [[0, score()]]
    print(curve[-1], flush=True)
    for step in range(1, args.steps + 1):
        replay(learner, optimizer, lambda: tasks.episode(next(counter)), maml, config.bell.replay)
        if step % args.every == 0 or step == args.steps:
            curve.append([step, score()])
            print(curve[-1], flush=True)
    report = {"scale": args.scale, "tasks": next(counter), "curve": curve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
