"""`free-client export`: an owner's model to one ONNX file, with the task metadata intake reads.

Two sources. A checkpoint: the owner's own state dict of a supported backbone
(`free_common.models.backbones`), saved with safetensors (pickles are never
loaded), exported with batch norm kept. Or ``--from-onnx FILE``: a model the owner
exported with any tool (torch.onnx, tf2onnx), copied with its graph unchanged and
the ``free.*`` metadata written in. What the source does not say (width, image
size, normalization, class names) comes from flags, and flags win. After the
export the same intake the server runs checks the file, so the owner learns the
verdict before uploading.

An owner who trained with DP-SGD declares it with ``--dp-epsilon`` and ``--dp-delta``
(both): they go into ``free.dp_epsilon`` and ``free.dp_delta``, which the server shows in
its status and release manifests (docs/privacy.md). A ``--from-onnx`` source that
already declares them keeps its values unless the flags are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from free_common.console import out_console
from free_common.durable import write_synced
from free_common.errors import ConfigError
from free_common.types import DpGuarantee, TaskMetadata

if TYPE_CHECKING:
    import torch

    from free_common.models.intake import IntakeResult

__all__ = ["ARCHITECTURES", "ExportOptions", "export", "export_checkpoint", "tag_onnx"]

ARCHITECTURES = ("conv4", "resnet10", "resnet18", "mlp", "conv4gn")
"""The names in `free_common.models.backbones.BACKBONES`, for ``--help`` without loading
torch (a test checks that the two agree)."""


@dataclass(frozen=True)
class ExportOptions:
    """Flags of `free-client export`; None means "from the checkpoint, else inferred"."""

    arch: str | None = None
    width: int | None = None
    num_classes: int | None = None
    channels: int | None = None
    image_size: int | None = None
    channel_order: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    dp: DpGuarantee | None = None


def _dp(epsilon: float | None, delta: float | None) -> DpGuarantee | None:
    """Return the DP guarantee the flags declare: both or neither."""
    from free_common.errors import RecordError

    if epsilon is None and delta is None:
        return None
    if epsilon is None or delta is None:
        raise ConfigError(
            "--dp-epsilon and --dp-delta go together: give both, the values your DP-SGD "
            "accountant reported (docs/privacy.md)"
        )
    try:
        return DpGuarantee(epsilon, delta)
    except RecordError as exc:
        raise ConfigError(f"--{exc.message.replace('_', '-')}") from None


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> list[float]:
    if len(values) == 1:
        return list(values) * channels
    if len(values) != channels:
        raise ConfigError(f"{flag} takes 1 or {channels} values; got {len(values)}")
    return list(values)


def _resolve_task(
    options: ExportOptions,
    base: TaskMetadata | None,
    state: dict[str, torch.Tensor],
    stem_key: str,
) -> TaskMetadata:
    from free_common.models.metadata import task_from_dict, task_to_dict

    fields: dict[str, Any] = task_to_dict(base) if base else {}
    stem = state.get(stem_key)
    head = state.get("head.weight")
    num_classes = options.num_classes or fields.get("num_classes")
    if num_classes is None and head is not None:
        num_classes = int(head.shape[0])
    shape = list(fields.get("input_shape") or [None, None, None])
    channels = options.channels or shape[0]
    if channels is None and stem is not None and stem.dim() == 4:
        channels = int(stem.shape[1])
    size = options.image_size or shape[1]
    if channels is None or size is None:
        raise ConfigError(
            "the checkpoint does not say the input size: pass --channels and --image-size"
        )
    if shape[1] is not None and shape[1] != shape[2] and options.image_size is None:
        raise ConfigError(f"backbones take square images; the checkpoint says {shape[1:]}")
    mean = options.mean or fields.get("mean")
    std = options.std or fields.get("std")
    if mean is None or std is None:
        raise ConfigError(
            "the checkpoint does not say the input normalization: pass --mean and --std, the "
            "values used in training (e.g. --mean 0.5 --std 0.5)"
        )
    order = options.channel_order
    if order is None and channels == shape[0]:
        order = fields.get("channel_order")
    order = order or ("gray" if channels == 1 else "rgb")
    names = options.class_names if options.class_names is not None else fields.get("class_names")
    return task_from_dict(
        {
            "num_classes": num_classes,
            "input_shape": [channels, size, size],
            "channel_order": order,
            "mean": _per_channel(tuple(mean), channels, "--mean"),
            "std": _per_channel(tuple(std), channels, "--std"),
            "class_names": list(names or []),
        }
    )


def export_checkpoint(checkpoint: Path, out: Path, options: ExportOptions) -> TaskMetadata:
    """Export the weights in `checkpoint` to the ONNX file `out`.

    Parameters
    ----------
    checkpoint
        The owner's safetensors state dict of a supported backbone.
    out
        Where to write the ``.onnx`` file (replaced atomically).
    options
        Architecture and task metadata; they win over the checkpoint's header.

    Returns
    -------
    TaskMetadata
        The metadata written into the file.

    Raises
    ------
    ConfigError
        Unknown architecture, weights that do not fit it, or missing metadata.
    """
    # torch (and onnx) load only when a command exports, not with the command line.
    from free_common.models.backbones import BACKBONES, build_backbone
    from free_common.models.checkpoint import read_checkpoint
    from free_common.models.export import to_onnx

    loaded = read_checkpoint(checkpoint)
    arch = options.arch or loaded.arch
    if arch is None or arch not in BACKBONES:
        raise ConfigError(
            f"unknown or missing architecture {arch!r}; pass --arch, one of {', '.join(BACKBONES)}"
        )
    task = _resolve_task(options, loaded.task, loaded.state, BACKBONES[arch].stem_key)
    stem = loaded.state.get(BACKBONES[arch].stem_key)
    width = options.width or loaded.width or (None if stem is None else int(stem.shape[0]))
    model = build_backbone(
        arch, task.num_classes, task.input_shape[0], task.input_shape[1], width=width
    )
    try:
        model.load_state_dict(loaded.state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"{checkpoint} does not hold {arch} weights for this task "
            f"({task.num_classes} classes, input {list(task.input_shape)}): {detail}"
        ) from None
    data = to_onnx(model, task, options.dp)
    write_synced(out, data)
    return task


def tag_onnx(source: Path, out: Path, options: ExportOptions) -> TaskMetadata:
    """Copy the ONNX model `source` to `out` with the task metadata written into it.

    The graph is not changed. The task comes from flags, then the source's own
    ``free.*`` metadata, then its declared shapes (`free_client.task_flags`).

    Raises
    ------
    ConfigError
        The source cannot be read, or a flag that only checkpoints take was given.
    IntakeError
        The source is not an ONNX model, or the task it ends up with is incomplete.
    """
    from free_client.task_flags import TaskFlags, resolve_task
    from free_common.models.metadata import read_dp, write_metadata
    from free_common.models.onnx_static import IntakeLimits, declared_task_shapes, parse_model

    if options.arch is not None or options.width is not None:
        raise ConfigError("--arch and --width describe a checkpoint; --from-onnx takes the graph")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    model = parse_model(data, IntakeLimits())
    shape = None
    if options.channels is not None or options.image_size is not None:
        declared, _ = declared_task_shapes(model)
        channels = options.channels or (declared[0] if declared else None)
        size = options.image_size or (declared[1] if declared else None)
        if channels is None or size is None:
            raise ConfigError(
                "the model does not declare its image size: give both --channels and --image-size"
            )
        shape = f"{channels},{size},{size}"
    flags = TaskFlags(
        num_classes=options.num_classes,
        input_shape=shape,
        channel_order=options.channel_order,
        mean=[",".join(map(str, options.mean))] if options.mean else (),
        std=[",".join(map(str, options.std))] if options.std else (),
        class_names=None if options.class_names is None else ",".join(options.class_names),
    )
    task = resolve_task(data, flags)
    write_metadata(model, task, options.dp or read_dp(model))
    write_synced(out, model.SerializeToString())
    return task


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 0.5,0.5,0.5") from None


def _show(text: str) -> None:
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _print_verdict(result: IntakeResult) -> None:
    if result.accepted:
        _show("intake check: accept")
    else:
        _show(f"intake check: refuse ({result.refusal}): {result.reason}")
    for warning in result.warnings:
        _show(f"warning: {warning}")


def export(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="safetensors file of your model's weights")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="ONNX file to write")] = None,
    from_onnx: Annotated[
        Path | None,
        typer.Option(
            "--from-onnx", help="an ONNX model exported elsewhere: write the task metadata into it"
        ),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help=f"architecture: {', '.join(ARCHITECTURES)}")
    ] = None,
    width: Annotated[int | None, typer.Option(help="backbone width if not the default")] = None,
    num_classes: Annotated[int | None, typer.Option(help="default: from the weights")] = None,
    channels: Annotated[int | None, typer.Option(help="1 (grey) or 3 (colour)")] = None,
    image_size: Annotated[int | None, typer.Option(help="side of the square input")] = None,
    channel_order: Annotated[str | None, typer.Option(help="gray, rgb or bgr")] = None,
    mean: Annotated[str | None, typer.Option(help="normalization mean, e.g. 0.5 or r,g,b")] = None,
    std: Annotated[str | None, typer.Option(help="normalization std, e.g. 0.5 or r,g,b")] = None,
    class_names: Annotated[
        str | None, typer.Option(help="comma-separated class names, one per class")
    ] = None,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="epsilon your DP-SGD training spent (with --dp-delta)")
    ] = None,
    dp_delta: Annotated[float | None, typer.Option(help="delta of that DP guarantee")] = None,
    check: Annotated[bool, typer.Option(help="run intake on the result")] = True,
) -> None:
    """Export your weights (safetensors) to an ONNX file with its task metadata.

    With --from-onnx instead of weights, copy a model you exported yourself and write
    the task metadata (--num-classes, --mean, --std, ...) into it.
    """
    if out is None:
        raise ConfigError("give --out FILE: where to write the ONNX model")
    if (checkpoint is None) == (from_onnx is None):
        raise ConfigError("give either a checkpoint (safetensors weights) or --from-onnx FILE")
    options = ExportOptions(
        arch=arch,
        width=width,
        num_classes=num_classes,
        channels=channels,
        image_size=image_size,
        channel_order=channel_order,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        class_names=None if class_names is None else tuple(class_names.split(",")),
        dp=_dp(dp_epsilon, dp_delta),
    )
    if from_onnx is not None:
        task = tag_onnx(from_onnx, out, options)
    else:
        assert checkpoint is not None
        task = export_checkpoint(checkpoint, out, options)
    _show(
        f"wrote {out}: {task.num_classes} classes, input {list(task.input_shape)} "
        f"{task.channel_order.value}, mean {list(task.mean)}, std {list(task.std)}"
        + ("" if options.dp is None else f", DP epsilon {options.dp.epsilon:g}")
        + ("" if options.dp is None else f" delta {options.dp.delta:g}")
    )
    if check:
        from free_common.models.intake import run_intake

        result = run_intake(out.read_bytes())
        _print_verdict(result)
        if not result.accepted:
            raise typer.Exit(2)
