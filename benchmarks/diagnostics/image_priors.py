"""FIVE's teacher accuracy on recovered images under image priors (TV, L2, batch-norm), cheaply.

Runs FIVE alone, as a round's warm-up does (no student, no meta-learner, no memory): a
fresh meta-generator from the preset's seed takes `--steps` meta-steps on
`teachers_per_step` teachers drawn from the zoo. Then, as `free-bench run` measures it
(`bench/measure.py`), the warmed-up meta-generator adapts in its k steps, cross-entropy
only, to every teacher of the pool at scratch inversion's batch, and the share of
recovered images each teacher classifies as their label is averaged. Also recorded per
setting: the prior terms of those images (total variation, mean squared pixel, their
mean pixel), the last loss, and the in-run teacher accuracy of the final steps. No
episode of any split is read.

    python benchmarks/diagnostics/image_priors.py --data data-cache/benchmark \
        --zoo data-cache/zoo-bench-mixed-24 --preset cpu --steps 84 \
        --setting base= --setting tv1=tv_weight=1 --setting l2=l2_weight=1 \
        --setting tv1-bn0.05=tv_weight=1,bn_weight=0.05 --out FILE.json [--pictures DIR]

A setting is NAME=FIELD=VALUE[,FIELD=VALUE...] over `FiveConfig` fields (empty: the preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from free_common.bench.run import BENCH_SETTINGS, load_zoo
from free_common.data import load_split
from free_common.engine import preset
from free_common.engine.teachers import TeacherPool
from free_common.inversion.config import FiveConfig
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.losses import l2_prior, total_variation


def parse_setting(text: str, base: FiveConfig) -> tuple[str, FiveConfig]:
    name, _, body = text.partition("=")
    changes: dict[str, float] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        changes[key] = float(value)
    return name, dataclasses.replace(base, **changes)


def save_grid(images: Tensor, path: Path, columns: int) -> None:
    """Write (N, C, S, S) images in [0, 1] as one PNG, `columns` a row, 2 px apart."""
    n, channels, side, _ = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (side + 2), columns * (side + 2), channels), dtype=np.uint8) * 128
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top, left = (i // columns) * (side + 2), (i % columns) * (side + 2)
        canvas[top : top + side, left : left + side] = pixels[i]
    Image.fromarray(canvas[..., 0] if channels == 1 else canvas).resize(
        (canvas.shape[1] * 2, canvas.shape[0] * 2), Image.Resampling.NEAREST
    ).save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=84, help="FIVE meta-steps before measuring")
    parser.add_argument("--setting", action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pictures", type=Path, default=None, help="write recovered-NAME.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_split(args.data, "meta-train")
    config = preset(args.preset).for_input(train.channels, train.image_size[0])
    device = torch.device("cpu")
    zoo = load_zoo(args.zoo, BENCH_SETTINGS[args.preset].max_teachers)
    pool = TeacherPool([z.teacher for z in zoo], config.learner.ways, 1, device)
    by_id = {z.teacher.teacher_id: z for z in zoo}
    pick = np.random.default_rng(0).choice(len(train), size=min(2000, len(train)), replace=False)
    real = torch.from_numpy(train.images[np.sort(pick)]).float().div(255)  # (N, H, W[, 3])
    real = real.unsqueeze(1) if real.dim() == 3 else real.permute(0, 3, 1, 2)  # (N, C, H, W)
    results: dict[str, Any] = {
        "preset": args.preset,
        "zoo": str(args.zoo),
        "steps": args.steps,
        "teachers": len(pool),
        "meta_train_reference": {
            "tv": round(float(total_variation(real)), 5),
            "l2": round(float(l2_prior(real)), 5),
            "mean_pixel": round(float(real.mean()), 4),
        },
        "settings": {},
    }
    print("meta-train", json.dumps(results["meta_train_reference"]), flush=True)
    for text in args.setting:
        name, five = parse_setting(text, config.five)
        started = time.perf_counter()
        meta = MetaGenerator(build_generator(config.generator, config.seed + 1, device), five)
        rng = torch.Generator().manual_seed(config.seed)
        in_run: list[float] = []
        first_terms: dict[str, float] = {}
        for step in range(args.steps):
            views = pool.draw(config.teachers_per_step, rng)
            recoveries = meta.step([v.teacher for v in views], rng)
            if step == 0:
                images = torch.cat([r.images for r in recoveries])
                first_terms = {
                    "first_loss": statistics.fmean(r.losses[0] for r in recoveries),
                    "first_tv": float(total_variation(images)),
                    "first_l2": float(l2_prior(images)),
                }
            if step >= args.steps - 10:
                in_run.extend(r.teacher_accuracy for r in recoveries)
        step_seconds = time.perf_counter() - started
        # The measurement of bench/measure.py: CE only, scratch's batch, every teacher.
        probe = MetaGenerator(
            meta.generator,
            dataclasses.replace(
                five, adv_weight=0.0, images_per_class=config.scratch.images_per_class
            ),
        )
        measure_rng = torch.Generator().manual_seed(config.seed + 2)
        accuracy, tv, l2, mean, last_loss = [], [], [], [], []
        per_arch: dict[str, list[float]] = {}
        shown = []
        for index in range(len(pool)):
            view = pool.view(index, measure_rng)
            recovery, _ = probe.adapt(view.teacher, measure_rng)
            accuracy.append(recovery.teacher_accuracy)
            tv.append(float(total_variation(recovery.images)))
            l2.append(float(l2_prior(recovery.images)))
            mean.append(float(recovery.images.mean()))
            last_loss.append(recovery.losses[-1])
            entry = by_id[view.teacher_id]
            arch = f"{entry.arch}-w{entry.width}"
            per_arch.setdefault(arch, []).append(recovery.teacher_accuracy)
            if len(shown) < 4:
                shown.append(recovery.images[: 2 * config.learner.ways])
        row = {
            "five": {
                k: getattr(five, k) for k in ("tv_weight", "l2_weight", "bn_weight", "ce_weight")
            },
            "teacher_accuracy": round(statistics.fmean(accuracy), 4),
            "teacher_accuracy_by_arch": {
                k: round(statistics.fmean(v), 4) for k, v in sorted(per_arch.items())
            },
            "in_run_teacher_accuracy_last_10_steps": round(statistics.fmean(in_run), 4),
            "tv": round(statistics.fmean(tv), 5),
            "l2": round(statistics.fmean(l2), 5),
            "mean_pixel": round(statistics.fmean(mean), 4),
            "last_loss": round(statistics.fmean(last_loss), 4),
            **{k: round(v, 5) for k, v in first_terms.items()},
            "step_seconds": round(step_seconds, 1),
            "seconds": round(time.perf_counter() - started, 1),
        }
        results["settings"][name] = row
        print(name, json.dumps(row), flush=True)
        if args.pictures is not None:
            args.pictures.mkdir(parents=True, exist_ok=True)
            path = args.pictures / f"recovered-{name}.png"
            save_grid(torch.cat(shown), path, 2 * config.learner.ways)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
