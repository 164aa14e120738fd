"""`free-bench adapt`: every adaptation protocol on the same tasks, for a release and random init.

For each domain (the glyph set's split, and Fashion-MNIST as a second, real-photo
domain) and each task shape (5-way 1-shot, 5-way 5-shot, 20-way 1-shot by default),
the same seeded tasks are adapted to by every protocol of
`free_common.meta.adaptation` (``auto``, ``paper`` and each strategy), starting from
the release and from a random initialization of its architecture drawn as
`free-client finetune --random-init` draws it (at the release's ``init_scale``).
Reported: each protocol's mean query accuracy with its 95% interval, what it chose
and why (mean held-out scores on the support sets), and paired differences on the
same tasks: ``auto`` minus ``paper``, and release minus random init under each.

``--split meta-val`` (Fashion-MNIST ``train``) is for choosing defaults;
``--split meta-test`` (Fashion-MNIST ``test``) reports them.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from free_common.bench.measure import EpisodeSet, paired_difference
from free_common.data import EpisodeSampler, ImageSet, load_fashion_mnist, load_split
from free_common.durable import write_synced
from free_common.engine.release_model import (
    load_learner,
    release_architecture,
    release_init_scale,
)
from free_common.errors import ConfigError
from free_common.meta.adaptation import (
    PROTOCOLS,
    Protocol,
    ProtocolScore,
    SelectionConfig,
    score_protocols,
)
from free_common.security.release_dir import load_release

__all__ = ["AdaptRequest", "TaskShape", "parse_shapes", "run_adaptation"]

_FASHION_SPLIT = {"meta-val": "train", "meta-test": "test"}


@dataclass(frozen=True)
class TaskShape:
    """N-way K-shot, Q queries per class."""

    ways: int
    shots: int
    queries: int = 15

    @property
    def label(self) -> str:
        """Return ``5-way 1-shot``."""
        return f"{self.ways}-way {self.shots}-shot"


def parse_shapes(text: str) -> tuple[TaskShape, ...]:
    """Parse ``5x1,5x5,20x1`` (ways x shots).

    Raises
    ------
    ConfigError
        Not a comma-separated list of WAYSxSHOTS with ways >= 2 and shots >= 1.
    """
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        ways, _, shots = part.partition("x")
        if not (ways.isdigit() and shots.isdigit()) or int(ways) < 2 or int(shots) < 1:
            raise ConfigError(f"--shapes {part!r} is not WAYSxSHOTS, e.g. 5x1,5x5,20x1")
        shapes.append(TaskShape(int(ways), int(shots)))
    if not shapes:
        raise ConfigError("--shapes is empty; give e.g. 5x1,5x5,20x1")
    return tuple(shapes)


@dataclass(frozen=True)
class AdaptRequest:
    """What `free-bench adapt` was asked to measure."""

    release: Path
    data: Path
    out: Path
    split: str = "meta-test"
    shapes: tuple[TaskShape, ...] = (TaskShape(5, 1), TaskShape(5, 5), TaskShape(20, 1))
    episodes: int = 30
    seed: int = 0
    server_pub: Ed25519PublicKey | None = None
    release_source: str = ""
    command: str = ""


def run_adaptation(
    request: AdaptRequest, tell: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure every protocol on the same tasks; write ``results.json`` and ``results.md``.

    Raises
    ------
    ConfigError
        An unknown split, or a release that cannot be read or rebuilt.
    DataError
        A split or Fashion-MNIST that is missing, or too small for a task shape.
    """
    if request.split not in _FASHION_SPLIT:
        raise ConfigError(f"--split {request.split!r}: use meta-val (to choose) or meta-test")
    say = tell or (lambda _text: None)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    release, weights = load_release(request.release, request.server_pub)
    architecture = release_architecture(release)
    scale = release_init_scale(release)
    models = {
        "release": load_learner(weights, architecture)[0],
        "random": load_learner(None, architecture, seed=request.seed, init_scale=scale)[0],
    }
    _, spec = load_learner(weights, architecture)
    domains = {
        f"glyphs {request.split}": load_split(request.data, request.split),
        f"fashion-mnist {_FASHION_SPLIT[request.split]}": load_fashion_mnist(
            _FASHION_SPLIT[request.split]
        ),
    }
    config = SelectionConfig(seed=request.seed)
    rows: list[dict[str, Any]] = []
    for (domain, images), asked in ((d, s) for d in domains.items() for s in request.shapes):
        # Fashion-MNIST has 10 classes: a wider shape takes them all.
        shape = dataclasses.replace(asked, ways=min(asked.ways, images.num_classes))
        tasks = _tasks(images, shape, request, spec.channels, spec.image_size)
        scored: dict[str, dict[Protocol, ProtocolScore]] = {}
        for init, model in models.items():
            clock = time.perf_counter()
            scored[init] = score_protocols(model, tasks, shape.ways, PROTOCOLS, config)
            auto, paper = scored[init]["auto"], scored[init]["paper"]
            say(
                f"{domain} {shape.label} {init}: auto {100 * auto.mean:.1f} ± "
                f"{100 * auto.ci95:.1f}, paper {100 * paper.mean:.1f} ± {100 * paper.ci95:.1f}"
                f" ({time.perf_counter() - clock:.0f} s)"
            )
        rows.append(_row(domain, shape, scored))
    results: dict[str, Any] = {
        "command": request.command,
        "release": {
            "path": str(request.release),
            "source": request.release_source,
            "version": release.version,
            "sha256": release.payload_sha256,
            "architecture": architecture,
            "init_scale": scale,
            "signature_verified": request.server_pub is not None,
        },
        "split": request.split,
        "episodes": request.episodes,
        "seed": request.seed,
        "protocols": list(PROTOCOLS),
        "selection": _selection_settings(config),
        "results": rows,
        "environment": {
            "device": "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            # The machine is shared: the 1-minute load average at the start and the end.
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    _write(request.out / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
    _write(request.out / "results.md", render_markdown(results))
    return results


def _tasks(
    images: ImageSet, shape: TaskShape, request: AdaptRequest, channels: int, side: int
) -> EpisodeSet:
    """Return the seeded tasks of one domain and shape, fitted to the learner's input."""
    seed = request.seed * 1_000 + shape.ways * 10 + shape.shots
    sampler = EpisodeSampler(images, shape.ways, shape.shots, shape.queries, seed)
    return EpisodeSet(sampler, request.episodes, channels, side)


def _row(
    domain: str, shape: TaskShape, scored: dict[str, dict[Protocol, ProtocolScore]]
) -> dict[str, Any]:
    release, random = scored["release"], scored["random"]
    gain: dict[Protocol, list[float]] = {
        p: [a - b for a, b in zip(release[p].accuracies, random[p].accuracies, strict=True)]
        for p in ("auto", "paper")
    }
    return {
        "domain": domain,
        "ways": shape.ways,
        "shots": shape.shots,
        "queries": shape.queries,
        "accuracy": {
            init: {
                protocol: {
                    "mean": score.mean,
                    "ci95": score.ci95,
                    "chosen": dict(score.chosen.most_common()),
                    "heldout": score.heldout,
                    "selection_scores": score.selection_scores,
                }
                for protocol, score in by_protocol.items()
            }
            for init, by_protocol in scored.items()
        },
        "auto_minus_paper": {
            init: paired_difference(by_protocol["auto"].accuracies, by_protocol["paper"].accuracies)
            for init, by_protocol in scored.items()
        },
        "release_minus_random": {
            p: paired_difference(release[p].accuracies, random[p].accuracies) for p in gain
        },
        "gain_auto_minus_gain_paper": paired_difference(gain["auto"], gain["paper"]),
    }


def _selection_settings(config: SelectionConfig) -> dict[str, Any]:
    return {
        "strategies": list(config.strategies),
        "finetune_lrs": list(config.finetune_lrs),
        "finetune_steps": list(config.finetune_steps),
        "probe_lrs": list(config.probe_lrs),
        "probe_steps": list(config.probe_steps),
        "folds": config.folds,
        "views": config.views,
        "shift": config.shift,
    }


def _pct(value: dict[str, float]) -> str:
    return f"{100 * value['mean']:.1f} ± {100 * value['ci95']:.1f}"


def render_markdown(results: dict[str, Any]) -> str:
    """Return ``results.md``: the command, the set-up, one table per domain and shape."""
    env, release = results["environment"], results["release"]
    lines = [
        f"# Adaptation protocols on {results['split']} tasks",
        "",
        f"    {results['command']}",
        "",
        f"- release: version {release['version']}, sha256 `{release['sha256']}`,"
        f" {release['architecture']}, init_scale {release['init_scale']}"
        + (f"; {release['source']}" if release["source"] else ""),
        f"- random init: the release's architecture, seed {results['seed']}, scale-free weights"
        f" at init_scale {release['init_scale']} (as `free-client finetune --random-init`)",
        f"- {results['episodes']} tasks per domain and shape, 15 queries per class, the same"
        " tasks for every protocol and both initializations; ± is the 95% interval"
        " (1.96 std / sqrt(tasks)); differences are paired, task by task",
        f"- device {env['device']}, {env['threads']} torch thread(s), {env['cpus']} CPUs,"
        f" load average {env['load_average'][0]} at the start and {env['load_average'][1]} at"
        f" the end, {env['seconds'] / 60:.1f} min; torch {env['torch']}",
        f"- selection grid: {json.dumps(results['selection'])}",
        "",
    ]
    for row in results["results"]:
        acc = row["accuracy"]
        lines += [
            f"## {row['domain']}, {row['ways']}-way {row['shots']}-shot",
            "",
            "| protocol | release | random init | release − random | chosen most (release) |",
            "|---|---|---|---|---|",
        ]
        for protocol in results["protocols"]:
            rel, rnd = acc["release"][protocol], acc["random"][protocol]
            gap = row["release_minus_random"].get(protocol)
            top = next(iter(rel["chosen"].items()), ("", 0))
            lines.append(
                f"| {protocol} | {_pct(rel)} | {_pct(rnd)} | {_pct(gap) if gap else ''} |"
                f" {top[0]} ({top[1]}/{results['episodes']}) |"
            )
        lines += [
            "",
            f"auto − paper: release {_pct(row['auto_minus_paper']['release'])},"
            f" random init {_pct(row['auto_minus_paper']['random'])}; (release − random) under"
            f" auto minus under paper: {_pct(row['gain_auto_minus_gain_paper'])}",
            "",
        ]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synced(path, text.encode())
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
