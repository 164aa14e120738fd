"""Is few-shot accuracy under the benchmark's protocol a function of weight norm?

Scores, on the same meta-val episodes, a random initialization with every conv weight
scaled by c (BN makes the forward pass blind to c, fine-tuning is not), and the weight
average of the zoo's teachers before and after rescaling its conv weights to the norm
of the random initialization. Writes a JSON of the figures.

    python benchmarks/diagnostics/weight_norm.py --data data-cache/benchmark \
        --zoo data-cache/zoo-bench-conv4-30 --teachers 24 --out FILE
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


def conv_norms(model: nn.Module) -> list[float]:
    return [float(m.weight.norm()) for m in model.modules() if isinstance(m, nn.Conv2d)]


def rescale(model: nn.Module, factors: list[float]) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, f in zip(convs, factors, strict=True):
            conv.weight.mul_(f)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--teachers", type=int, default=24)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    val = load_split(args.data, "meta-val")
    spec = LearnerSpec(channels=val.channels, image_size=val.image_size[0])
    config = EvalConfig(shots=args.shots, episodes=args.episodes)
    episodes = EpisodeSet(
        EpisodeSampler(val, 5, args.shots, 15, 42), args.episodes, val.channels, spec.image_size
    )

    def score(model: nn.Module) -> float:
        return round(100 * evaluate(model, episodes, config, "meta-val").mean, 2)

    rows: dict[str, object] = {}
    base = random_init(lambda: build_learner(spec), 42)
    rows["random norms"] = conv_norms(base)
    for c in (2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05):
        model = rescale(random_init(lambda: build_learner(spec), 42), [c] * 4)
        rows[f"random x{c}"] = score(model)
        print(f"random x{c}", rows[f"random x{c}"], flush=True)
    zoo = load_zoo(args.zoo, args.teachers)
    avg = weight_average(
        [z.teacher.module for z in zoo], random_init(lambda: build_learner(spec), 42)
    )
    rows["average norms"] = conv_norms(avg)
    rows["average"] = score(avg)
    print("average", rows["average"], rows["average norms"], flush=True)
    factors = [r / a for r, a in zip(rows["random norms"], rows["average norms"], strict=True)]  # type: ignore[arg-type]
    rows["average at random's norm"] = score(rescale(avg, factors))
    print("average at random norm", rows["average at random's norm"], flush=True)
    teacher = zoo[0].teacher.module
    rows["one teacher norms"] = conv_norms(teacher)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
