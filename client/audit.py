"""`free-client audit`: what the server could recover from your model, before you submit it.

The same leakage audit and membership attack `free-bench privacy` runs on the
benchmark zoo (`free_common.privacy`), from the owner's side, on the owner's machine:

1. the model goes through the intake the server runs (`free-client inspect`'s);
2. a generator inverts it into ``--images-per-class`` images per class. The server
   does not publish its meta-generator, so this is a fresh one adapted for
   ``--steps`` steps (60 by default, what screening gives a generator that has not
   met the model's like; a round's meta-generator needs 5, and its images are of the
   same kind);
3. the recovered images are compared with the images the model trained on and with
   images of the same classes it never saw, in pixels, SSIM and, with ``--release``, the
   release's penultimate features; an AUC near 0.5 says the recovered images are no
   closer to your training images than to any image of the class;
4. the loss attack (Yeom et al. 2018) on the model itself: what anyone holding the
   file (the operator) can tell about who was in your data; with ``--release`` the
   same on the release, through the prototype head adaptation starts from.

``--data DIR`` holds ``DIR/train/<class>/<images>`` (what the model trained on) and
``DIR/heldout/<class>/<images>`` (images of the same classes it did not train on). A
class folder is named after the class the model declares (``free.class_names``);
without declared names the folders, sorted, are taken in the model's output order.
``--out DIR`` writes ``audit.json`` and ``nearest.png`` (recovered images, each above
the training image nearest to it). docs/privacy.md says how to read the figures.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from free_common.console import out_console
from free_common.errors import ConfigError, DatasetLayoutError

if TYPE_CHECKING:
    from free_common.privacy.audit import OwnerImages
    from free_common.types import TaskMetadata

__all__ = ["audit"]


def _show(text: str) -> None:
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _owner_images(data: Path, task: TaskMetadata, channels: int, side: int) -> OwnerImages:
    """Read ``data/train`` and ``data/heldout``, labels in the model's output order."""
    import torch

    from free_client.local_tasks import load_class_folders
    from free_common.data.episodes import to_tensor
    from free_common.privacy.audit import OwnerImages

    parts = {}
    for part in ("train", "heldout"):
        folder = data / part
        if not folder.is_dir():
            raise DatasetLayoutError(
                f"--data {data} needs {part}/<class>/ folders: train/ the images the model "
                "trained on, heldout/ images of the same classes it did not"
            )
        parts[part] = load_class_folders(folder, channels, side)
    names = task.class_names or parts["train"].class_names
    position = {name: k for k, name in enumerate(names)}
    tensors = []
    for part, found in parts.items():
        unknown = [n for n in found.class_names if n not in position]
        if unknown or len(found.class_names) > task.num_classes:
            raise DatasetLayoutError(
                f"--data {data}/{part} has class folders the model does not declare "
                f"({', '.join(unknown[:3]) or 'too many'}); name them after its classes: "
                f"{', '.join(names[:5])}"
            )
        labels = torch.tensor([position[found.class_names[int(v)]] for v in found.labels])
        tensors.append((to_tensor(found.images), labels))
    (members, member_labels), (nonmembers, nonmember_labels) = tensors
    return OwnerImages(members, member_labels, nonmembers, nonmember_labels)


def _release_features(release_dir: Path, server_pub: Path | None) -> Any:
    from free_client.options import pinned_key
    from free_common.engine.release_model import load_learner, release_architecture
    from free_common.privacy.audit import fit_images
    from free_common.privacy.membership import batch_features
    from free_common.security.release_dir import load_release

    release, weights = load_release(release_dir, pinned_key(server_pub))
    architecture = release_architecture(release)
    model, spec = load_learner(weights, architecture)
    features = batch_features(model)
    return lambda images: features(fit_images(images, spec.channels, spec.image_size))


