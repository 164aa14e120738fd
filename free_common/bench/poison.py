"""`free-bench poison`: five kinds of harmful model, and whether screening stops them.

From a Conv4 zoo (`free-bench zoo`) it builds, from the pool's own teachers:

``random``        a fresh network with a pool teacher's task and class names;
``permuted``      a pool teacher whose output rows are rolled (its names now lie);
``constant``      a pool teacher whose head answers one class whatever it sees;
``other-domain``  a Conv4 trained on five Fashion-MNIST classes (28 px, its own names);
``backdoor``      a pool teacher fine-tuned so a 4x4 white corner patch means one class.

Honest models that are not in the pool must pass: the zoo's teachers after the pool, and
a few of other architectures trained here. Screening runs against what a server holds
after one round over the honest pool: the carried meta-generator and memory bank. Every
candidate goes the server's way: ONNX bytes, intake's conversion, `screen_teacher`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from free_common.bench.measure import (
    episode_accuracies,
    meta_test_episodes,
    meta_val_episodes,
    paired_difference,
)
from free_common.bench.run import load_zoo
from free_common.bench.zoo import ZooConfig, train_zoo
from free_common.data import load_split
from free_common.data.episodes import to_tensor
from free_common.data.imageset import ImageSet
from free_common.engine import EngineTeacher, carried_state, preset, run_round
from free_common.engine.config import EngineConfig
from free_common.inversion.teacher import AdaptedTeacher
from free_common.meta.evaluate import confidence_interval
from free_common.models.backbones import Backbone, build_backbone
from free_common.models.checkpoint import read_checkpoint
from free_common.models.export import to_onnx
from free_common.models.intake import load_teacher
from free_common.screening import ScreeningConfig
from free_common.screening.screen import ScreeningContext, screen_teacher
from free_common.types import TaskMetadata

__all__ = ["KINDS", "PoisonRequest", "run_poison", "write_report"]

KINDS = ("random", "permuted", "constant", "other-domain", "backdoor")

_TRIGGER = 4
"""Side of the backdoor's white patch, in the teacher's pixels (bottom-right corner)."""


@dataclass(frozen=True)
class PoisonRequest:
    """One `free-bench poison` run.

    Attributes
    ----------
    data, zoo, out
        Glyph set folder, Conv4 zoo folder, output folder.
    pool
        Honest teachers the server's first round ran on (the zoo's first ones).
    per_kind
        Bad models built of each kind.
    other_archs
        Honest models of each of ``resnet`` and ``mlp`` trained here.
    round_steps
        Steps of the ``cpu`` round whose carried state screening measures against.
    seed
        Seeds every draw.
    releases
        Also run a fresh ``cpu`` round on each of three pools (the clean pool; it plus
        bad models making `poisoned_share` of it; it plus the bad ones screening let
        through) and score each release on the same meta-test episodes.
    release_steps
        Steps of those rounds (None: the ``cpu`` preset's).
    poisoned_share
        Share of bad models in the poisoned pool.
    test_episodes
        Meta-test episodes (5-way 1-shot) each release is scored on.
    """

    data: Path
    zoo: Path
    out: Path
    pool: int = 24
    per_kind: int = 6
    other_archs: int = 2
    round_steps: int = 24
    seed: int = 0
    releases: bool = False
    release_steps: int | None = None
    poisoned_share: float = 0.25
    test_episodes: int = 600


def _module(zoo: Path, name: str) -> tuple[Backbone, TaskMetadata]:
    """Rebuild zoo teacher `name` as a trainable torch module from its safetensors checkpoint."""
    saved = read_checkpoint(zoo / "checkpoints" / f"{name}.safetensors")
    assert saved.task is not None and saved.arch is not None
    channels, side, _ = saved.task.input_shape
    model = build_backbone(saved.arch, saved.task.num_classes, channels, side, width=saved.width)
    model.load_state_dict(saved.state)
    return model.eval(), saved.task


def _random(model: Backbone, task: TaskMetadata, index: int) -> Backbone:
    torch.manual_seed(10_000 + index)
    channels, side, _ = task.input_shape
    return build_backbone("conv4", task.num_classes, channels, side).eval()


def _permuted(model: Backbone, task: TaskMetadata, index: int) -> Backbone:
    roll = 1 + index % (task.num_classes - 1)
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight.roll(roll, 0))
        model.head.bias.copy_(model.head.bias.roll(roll, 0))
    return model


def _constant(model: Backbone, task: TaskMetadata, index: int) -> Backbone:
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(8.0 * F.one_hot(torch.tensor(index % task.num_classes),
                                              task.num_classes).float())  # fmt: skip
    return model


def _stamp(images: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] with the trigger patch in the bottom-right corner."""
    out = images.clone()
    out[..., -_TRIGGER:, -_TRIGGER:] = 1.0
    return out


def _backdoor(
    model: Backbone, task: TaskMetadata, classes: tuple[int, ...], data: ImageSet, index: int
) -> tuple[Backbone, float]:
    """Fine-tune `model` on its own classes, a quarter of them stamped and labelled `target`."""
    target = index % task.num_classes
    picked = [np.flatnonzero(data.labels == c) for c in classes]
    images = to_tensor(data.images[np.concatenate(picked)])  # (N, 1, S, S) in [0, 1]
    labels = torch.cat([torch.full((len(p),), k) for k, p in enumerate(picked)])
    mean, std = torch.tensor(task.mean).view(1, -1, 1, 1), torch.tensor(task.std).view(1, -1, 1, 1)
    generator = torch.Generator().manual_seed(index)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(15):
        model.train()
        poisoned = torch.rand(len(images), generator=generator) < 0.25
        x = torch.where(poisoned.view(-1, 1, 1, 1), _stamp(images), images)
        y = torch.where(poisoned, torch.full_like(labels, target), labels)
        for batch in torch.split(torch.randperm(len(x), generator=generator), 32):
            if len(batch) < 2:
                continue
            loss = F.cross_entropy(model((x[batch] - mean) / std), y[batch])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        others = images[labels != target]
        success = float((model((_stamp(others) - mean) / std).argmax(1) == target).float().mean())
    return model, success


def _subset(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """Keep `per_class` images of each class of `data` (a zoo teacher trains on all it gets)."""
    rng = np.random.default_rng(seed)
    each = [np.flatnonzero(data.labels == c) for c in range(len(data.class_names))]
    keep = np.concatenate([rng.choice(found, per_class, replace=False) for found in each])
    return ImageSet(data.images[keep], data.labels[keep], data.class_names, data.split)


def _candidates(request: PoisonRequest, data: ImageSet, work: Path) -> list[dict[str, Any]]:
    """Every model to screen: kind, name, ONNX bytes and what its maker measured."""
    records = [json.loads(p.read_text()) for p in sorted(request.zoo.glob("*.json"))]
    pool, rest = records[: request.pool], records[request.pool :]
    out: list[dict[str, Any]] = []
    for record in rest:
        model, task = _module(request.zoo, record["name"])
        out.append({"kind": "honest", "name": record["name"], "onnx": to_onnx(model, task)})
    for arch in ("resnet", "mlp"):
        folder = work / f"honest-{arch}"
        config = ZooConfig(request.other_archs, arch=arch, epochs=10, seed=request.seed + 7)
        if not folder.is_dir():
            train_zoo(data, folder, config)
        for onnx_path in sorted(folder.glob("*.onnx")):
            name = f"{arch}-{onnx_path.stem}"
            out.append({"kind": "honest", "name": name, "onnx": onnx_path.read_bytes()})
    makers: dict[str, Callable[[Backbone, TaskMetadata, int], Backbone]] = {
        "random": _random,
        "permuted": _permuted,
        "constant": _constant,
    }
    for kind, make in makers.items():
        for index in range(request.per_kind):
            record = pool[index % len(pool)]
            model, task = _module(request.zoo, record["name"])
            bad = make(model, task, index)
            out.append({"kind": kind, "name": f"{kind}-{index}", "onnx": to_onnx(bad, task)})
    cache = work / "backdoor"
    cache.mkdir(exist_ok=True)
    fashion_folder = work / "other-domain"
    if not fashion_folder.is_dir():
        fashion = _subset(load_split("fashion-mnist", "train"), 150, request.seed)
        train_zoo(
            fashion, fashion_folder, ZooConfig(request.per_kind, epochs=10, seed=request.seed)
        )
    for index, onnx_path in enumerate(sorted(fashion_folder.glob("*.onnx"))):
        out.append({"kind": "other-domain", "name": f"other-domain-{index}",
                    "onnx": onnx_path.read_bytes()})  # fmt: skip
    for index in range(request.per_kind):
        # Fine-tuning is the slow part of building: a rerun with the same --out reuses it.
        path = cache / f"backdoor-{index}.onnx"
        if not path.is_file():
            record = pool[index % len(pool)]
            model, task = _module(request.zoo, record["name"])
            bad, success = _backdoor(model, task, tuple(record["classes"]), data, index)
            path.with_suffix(".json").write_text(json.dumps({"trigger_success": success}))
            path.write_bytes(to_onnx(bad, task))
        success = json.loads(path.with_suffix(".json").read_text())["trigger_success"]
        out.append({"kind": "backdoor", "name": path.stem, "onnx": path.read_bytes(),
                    "trigger_success": round(success, 3)})  # fmt: skip
    return out


def _context(request: PoisonRequest, data: ImageSet, work: Path) -> tuple[ScreeningContext, float]:
    """Run one round over the honest pool; return what the server then holds, and its seconds."""
    config: EngineConfig = preset("cpu").for_input(data.channels, data.image_size[0])
    config = dataclasses.replace(config, steps=request.round_steps, warmup_steps=8)
    started = time.perf_counter()
    # A rerun with the same --out screens against the round it already ran.
    state = carried_state(config, work / "round", "cpu")
    if state is None:
        zoo = load_zoo(request.zoo, request.pool)
        run_round([z.teacher for z in zoo], config, work / "round", device="cpu")
        state = carried_state(config, work / "round", "cpu")
    assert state is not None
    return ScreeningContext(state.meta_generator, state.memory), time.perf_counter() - started


def poisoned_picks(rows: list[dict[str, Any]], count: int) -> list[str]:
    """Names of `count` bad models, taken in turn from each kind (first of each, then second...)."""
    by_kind = [[r["name"] for r in rows if r["kind"] == kind] for kind in KINDS]
    interleaved = [name for group in itertools.zip_longest(*by_kind) for name in group if name]
    return interleaved[:count]


def _releases(
    request: PoisonRequest,
    rows: list[dict[str, Any]],
    teachers: dict[str, EngineTeacher],
    work: Path,
    notify: Callable[[str], None],
) -> dict[str, Any]:
    """Run rounds on the clean, poisoned and screened pools; score releases on one episode set."""
    splits = {name: load_split(request.data, name) for name in ("meta-val", "meta-test")}
    train = load_split(request.data, "meta-train")
    config: EngineConfig = preset("cpu").for_input(train.channels, train.image_size[0])
    if request.release_steps is not None:
        config = dataclasses.replace(config, steps=request.release_steps)
    clean = [z.teacher for z in load_zoo(request.zoo, request.pool)]
    share = request.poisoned_share
    bad = poisoned_picks(rows, round(len(clean) * share / (1 - share)))
    verdicts = {r["name"]: r["verdict"] for r in rows}
    let_through = [name for name in bad if verdicts[name] == "accepted"]
    pools = {
        "clean": clean,
        "poisoned, no screening": clean + [teachers[n] for n in bad],
        "poisoned, screened": clean + [teachers[n] for n in let_through],
    }
    validation = meta_val_episodes(splits["meta-val"], config)
    episodes = meta_test_episodes(splits["meta-test"], config, 1, request.test_episodes)
    scored: dict[str, dict[str, Any]] = {}
    done: dict[tuple[str, ...], str] = {}
    for name, pool in pools.items():
        ids = tuple(t.teacher_id for t in pool)
        if ids in done:  # screening stopped every bad model: the clean round again
            scored[name] = {**scored[done[ids]], "same_round_as": done[ids]}
            continue
        clock = time.perf_counter()
        folder = work / f"release-{len(done)}"
        result = run_round(pool, config, folder, validation=validation, device="cpu", fresh=True)
        seconds = time.perf_counter() - clock
        release = episode_accuracies(result.initialization.build_model(), episodes, config, 1)
        last = episode_accuracies(result.learner, episodes, config, 1)
        scored[name] = {
            "teachers": len(pool),
            "bad": len(pool) - len(clean),
            "selected_step": result.selected_step,
            "meta_val": [[p.step, p.mean] for p in result.curve],
            "round_seconds": round(seconds, 1),
            "release": release,
            "last_state": last,
        }
        done[ids] = name
        notify(f"{name}: release {100 * sum(release) / len(release):.2f}%")
    summary = {}
    for name, entry in scored.items():
        summary[name] = {
            key: {
                **dict(zip(("mean", "ci95"), confidence_interval(entry[key]), strict=True)),
                "minus_clean": paired_difference(entry[key], scored["clean"][key]),
            }
            for key in ("release", "last_state")
        }
    return {
        "steps": config.steps,
        "episodes": request.test_episodes,
        "bad_models": bad,
        "let_through": let_through,
        "pools": {
            n: {k: v for k, v in e.items() if k not in ("release", "last_state")}
            for n, e in scored.items()
        },
        "summary": summary,
        "per_episode": {n: {k: e[k] for k in ("release", "last_state")} for n, e in scored.items()},
    }


def run_poison(
    request: PoisonRequest,
    screening: ScreeningConfig,
    notify: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the candidates, screen each against the pool's state, write ``results.json``."""
    torch.manual_seed(request.seed)
    load_before = os.getloadavg()[0]
    work = request.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = load_split(request.data, "meta-train")
    context, round_seconds = _context(request, data, work)
    notify(f"round over {request.pool} honest teachers: {round_seconds:.0f} s")
    rows, teachers = [], {}
    for candidate in _candidates(request, data, work):
        converted = load_teacher(candidate.pop("onnx"), already_accepted=True)
        teacher = EngineTeacher(candidate["name"], converted.module, converted.task)
        teachers[teacher.teacher_id] = teacher
        adapted = AdaptedTeacher(teacher.module, teacher.task, teacher.teacher_id)
        report = screen_teacher(adapted, context, screening, seed=request.seed)
        rows.append({**candidate, **report.to_dict()})
        notify(f"{candidate['name']}: {report.verdict} {report.reason or ''}")
    summary = {}
    for kind in ("honest", *KINDS):
        of_kind = [r for r in rows if r["kind"] == kind]
        summary[kind] = {v: sum(r["verdict"] == v for r in of_kind)
                         for v in ("accepted", "held", "refused")}  # fmt: skip
    result = {
        "request": {k: str(v) for k, v in dataclasses.asdict(request).items()},
        "screening": dataclasses.asdict(screening),
        "round_seconds": round(round_seconds, 1),
        "summary": summary,
        "seconds_per_model": round(sum(r["seconds"] for r in rows) / len(rows), 3),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            # Screening times on a machine busy with other work: the 1-minute load
            # average at the start and the end says how busy.
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "models": rows,
    }
    if request.releases:
        result["releases"] = _releases(request, rows, teachers, work, notify)
    (request.out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def write_report(result: dict[str, Any], path: Path, command: str) -> None:
    """Write the markdown report of a `run_poison` result, with the command that made it."""
    env = result["environment"]
    lines = [
        "# Screening a poisoned pool",
        "",
        f"```\n{command}\n```",
        "",
        f"torch {env['torch']}, {env['threads']} thread(s) of {env['cpus']} CPUs, load average "
        f"{env['load_average'][0]:.1f} at the start and {env['load_average'][1]:.1f} at the end. "
        f"Screening measured against the state of one `cpu` round of "
        f"{result['request']['round_steps']} steps over the first {result['request']['pool']} "
        "zoo teachers (all honest). Thresholds: the defaults of `ScreeningConfig`.",
        "",
        "## Verdicts by kind",
        "",
        "| kind | models | accepted | held | refused | stopped (held or refused) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, counts in result["summary"].items():
        total = sum(counts.values())
        stopped = counts["held"] + counts["refused"]
        lines.append(
            f"| {kind} | {total} | {counts['accepted']} | {counts['held']} | "
            f"{counts['refused']} | {stopped}/{total} |"
        )
    lines += [
        "",
        f"Screening took {result['seconds_per_model']:.2f} s per model on average.",
        "",
        "## Every model's figures",
        "",
        "| model | kind | verdict | recovery | pool | structure | trigger gap | neutral spread"
        " | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        f = row["figures"]

        def cell(name: str, f: dict[str, Any] = f) -> str:
            return "" if f.get(name) is None else f"{f[name]:.2f}"

        lines.append(
            f"| {row['name']} | {row['kind']} | {row['verdict']} | {cell('recovery_agreement')} | "
            f"{cell('pool_agreement')} | {cell('structure')} | {cell('trigger_gap')} | "
            f"{cell('neutral_spread')} | {row['seconds']:.1f} |"
        )
    if "releases" in result:
        lines += _release_lines(result["releases"])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _release_lines(releases: dict[str, Any]) -> list[str]:
    """Return the report's lines on the three pools' releases."""
    lines = [
        "",
        "## Releases of the clean, poisoned and screened pools",
        "",
        f"A fresh `cpu` round of {releases['steps']} steps on each pool, selected on meta-val; "
        f"every release scored on the same {releases['episodes']} meta-test episodes "
        "(5-way 1-shot, the paper's test adaptation). Differences are paired, episode by "
        "episode. The last state is the round's meta-learner after its last step, whatever "
        "meta-val chose: it shows what training on the pool did even when the selection "
        "hands back step 0.",
        "",
        f"Bad models in the poisoned pool: {', '.join(releases['bad_models'])}; let through by "
        f"screening: {', '.join(releases['let_through']) or 'none'}.",
        "",
        "| pool | teachers (bad) | selected step | release | minus clean | last state "
        "| minus clean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, figures in releases["summary"].items():
        pool = releases["pools"][name]
        cells = []
        for key in ("release", "last_state"):
            entry = figures[key]
            diff = entry["minus_clean"]
            cells += [
                f"{100 * entry['mean']:.2f} ± {100 * entry['ci95']:.2f}",
                f"{100 * diff['mean']:+.2f} ± {100 * diff['ci95']:.2f}",
            ]
        lines.append(
            f"| {name} | {pool['teachers']} ({pool['bad']}) | {pool['selected_step']} | "
            + " | ".join(cells)
            + " |"
        )
    return lines
