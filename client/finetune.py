"""`free-client finetune`: adapt a release to the owner's own new tasks, and export one.

Reads a release folder (``meta.safetensors`` + ``manifest.json``, from
`free-client fetch` or ``KEYDIR/releases/<version>/`` of `free-client join`),
checks the weights against the manifest and, with ``--server-pub``, the
server's signature (`free_client.release_dir.load_release`), and rebuilds the
meta-learner from the manifest's architecture. Then:

1. scoring: ``--episodes`` seeded ``--ways``-way ``--shots``-shot tasks drawn
   from the owner's class folders (``DATA/<class>/<images>``, the layout of
   `free_client.local_tasks`); on each, the whole network is fine-tuned from
   the release on the support images (``--steps`` plain gradient steps at
   ``--lr``, batch norm on batch statistics) and scored on the queries. The
   result is the mean query accuracy and its 95% interval.
   ``--random-init`` scores a random initialization of the same architecture,
   at the scale the release's training started from (its ``init_scale`` metric),
   instead, on the same tasks (``--seed``): the baseline a release should beat.
2. ``--export OUT.onnx``: fine-tunes on every image of ``DATA`` as one task
   whose classes are its folders (there must be exactly ``--ways``), sets the
   batch norms' running statistics from those images, and writes the model
   with its task metadata (`free_client.adapted_model`), ready for
   `free-client inspect` and `submit`.

``--json`` prints::

    {"release": {"version", "architecture", "sha256", "server_key_id",
                 "signature_verified"},
     "initialization": "release" | "random",
     "data": {"path", "classes", "images"},
     "score": {"accuracy", "ci95", "episodes", "ways", "shots", "queries",
               "steps", "lr", "seed"},
     "export": null | {"path", "classes", "fit_accuracy", "size", "sha256"}}

``queries`` is the number of query images per class actually used: at most
``--queries``, fewer when the folders are small. ``fit_accuracy`` is the
exported model's accuracy on the images it was tuned on (a check, not a test).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from free_client.options import pinned_key
from free_common.console import out_console, progress
from free_common.durable import write_synced
from free_common.errors import ConfigError, SplitError
from free_common.types import ReleaseManifest

__all__ = ["finetune", "release_architecture", "release_init_scale"]


def release_init_scale(release: ReleaseManifest) -> float:
    """Return the scale the release's training started its network at (1 when not recorded).

    A random initialization to compare with is drawn at that scale: batch norm hides it
    from the forward pass, but fine-tuning at a fixed rate does not.
    """
    try:
        scale = json.loads(release.metrics_json).get("init_scale", 1.0)
    except (ValueError, AttributeError):
        return 1.0
    return float(scale) if isinstance(scale, int | float) and scale > 0 else 1.0


def release_architecture(release: ReleaseManifest) -> dict[str, Any]:
    """Return the meta-learner's architecture that the release's config describes.

    Raises
    ------
    ConfigError
        The release says nothing usable about its architecture.
    """
    try:
        config = json.loads(release.config_json)
    except ValueError:
        config = None
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(architecture, dict):
        raise ConfigError(
            f"release {release.version} does not describe its architecture: it cannot be"
            " fine-tuned here; fetch a release made by a current free-server"
        )
    return architecture


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
    steps: Annotated[int, typer.Option("--steps", min=1, help="Fine-tuning steps.")] = 10,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Fine-tuning learning rate.")] = 0.01,
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
    from free_client.adapted_model import export_adapted, fit_all_classes
    from free_client.local_tasks import load_class_folders, load_learner, score_model
    from free_client.release_dir import load_release

    if not lr > 0:
        raise ConfigError(f"--lr {lr} must be positive")
    pinned = pinned_key(server_pub)
    release, weights = load_release(release_dir, pinned)
    architecture = release_architecture(release)
    model, spec = load_learner(
        None if random_init else weights,
        architecture,
        seed=seed,
        init_scale=release_init_scale(release),
    )
    if ways is not None and ways != spec.ways:
        raise ConfigError(
            f"release {release.version} learns {spec.ways}-way tasks (its head has {spec.ways}"
            f" outputs): use --ways {spec.ways}"
        )
    images = load_class_folders(data, spec.channels, spec.image_size)
    if export is not None and images.num_classes != spec.ways:
        raise SplitError(
            f"--export fine-tunes one {spec.ways}-class model on every class in --data, but"
            f" {data} has {images.num_classes}: give a folder with exactly {spec.ways} classes"
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
    with progress(f"fine-tuning {start} on your tasks", episodes) as advance:
        score = score_model(
            model,
            spec.ways,
            images,
            shots=shots,
            queries=queries,
            episodes=episodes,
            steps=steps,
            lr=lr,
            seed=seed,
            on_episode=lambda: advance(1),
        )
    if not as_json:
        _show(
            f"{start}: {score.ways}-way {score.shots}-shot accuracy {score.accuracy:.1%}"
            f" +- {score.ci95:.1%} over {score.episodes} tasks ({score.queries} queries per"
            f" class, {steps} steps at lr {lr:g})"
        )
    exported: dict[str, Any] | None = None
    if export is not None:
        fit = fit_all_classes(model, images, steps=steps, lr=lr)
        onnx_bytes = export_adapted(model, spec, images.class_names)
        _write_atomic(export, onnx_bytes)
        exported = {
            "path": str(export),
            "classes": list(images.class_names),
            "fit_accuracy": fit,
            "size": len(onnx_bytes),
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        }
        if not as_json:
            _show(
                f"exported {export} ({len(onnx_bytes):,} bytes): {spec.ways} classes"
                f" ({', '.join(images.class_names)}), accuracy {fit:.1%} on the images it was"
                f" tuned on; check it with `free-client inspect {export}`"
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
                "steps": steps,
                "lr": lr,
                "seed": seed,
            },
            "export": exported,
        }
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