def audit(
    model: Annotated[Path, typer.Argument(help="your ONNX model (free-client export)")],
    data: Annotated[
        Path, typer.Option(help="folder with train/<class>/ and heldout/<class>/ images")
    ],
    release: Annotated[
        Path | None, typer.Option(help="a fetched release folder: adds its feature space")
    ] = None,
    server_pub: Annotated[
        Path | None, typer.Option(help="the server's public key, to verify --release")
    ] = None,
    steps: Annotated[int, typer.Option(help="generator steps on your model")] = 60,
    images_per_class: Annotated[int, typer.Option(help="images recovered per class")] = 10,
    out: Annotated[Path | None, typer.Option(help="folder for audit.json and nearest.png")] = None,
    seed: Annotated[int, typer.Option(help="seeds the generator and the bootstrap")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of lines")] = False,
) -> None:
    """Recover images from your model as the server would, and measure what they reveal."""
    if steps < 1 or images_per_class < 1:
        raise ConfigError("--steps and --images-per-class must be at least 1")
    try:
        payload = model.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {model}: {exc.strerror or exc}") from None
    # torch and the engine load only when the command runs, not with the command line.
    import torch

    from free_common.inversion.config import FiveConfig, GeneratorConfig
    from free_common.inversion.five import MetaGenerator
    from free_common.inversion.generator import build_generator
    from free_common.inversion.teacher import AdaptedTeacher
    from free_common.models.intake import load_teacher
    from free_common.privacy.audit import AuditConfig, audit_teacher
    from free_common.privacy.membership import ATTACK, model_scores, release_scores
    from free_common.privacy.metrics import advantage

    teacher = load_teacher(payload)
    task = teacher.task
    channels, height, _ = task.input_shape
    side = max(4, 4 * round(height / 4))  # the generator's side is a multiple of 4
    owner = _owner_images(data, task, channels, side)
    features = None if release is None else _release_features(release, server_pub)
    adapted = AdaptedTeacher(teacher.module, task, model.stem)
    generator = build_generator(
        GeneratorConfig(image_size=side, channels=channels), seed, torch.device("cpu")
    )
    config = AuditConfig(images_per_class=images_per_class, adapt_steps=steps, seed=seed)
    found = audit_teacher(adapted, MetaGenerator(generator, FiveConfig()), owner, config, features)
    report: dict[str, Any] = {
        "model": str(model),
        "members": len(owner.members),
        "nonmembers": len(owner.nonmembers),
        "generator": {"kind": "fresh", "steps": steps, "images_per_class": images_per_class},
        "recovery_agreement": found.recovery_agreement,
        "audit": found.summary(),
        "attack": ATTACK,
        "attacks": {"model": asdict(advantage(*model_scores(adapted, owner), seed=seed))},
    }
    if features is not None:
        scores = release_scores(features, owner)
        report["attacks"]["release"] = asdict(advantage(*scores, seed=seed))
    if out is not None:
        _write(out, report, found.recovered, found.nearest)
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    _show(
        f"recovered {images_per_class} images per class in {steps} steps; the model gives "
        f"{found.recovery_agreement:.0%} of them their class"
    )
    for name, block in report["audit"].items():
        _show(
            f"{name}: AUC {block['auc']:.2f} [{block['auc_ci'][0]:.2f}, {block['auc_ci'][1]:.2f}],"
            f" TPR at 1% FPR {block['tpr_at_1fpr']:.2f}; nearest training image "
            f"{block['nearest_member']:.3f}, nearest unseen image {block['nearest_nonmember']:.3f}"
        )
    for name, block in report["attacks"].items():
        _show(
            f"loss attack on the {name}: AUC {block['auc']:.2f} "
            f"[{block['auc_ci'][0]:.2f}, {block['auc_ci'][1]:.2f}], "
            f"TPR at 1% FPR {block['tpr_at_1fpr']:.2f}"
        )


def _write(out: Path, report: dict[str, Any], recovered: Any, nearest: Any) -> None:
    """Write ``audit.json`` and ``nearest.png`` (recovered images over their nearest)."""
    from PIL import Image

    from free_common.engine.recovered import image_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=1))
    if len(recovered):
        grid = image_grid([recovered, nearest])
        pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).resize((pixels.shape[1] * 3, pixels.shape[0] * 3)).save(
            out / "nearest.png"
        )
