"""`free-bench run`: every method on the same teachers in one process, and the report.

The methods (DESIGN.md section 4), all from the same random initialization:

``free``         FIVE + BELL with implicit gradient alignment (the method);
``free-no-iga``  the same, with the teachers' distillation gradients summed instead;
``scratch``      each teacher inverted once by a fresh generator (200 steps), then the
                 same BELL training on those images for as many steps;
``distill``      FIVE's recovered images, the teachers distilled into the learner
                 (summed gradients) with no MAML replay: what meta-learning adds;
``average``      the mean of the weights of the teachers that share the meta-learner's
                 architecture and input (skipped, with the reason, when none does; on a
                 mixed zoo the teachers of the learner's architecture only, counted);
``random``       the initialization itself, untrained, at the scale the rounds chose.

Every trained method starts from the same random initialization, whose scale-free
weights are rescaled to the scale meta-val prefers (`EngineConfig.init_scales`), and
selects its state on meta-val episodes, step 0 included; meta-test episodes
(the same for every method) are only read for the final table, and Fashion-MNIST gives
a cross-domain reading. Output: ``results.json``, ``results.md``, ``figures/*.png``,
and each round's folder under ``work/`` (its checkpoints and initialization).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from free_common.bench.figures import line_chart, recovery_sheet
from free_common.bench.measure import (
    TEST_QUERIES,
    EpisodeSet,
    RecoveryReport,
    evaluate_models,
    measure_recovery,
    meta_test_episodes,
    meta_val_episodes,
)
from free_common.bench.report import render_markdown
from free_common.data import EpisodeSampler, ImageSet, load_fashion_mnist, load_split, to_tensor
from free_common.durable import write_synced
from free_common.engine import (
    EngineConfig,
    EngineEvent,
    EngineTeacher,
    RoundResult,
    build_learner,
    finished_round,
    preset,
    resolve_device,
    run_round,
)
from free_common.engine.distributed import Workers, current, shutdown
from free_common.errors import ArchitectureMismatch, ConfigError, DataError
from free_common.meta.baselines import random_init, weight_average
from free_common.meta.config import EvalConfig
from free_common.meta.norms import rescale_weights, scale_free_weights
from free_common.models.backbones import BACKBONES
from free_common.models.intake import load_teacher

__all__ = [
    "BENCH_SETTINGS",
    "METHODS",
    "BenchRequest",
    "BenchSettings",
    "ZooTeacher",
    "load_zoo",
    "random_at_scale",
    "run_benchmark",
]

METHODS = ("free", "free-no-iga", "scratch", "distill", "average", "random")
_SHOTS = (1, 5)


@dataclass(frozen=True)
class BenchSettings:
    """How much a preset evaluates (the engine preset says how it trains).

    Attributes
    ----------
    test_episodes
        Meta-test episodes per shot count (600 in the paper).
    cross_episodes
        Fashion-MNIST episodes per shot count.
    figure_teachers
        Teachers drawn in the recovery pictures.
    figure_images
        Images per class in each block of those pictures.
    max_teachers
        Teachers taken from the zoo (the first by name; None: all). Scratch inversion
        costs 200 generator steps per teacher, which bounds the pool on a CPU.
    """

    test_episodes: int
    cross_episodes: int
    figure_teachers: int = 6
    figure_images: int = 4
    max_teachers: int | None = None


BENCH_SETTINGS = {
    "smoke": BenchSettings(test_episodes=60, cross_episodes=30, figure_teachers=3),
    "cpu": BenchSettings(test_episodes=600, cross_episodes=100, max_teachers=24),
    "paper": BenchSettings(test_episodes=600, cross_episodes=600),
}


@dataclass(frozen=True)
class BenchRequest:
    """What `free-bench run` was asked to do.

    ``rounds_only`` runs just those trained methods' rounds into ``OUT/work/`` and stops
    (no measurement, no report), so rounds can run in parallel processes;
    ``reuse_rounds`` takes each round that ``OUT/work/METHOD`` finished with the same
    teachers and settings instead of running it again; ``skip`` leaves trained
    methods out (``free`` cannot be), and the report says so.
    """

    preset: str
    data: Path
    zoo: Path
    out: Path
    device: str = "auto"
    seed: int | None = None
    command: str = ""
    rounds_only: tuple[str, ...] = ()
    reuse_rounds: bool = False
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZooTeacher:
    """A teacher of the zoo folder: the engine's view and what its JSON says."""

    teacher: EngineTeacher
    arch: str | None
    class_names: tuple[str, ...]
    width: int | None = None


