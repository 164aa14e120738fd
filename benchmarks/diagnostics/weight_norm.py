"""Is few-shot accuracy under the benchmark's protocol a function of weight norm?

Batch norm on batch statistics makes every conv weight of a Conv4 scale-free: scaling
it by c leaves the forward pass as it is, but fine-tuning at a fixed lr (10 steps at
0.01) turns it c^-2 times faster. This scores, on the same 1-shot meta-val episodes
(never meta-test):

- a random initialization with its conv weights scaled by c;
- the weight average of the zoo's teachers, as it is and with its conv weights
  rescaled to c times the random initialization's norms;
- single teachers' weights as initializations, rescaled the same way.

    python benchmarks/diagnostics/weight_norm.py --data data-cache/benchmark \
        --zoo data-cache/zoo-bench-conv4-30 --out benchmarks/results/diagnostics/weight-norm.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from free_common.bench.measure import EpisodeSet
from free_common.bench.run import load_zoo
from free_common.data import EpisodeSampler, load_split
from free_common.engine import build_learner
from free_common.engine.config import LearnerSpec
from free_common.meta.baselines import random_init, weight_average
from free_common.meta.config import EvalConfig
from free_common.meta.evaluate import evaluate
from free_common.meta.norms import NormPin, scale_free_weights, weight_norms

SCALES = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1)


def at_norms(model: nn.Module, targets: dict[str, float]) -> nn.Module:
    """Rescale each scale-free weight of `model` to the given norm."""
    NormPin(model, targets).project()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--teachers", type=int, default=24)
    parser.add_argument("--singles", type=int, default=3, help="teachers scored one by one")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    val = load_split(args.data, "meta-val")
    spec = LearnerSpec(channels=val.channels, image_size=val.image_size[0])
    config = EvalConfig(shots=1, episodes=args.episodes)
    sampler = EpisodeSampler(val, 5, 1, 15, 42)
    episodes = EpisodeSet(sampler, args.episodes, val.channels, spec.image_size)

    def fresh() -> nn.Module:
        return random_init(lambda: build_learner(spec), 42)

    def score(model: nn.Module) -> float:
        return round(100 * evaluate(model, episodes, config, "meta-val").mean, 2)

    names = scale_free_weights(fresh())
    base = weight_norms(fresh(), names)
    zoo = load_zoo(args.zoo, args.teachers)
    modules = [z.teacher.module for z in zoo]
    report: dict[str, object] = {"episodes": args.episodes, "random_norms": base}
    average = weight_average(modules, fresh())
    report["average_norms"] = weight_norms(average, names)
    report["average as it is"] = score(average)
    for c in SCALES:
        targets = {n: c * v for n, v in base.items()}
        report[f"random x{c}"] = score(at_norms(fresh(), targets))
        report[f"average at random x{c}"] = score(
            at_norms(weight_average(modules, fresh()), targets)
        )
        for i in range(args.singles):
            single = weight_average([modules[i]], fresh())
            report[f"teacher {i} at random x{c}"] = score(at_norms(single, targets))
        print({k: v for k, v in report.items() if f"x{c}" in k}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
