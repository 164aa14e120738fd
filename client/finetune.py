"""`free-client finetune`: adapt a release to the owner's own new tasks, and export one.

Reads a release folder (``meta.safetensors`` + ``manifest.json``, from
`free-client fetch` or ``KEYDIR/releases/<version>/`` of `free-client join`),
checks the weights against the manifest and, with ``--server-pub``, the
server's signature (`free_common.security.release_dir.load_release`), and rebuilds the
meta-learner from the manifest's architecture. Then:

1. scoring: ``--episodes`` seeded ``--ways``-way ``--shots``-shot tasks drawn
   from the owner's class folders (``DATA/<class>/<images>``, the layout of
   `free_client.local_tasks`); on each, the release is adapted to the support
   images as ``--protocol`` says and scored on the queries. The result is the
   mean query accuracy and its 95% interval.

   - ``auto`` (the default): the strategy (Proto-MAML-style fine-tuning, plain
     fine-tuning, a linear probe or the nearest centroid on frozen features), its
     steps and its lr are chosen on each task's support set alone, by k-fold on the
     support images or, at 1 shot, on shifted copies of them
     (`free_common.meta.adaptation`);
   - ``paper``: FREE's protocol, the whole network fine-tuned from the release
     with ``--steps`` plain gradient steps at ``--lr`` (10 at 0.01), what
     `free-bench run` reports;
   - ``proto-finetune``, ``finetune``, ``linear-probe``, ``centroid``: that
     strategy, its steps and lr chosen on the support set.

   Batch norm runs on batch statistics. ``--random-init`` scores a random
   initialization of the same architecture, at the scale the release's training
   started from (its ``init_scale`` metric), instead, on the same tasks
   (``--seed``): the baseline a release should beat. ``--ways`` other than the
   release's is allowed for every protocol but ``paper``: the prototype head has
   one output per class, and ``finetune`` draws a head afresh.
2. ``--export OUT.onnx``: adapts to every image of ``DATA`` as one task whose
   classes are its folders (there must be exactly ``--ways``), with the same
   protocol (chosen by k-fold on those images), sets the batch norms' running
   statistics from those images, and writes the model with its task metadata
   (`free_client.adapted_model`), ready for `free-client inspect` and `submit`.

``--json`` prints::

    {"release": {"version", "architecture", "sha256", "server_key_id",
                 "signature_verified"},
     "initialization": "release" | "random",
     "data": {"path", "classes", "images"},
     "score": {"accuracy", "ci95", "episodes", "ways", "shots", "queries",
               "steps", "lr", "seed"},
     "adaptation": {"protocol", "heldout", "chosen", "selection_scores"},
     "export": null | {"path", "classes", "fit_accuracy", "size", "sha256",
                       "chosen", "selection_scores"}}

``queries`` is the number of query images per class actually used: at most
``--queries``, fewer when the folders are small. ``steps`` and ``lr`` are the
paper protocol's (null for the others, which choose per task). ``chosen`` counts
the tasks each setting was chosen on (``"proto-finetune 10 steps lr 0.1"``,
``"centroid"``...), ``selection_scores`` is each setting's mean held-out accuracy on
the support sets, the reason it was chosen, and ``heldout`` says how support images
were held out (``"3-fold"``, ``"4 shifted views"``); all empty for ``paper``.
``fit_accuracy`` is the exported model's accuracy on the images it was tuned on
(a check, not a test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from free_client.options import pinned_key
from free_common.console import out_console, progress
from free_common.durable import write_synced
from free_common.errors import ConfigError, SplitError

if TYPE_CHECKING:
    from free_common.meta.adaptation import Protocol

__all__ = ["finetune"]


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synced(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write --export {path}: {exc.strerror or exc}") from None


def _show(text: str) -> None:
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def finetune(
    release_dir: Annotated[
        Path,
        typer.Argument(
            help="Release folder (meta.safetensors + manifest.json) from fetch or join.",
            show_default=False,
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="Your class folders: DATA/<class>/<images>.", show_default=False
        ),
    ],
    ways: Annotated[
        int | None,
        typer.Option("--ways", min=2, help="Classes per task; default the release's (5)."),
    ] = None,
    shots: Annotated[int, typer.Option("--shots", min=1, help="Support images per class.")] = 5,
    queries: Annotated[
        int, typer.Option("--queries", min=1, help="Query images per class (at most).")
    ] = 15,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="auto: strategy, steps and lr chosen on each support set; paper: FREE's"
            " 10 full-network steps at lr 0.01; or one strategy: proto-finetune, finetune,"
            " linear-probe, centroid.",
        ),
    ] = "auto",
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Paper protocol: steps (10).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", min=0.0, help="Paper protocol: learning rate (0.01).")
    ] = None,
    episodes: Annotated[
        int, typer.Option("--episodes", min=1, help="Tasks to score the release on.")
    ] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the tasks (and --random-init).")] = 0,
    server_pub: Annotated[
        Path | None,
        typer.Option(
            "--server-pub", help="The aggregator's server.pub: check the release's signature too."
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="Score a random initialization of the release's architecture (at the scale"
            " its training started from) instead.",
        ),
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export", help="Fine-tune on all of DATA (exactly --ways classes); write this ONNX."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Adapt a release to new tasks from your class folders; report accuracy; export one."""
    # torch loads only once the options are known to be usable.
    from free_client.adapted_model import export_adapted, export_strategy, fit_all_classes
    from free_client.local_tasks import load_class_folders, score_model
    from free_common.engine.release_model import (
        load_learner,
        release_architecture,
        release_init_scale,
    )
    from free_common.meta.adaptation import PAPER, Candidate
    from free_common.security.release_dir import load_release

    chosen = _protocol(protocol, steps, lr)
    paper = Candidate("finetune", steps or PAPER.steps, PAPER.lr if lr is None else lr)
    pinned = pinned_key(server_pub)
    release, weights = load_release(release_dir, pinned)
    architecture = release_architecture(release)
    model, spec = load_learner(
        None if random_init else weights,
        architecture,
        seed=seed,
        init_scale=release_init_scale(release),
    )
    if ways is not None and ways != spec.ways and chosen == "paper":
        raise ConfigError(
            f"release {release.version} learns {spec.ways}-way tasks (its head has {spec.ways}"
            f" outputs): use --ways {spec.ways}, or a protocol other than paper"
        )
    ways = spec.ways if ways is None else ways
    images = load_class_folders(data, spec.channels, spec.image_size)
    if export is not None and images.num_classes != ways:
        raise SplitError(
            f"--export adapts one {ways}-class model to every class in --data, but"
            f" {data} has {images.num_classes}: give a folder with exactly {ways} classes"
            " (or that many --ways)"
        )
    signature = "verified with" if pinned is not None else "NOT checked (give --server-pub);"
    if not as_json:
        _show(
            f"release {release.version} ({release.architecture}, {spec.ways}-way,"
            f" {spec.channels}x{spec.image_size}x{spec.image_size}): weights match the manifest,"
            f" signature {signature} server key {release.server_key_id}"
        )
        _show(f"data: {images.num_classes} classes, {len(images)} images in {data}")
    start = "random initialization" if random_init else f"release {release.version}"
    with progress(f"adapting {start} to your tasks ({chosen})", episodes) as advance:
        score = score_model(
            model,
            ways,
            images,
            shots=shots,
            queries=queries,
            episodes=episodes,
            seed=seed,
            protocol=chosen,
            paper=paper,
            on_episode=lambda: advance(1),
        )
    if not as_json:
        how = (
            f"{paper.steps} steps at lr {paper.lr:g}"
            if chosen == "paper"
            else _chosen(score.chosen)
        )
        _show(
            f"{start}: {score.ways}-way {score.shots}-shot accuracy {score.accuracy:.1%}"
            f" +- {score.ci95:.1%} over {score.episodes} tasks ({score.queries} queries per"
            f" class; protocol {chosen}: {how})"
        )
    exported: dict[str, Any] | None = None
    if export is not None:
        if chosen == "paper":
            fit = fit_all_classes(model, images, steps=paper.steps, lr=paper.lr)
            adapted, selection = model, None
        else:
            adapted, selection, fit = export_strategy(model, images, chosen, seed=seed)
        onnx_bytes = export_adapted(
            adapted, dataclasses.replace(spec, ways=ways), images.class_names
        )
        _write_atomic(export, onnx_bytes)
        exported = {
            "path": str(export),
            "classes": list(images.class_names),
            "fit_accuracy": fit,
            "size": len(onnx_bytes),
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "chosen": None if selection is None else selection[0],
            "selection_scores": {} if selection is None else selection[1],
        }
        if not as_json:
            _show(
                f"exported {export} ({len(onnx_bytes):,} bytes): {ways} classes"
                f" ({', '.join(images.class_names)}), accuracy {fit:.1%} on the images it was"
                f" tuned on"
                + ("" if selection is None else f" ({selection[0]})")
                + f"; check it with `free-client inspect {export}`"
            )
    if as_json:
        report = {
            "release": {
                "version": release.version,
                "architecture": release.architecture,
                "sha256": release.payload_sha256,
                "server_key_id": release.server_key_id,
                "signature_verified": pinned is not None,
            },
            "initialization": "random" if random_init else "release",
            "data": {"path": str(data), "classes": images.num_classes, "images": len(images)},
            "score": {
                "accuracy": score.accuracy,
                "ci95": score.ci95,
                "episodes": score.episodes,
                "ways": score.ways,
                "shots": score.shots,
                "queries": score.queries,
                "steps": paper.steps if chosen == "paper" else None,
                "lr": paper.lr if chosen == "paper" else None,
                "seed": seed,
            },
            "adaptation": {
                "protocol": chosen,
                "heldout": score.heldout,
                "chosen": score.chosen,
                "selection_scores": score.selection_scores,
            },
            "export": exported,
        }
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))


def _protocol(name: str, steps: int | None, lr: float | None) -> Protocol:
    """Check ``--protocol`` and that ``--steps``/``--lr`` go with the paper's only."""
    from free_common.meta.adaptation import PROTOCOLS

    protocol = next((p for p in PROTOCOLS if p == name), None)
    if protocol is None:
        raise ConfigError(f"--protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol != "paper" and (steps is not None or lr is not None):
        raise ConfigError(
            f"--steps and --lr set the paper protocol's fine-tuning; --protocol {protocol}"
            " chooses them on each support set: drop them, or add --protocol paper"
        )
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr {lr} must be positive")
    return protocol


def _chosen(counts: dict[str, int]) -> str:
    """'centroid on 12 tasks, finetune 10 steps lr 0.1 on 8': the most chosen first."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{label} on {n} task{'s' * (n != 1)}" for label, n in ranked)