Notify = Callable[[str, EngineEvent | str], None]


def load_zoo(folder: Path, limit: int | None = None) -> list[ZooTeacher]:
    """Load the ``<name>.onnx`` of a zoo folder (with its ``<name>.json``), sorted by name.

    The zoo is the benchmark's own export, so intake's static checks and the
    conversion run here, not the sandboxed worker the server runs on submissions.

    Raises
    ------
    ConfigError
        No models in the folder.
    """
    paths = sorted(folder.glob("*.onnx"))[:limit]
    if not paths:
        raise ConfigError(
            f"no .onnx teachers in {folder}; build a zoo with: free-bench zoo --data DIR "
            f"--models N --out {folder}"
        )
    loaded = []
    for path in paths:
        converted = load_teacher(path.read_bytes(), already_accepted=True)
        sidecar = path.with_suffix(".json")
        record: dict[str, Any] = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        names = tuple(record.get("class_names") or converted.task.class_names)
        teacher = EngineTeacher(path.stem, converted.module, converted.task)
        loaded.append(ZooTeacher(teacher, record.get("arch"), names, record.get("width")))
    return loaded


def run_benchmark(
    request: BenchRequest, notify: Notify | None = None, workers: Workers | None = None
) -> dict[str, Any]:
    """Run every method, measure, draw, and write results.json and results.md.

    Parameters
    ----------
    request
        Preset, folders, device, seed and the command line to record.
    notify
        Receives (method, engine event or a message) as the run goes.
    workers
        The processes each round runs on (default: the initialized process group, else
        this one). Every rank calls this; the rounds are shared, and rank 0 alone writes
        the initializations, measures, evaluates and reports.

    Returns
    -------
    dict
        The results.json document (other ranks: the rounds' initialization hashes).
    """
    workers = workers or current()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    tell: Notify = notify or (lambda _method, _event: None)
    settings = BENCH_SETTINGS.get(request.preset)
    if settings is None:
        raise ConfigError(f"unknown preset {request.preset!r}; choose one of smoke, cpu, paper")
    splits = {
        name: load_split(request.data, name) for name in ("meta-train", "meta-val", "meta-test")
    }
    train = splits["meta-train"]
    side = train.image_size[0]
    config = preset(request.preset).for_input(train.channels, side)
    if request.seed is not None:
        config = dataclasses.replace(config, seed=request.seed)
    device = resolve_device(request.device)
    zoo = load_zoo(request.zoo, settings.max_teachers)
    available = len(list(request.zoo.glob("*.onnx")))
    teachers = [z.teacher for z in zoo]
    validation = meta_val_episodes(splits["meta-val"], config)
    timings: dict[str, float] = {}
    rounds: dict[str, RoundResult] = {}
    variants = {
        "free": config,
        "free-no-iga": config.with_iga(False),
        "scratch": config.with_recovery("scratch"),
        "distill": config.distillation_only(),
    }
    unknown = (set(request.rounds_only) | set(request.skip)) - set(variants)
    if unknown or "free" in request.skip:
        raise ConfigError(
            f"--rounds and --skip take trained methods ({', '.join(variants)}; free cannot be "
            f"skipped), not {sorted(unknown or {'free'})}"
        )
    for method, variant in variants.items():
        if method in request.skip or (request.rounds_only and method not in request.rounds_only):
            continue
        clock = time.perf_counter()
        workdir = request.out / "work" / method
        reused = (
            finished_round(teachers, variant, workdir, device=device)
            if (request.reuse_rounds)
            else None
        )
        if reused is not None:
            tell(method, f"reusing the round finished in {workdir}")
            rounds[method] = reused
            timings[f"{method} round (earlier process)"] = reused.seconds
            continue
        rounds[method] = run_round(
            teachers,
            variant,
            workdir,
            validation=validation,
            device=device,
            on_event=_forward(tell, method),
            fresh=True,
            workers=workers,
        )
        if workers.is_main:
            rounds[method].initialization.write(workdir, "init")
        timings[f"{method} round"] = time.perf_counter() - clock
    # The ranks part here: measurement and the report are rank 0's alone, and may
    # outlast any collective's timeout.
    shutdown()
    if request.rounds_only or not workers.is_main:
        return {"rounds": {m: r.initialization.sha256 for m, r in rounds.items()}}

    clock = time.perf_counter()
    tell("recovery", "timing FIVE and scratch recovery on the same teachers")
    recovery = measure_recovery(teachers, rounds["free"], rounds.get("scratch"), config, device)
    timings["recovery measurement"] = time.perf_counter() - clock

    models: dict[str, nn.Module] = {m: r.initialization.build_model() for m, r in rounds.items()}
    skipped = {m: "not run (--skip)" for m in request.skip}
    average = _weight_average(zoo, config, rounds["free"].teacher_ids)
    if isinstance(average, str):
        skipped["average"] = average
    else:
        models["average"], averaged = average
    models["random"] = random_at_scale(config, rounds["free"].init_scale)

    base = dataclasses.replace(
        config.validation, queries=TEST_QUERIES, episodes=settings.test_episodes
    )
    clock = time.perf_counter()
    test = splits["meta-test"]

    def test_episodes(shots: int) -> EpisodeSet:
        return meta_test_episodes(test, config, shots, settings.test_episodes)

    def done(split: str) -> Callable[[str, int, Any], None]:
        return lambda m, s, r: tell(m, f"{split} {s}-shot: {100 * r.mean:.2f} ± {100 * r.ci95:.2f}")

    accuracy = evaluate_models(
        models, test_episodes, base, _SHOTS, "meta-test", device, done("meta-test")
    )
    timings["meta-test evaluation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    cross = _cross_domain(models, base, settings, config, device, done("fashion-mnist"))
    timings["cross-domain evaluation"] = time.perf_counter() - clock

    figures = _draw(request.out, zoo, splits["meta-train"], recovery, rounds, settings)
    timings["total_seconds"] = time.perf_counter() - started
    used = set(rounds["free"].teacher_ids)
    results: dict[str, Any] = {
        "preset": request.preset,
        "device": str(device),
        "command": request.command,
        "recovery": recovery.summary(),
        "accuracy": accuracy,
        "cross_domain": cross,
        "methods": [m for m in METHODS if m in models],
        "skipped_methods": skipped,
        "averaged_teachers": 0 if "average" in skipped else averaged,
        "init_scale": {m: r.init_scale for m, r in rounds.items()},
        "init_scale_scores": rounds["free"].initialization.manifest["metrics"]["init_scale_scores"],
        "curves": {m: [[p.step, p.mean] for p in r.curve] for m, r in rounds.items()},
        "selected_steps": {m: r.selected_step for m, r in rounds.items()},
        "timings": timings,
        "teachers": {
            "count": available,
            "loaded": len(zoo),
            "used": len(used),
            "skipped": [dataclasses.asdict(s) for s in rounds["free"].skipped],
        },
        "data": {
            "dir": str(request.data),
            "classes": {name: split.num_classes for name, split in splits.items()},
            "images": {name: len(split) for name, split in splits.items()},
        },
        "zoo": str(request.zoo),
        "seed": config.seed,
        "config": rounds["free"].initialization.manifest["config"],
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "round_workers": workers.world,
            # Wall times on a machine shared with other work are not comparable across
            # runs: the 1-minute load average at the start and the end says how busy it was.
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "figures": figures,
    }
    _write(request.out / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
    _write(request.out / "results.md", render_markdown(results))
    return results


def _forward(tell: Notify, method: str) -> Callable[[EngineEvent], None]:
    def on_event(event: EngineEvent) -> None:
        tell(method, event)

    return on_event


def random_at_scale(config: EngineConfig, scale: float) -> nn.Module:
    """Build the rounds' starting point: the seed's learner, scale-free weights rescaled."""
    model = random_init(lambda: build_learner(config.learner), config.seed)
    rescale_weights(model, scale_free_weights(model), scale)
    return model


def _weight_average(
    zoo: list[ZooTeacher], config: EngineConfig, used: tuple[str, ...]
) -> tuple[nn.Module, int] | str:
    """Average the teachers that share the learner's architecture and input, or say why not.

    Returns the averaged model and how many teachers went into it.
    """
    spec = config.learner
    shape = (spec.channels, spec.image_size, spec.image_size)
    width = BACKBONES[spec.arch].default_width if spec.width is None else spec.width
    same = [
        z.teacher.module
        for z in zoo
        if z.teacher.teacher_id in used
        and z.arch == spec.arch
        and z.width in (None, width)
        and z.teacher.task.input_shape == shape
        and z.teacher.task.num_classes == spec.ways
    ]
    if not same:
        return (
            f"no teacher is a {spec.arch} on {shape[0]}x{shape[1]}x{shape[2]} inputs with "
            f"{spec.ways} classes, and weight averaging needs the meta-learner's architecture"
        )
    try:
        # Teachers normalize their inputs; batch norm on batch statistics absorbs that shift.
        model = weight_average(same, random_init(lambda: build_learner(spec), config.seed))
    except ArchitectureMismatch as err:
        return err.message
    return model, len(same)


def _cross_domain(
    models: dict[str, nn.Module],
    base: EvalConfig,
    settings: BenchSettings,
    config: EngineConfig,
    device: torch.device,
    on_done: Callable[[str, int, Any], None],
) -> dict[str, Any]:
    """Fashion-MNIST test images, fitted to the learner's input; reported, no target."""
    try:
        fashion = load_fashion_mnist("test")
    except DataError as err:
        return {"dataset": "fashion-mnist", "skipped": err.message}
    spec = config.learner

    def episodes(shots: int) -> EpisodeSet:
        sampler = EpisodeSampler(
            fashion, spec.ways, shots, TEST_QUERIES, config.seed + 2000 + shots
        )
        return EpisodeSet(sampler, settings.cross_episodes, spec.channels, spec.image_size)

    cross_base = dataclasses.replace(base, episodes=settings.cross_episodes)
    rows = evaluate_models(
        models, episodes, cross_base, _SHOTS, "fashion-mnist test", device, on_done
    )
    return {"dataset": "fashion-mnist", "split": "test", "accuracy": rows}


def _real_images(split: ImageSet, names: tuple[str, ...], count: int) -> list[Tensor]:
    index = {name: label for label, name in enumerate(split.class_names)}
    rows = []
    for name in names:
        label = index.get(name)
        if label is None:
            rows.append(torch.zeros(0, 1, 1, 1))
            continue
        members = [i for i, y in enumerate(split.labels.tolist()) if y == label][:count]
        rows.append(to_tensor(split.images[members]))
    return rows


def _per_class(images: Tensor, labels: Tensor, classes: int, count: int) -> list[Tensor]:
    return [images[labels == c][:count] for c in range(classes)]


def _draw(
    out: Path,
    zoo: list[ZooTeacher],
    train: ImageSet,
    recovery: RecoveryReport,
    rounds: dict[str, RoundResult],
    settings: BenchSettings,
) -> dict[str, str]:
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    names = {z.teacher.teacher_id: z.class_names for z in zoo}
    count = settings.figure_images
    for measured in recovery.teachers[: settings.figure_teachers]:
        own = names.get(measured.teacher_id, ())
        classes = measured.classes
        shown = tuple(own[c] if c < len(own) else f"class {c}" for c in classes)
        ways = len(classes)
        blocks = {
            "FIVE, cross-entropy": _per_class(
                measured.five_ce.images, measured.five_ce.labels, ways, count
            ),
            "FIVE, + adversarial": _per_class(
                measured.five_adv.images, measured.five_adv.labels, ways, count
            ),
        }
        scratch = measured.scratch
        if scratch is not None:
            keep = torch.isin(scratch.labels, torch.tensor(classes, device=scratch.labels.device))
            position = {c: i for i, c in enumerate(classes)}
            labels = torch.tensor([position[int(y)] for y in scratch.labels[keep].tolist()])
            blocks["scratch, 200 steps"] = _per_class(
                scratch.images[keep].cpu(), labels, ways, count
            )
        blocks["real"] = _real_images(train, shown, count)
        sheet = recovery_sheet(measured.teacher_id, shown, blocks)
        path = folder / f"recovered-{measured.teacher_id}.png"
        sheet.save(path)
        figures[f"recovered {measured.teacher_id}"] = str(path.relative_to(out))
    chart = line_chart(
        "meta-val accuracy (5-way 1-shot) during training",
        {m: [(float(p.step), p.mean) for p in r.curve] for m, r in rounds.items()},
    )
    path = folder / "meta-val-curves.png"
    chart.save(path)
    figures["meta-val curves"] = str(path.relative_to(out))
    return figures


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synced(path, text.encode())
