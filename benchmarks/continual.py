"""Continual rounds as models arrive, against one round on the whole pool (issue 13, part 3).

The zoo's first ``--teachers`` teachers arrive ``--arrivals`` at a time. Each arrival starts
a round that warm-starts from the last (`EngineConfig.continual`: it draws only the new
teachers, the earlier ones are replayed from the carried memory) with ``steps / rounds``
steps; the reference is one round of the preset's ``steps`` on all of them, so both take the
same number of meta-learner updates. After every round the release is scored on the same
meta-test episodes (1-shot by default); differences are paired, episode by episode.

    OMP_NUM_THREADS=1 python benchmarks/continual.py --data data-cache/benchmark \
        --zoo data-cache/zoo-bench-conv4-30 --preset cpu --out benchmarks/results/continual
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from free_common.bench.measure import (
    episode_accuracies,
    meta_test_episodes,
    meta_val_episodes,
    paired_difference,
)
from free_common.bench.run import load_zoo
from free_common.data import load_split
from free_common.engine import RoundResult, finished_round, preset, run_round
from free_common.engine.config import EngineConfig
from free_common.meta.evaluate import confidence_interval


def _percent(figure: dict[str, float]) -> dict[str, float]:
    return {k: round(100 * v, 2) for k, v in figure.items()}


def _summary(values: list[float]) -> dict[str, float]:
    mean, ci95 = confidence_interval(values)
    return _percent({"mean": mean, "ci95": ci95})


def _row(result: RoundResult, scores: dict[int, list[float]]) -> dict[str, Any]:
    manifest = result.initialization.manifest
    return {
        "round": result.round,
        "teachers": len(result.teacher_ids),
        "new_teachers": len(manifest["new_teacher_ids"]),
        "seen_teachers": len(manifest["seen_teacher_ids"]),
        "selected_step": result.selected_step,
        "seconds": round(result.seconds, 1),  # the round's own wall time
        "meta_val": [[p.step, round(100 * p.mean, 2)] for p in result.curve],
        "meta_test": {str(s): _summary(v) for s, v in scores.items()},
        "sha256": result.initialization.sha256,
    }


def render(report: dict[str, Any]) -> str:
    """Return the markdown summary of a `results.json` this script wrote."""
    env, single = report["environment"], report["single"]
    lines = [
        "# Continual rounds as models arrive (issue 13, part 3)",
        "",
        f"    OMP_NUM_THREADS=1 {report['command']}",
        "",
        f"torch {env['torch']}, {env['threads']} thread(s) of {env['cpus']} CPUs shared with "
        f"other work (load average {env['load_average_start']:.1f} at the start, "
        f"{env['load_average_end']:.1f} at the end), {env['minutes']} minutes. Preset "
        f"`{report['preset']}`: {len(report['continual'])} continual rounds of "
        f"{report['steps_per_continual_round']} steps against one round of "
        f"{report['steps_single_round']} steps on all the teachers (the same meta-learner "
        "updates in total). Meta-test: the same 5-way episodes for every release, the paper's "
        "test adaptation; ± is the 95% interval.",
        "",
        "| round | teachers (new) | selected step | meta-val curve (step: %) | meta-test "
        "| seconds | seconds / single round |",
        "|---|---|---|---|---|---|---|",
    ]
    shares = report["continual_seconds_over_single"]
    for row, share in [*zip(report["continual"], shares, strict=True), (single, 1.0)]:
        name = f"continual {row['round']}" if row is not single else "single, all teachers"
        curve = ", ".join(f"{step}: {value:.1f}" for step, value in row["meta_val"])
        test = "; ".join(
            f"{shots}-shot {v['mean']:.2f} ± {v['ci95']:.2f}"
            for shots, v in row["meta_test"].items()
        )
        lines.append(
            f"| {name} | {row['teachers']} ({row['new_teachers']}) | {row['selected_step']} "
            f"| {curve} | {test} | {row['seconds']:.0f} | {share:.2f} |"
        )
    lines += ["", "Last continual release minus the single round's, paired by episode:", ""]
    for shots, diff in report["last_minus_single"].items():
        lines.append(f"- {shots}-shot: {diff['mean']:+.2f} ± {diff['ci95']:.2f} points")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--teachers", type=int, default=24)
    parser.add_argument("--arrivals", type=int, default=6, help="teachers per continual round")
    parser.add_argument("--episodes", type=int, default=600, help="meta-test episodes per shot")
    parser.add_argument("--shots", type=int, nargs="+", default=[1])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT/results.md from OUT/results.json"
    )
    args = parser.parse_args()
    if args.render:
        report = json.loads((args.out / "results.json").read_text())
        (args.out / "results.md").write_text(render(report))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    train = load_split(args.data, "meta-train")
    side = train.image_size[0]
    full: EngineConfig = preset(args.preset).for_input(train.channels, side)
    rounds = args.teachers // args.arrivals
    continual = dataclasses.replace(full, steps=full.steps // rounds)
    validation = meta_val_episodes(load_split(args.data, "meta-val"), full)
    test = load_split(args.data, "meta-test")
    episodes = {s: meta_test_episodes(test, full, s, args.episodes) for s in args.shots}
    zoo = [z.teacher for z in load_zoo(args.zoo, args.teachers)]
    args.out.mkdir(parents=True, exist_ok=True)

    def scored(result: RoundResult) -> dict[int, list[float]]:
        model = result.initialization.build_model()
        return {s: episode_accuracies(model, e, full, s) for s, e in episodes.items()}

    rows, last_scores = [], {}
    for index in range(rounds):
        result = run_round(
            zoo[: (index + 1) * args.arrivals],
            continual,
            args.out / "work" / "continual",
            validation=validation,
            device="cpu",
            fresh=index == 0,
        )
        last_scores = scored(result)
        rows.append(_row(result, last_scores))
        print(json.dumps(rows[-1]), flush=True)

    # A finished single round in OUT/work/full is read back, not run again.
    folder = args.out / "work" / "full"
    whole = finished_round(zoo, full, folder, device="cpu") or run_round(
        zoo, full, folder, validation=validation, device="cpu", fresh=True
    )
    whole_scores = scored(whole)
    single = _row(whole, whole_scores)
    print(json.dumps(single), flush=True)

    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "preset": args.preset,
        "steps_per_continual_round": continual.steps,
        "steps_single_round": full.steps,
        "continual": rows,
        "single": single,
        "last_minus_single": {
            str(s): _percent(paired_difference(last_scores[s], whole_scores[s])) for s in args.shots
        },
        "continual_seconds_over_single": [round(r["seconds"] / single["seconds"], 3) for r in rows],
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg()[0],
            "machine": platform.machine(),
            "minutes": round((time.perf_counter() - started) / 60, 1),
        },
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "results.md").write_text(render(report))


if __name__ == "__main__":
    main()
