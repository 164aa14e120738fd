"""Task metadata given on the command line: the flags `submit` and `inspect` share.

What a model's own ``free.*`` metadata does not say comes from flags, and flags win
field by field. Where neither says it, the model's declared shapes fill in the image
size (``[batch, C, H, W]``, or ``[batch, H, W, C]`` before a leading transpose) and the
number of classes (``[batch, K]``), so a foreign model needs only its normalization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from free_common.errors import ConfigError, MetadataError
from free_common.models.metadata import read_metadata, task_from_dict, task_to_dict
from free_common.models.onnx_static import IntakeLimits, declared_task_shapes, parse_model
from free_common.types import ChannelOrder, TaskMetadata

__all__ = [
    "ChannelOrderOption",
    "ClassNamesOption",
    "InputShapeOption",
    "MeanOption",
    "NumClassesOption",
    "StdOption",
    "TaskFlags",
    "resolve_task",
]

NumClassesOption = Annotated[
    int | None,
    typer.Option("--classes", "--num-classes", help="Number of classes (overrides the model)."),
]
InputShapeOption = Annotated[
    str | None, typer.Option("--input-shape", help="C,H,W of one image (overrides).")
]
ChannelOrderOption = Annotated[
    str | None, typer.Option("--channel-order", help="gray, rgb or bgr (overrides).")
]
MeanOption = Annotated[
    list[str] | None,
    typer.Option("--mean", help="Per-channel mean, e.g. 0.5 or 0.48,0.45,0.40 (overrides)."),
]
StdOption = Annotated[
    list[str] | None, typer.Option("--std", help="Per-channel std, like --mean (overrides).")
]
ClassNamesOption = Annotated[
    str | None, typer.Option("--class-names", help="Comma-separated class names (overrides).")
]


@dataclass(frozen=True)
class TaskFlags:
    """Task metadata given on the command line; None or empty means "from the model"."""

    num_classes: int | None = None
    input_shape: str | None = None
    channel_order: str | None = None
    mean: Sequence[str] = ()
    std: Sequence[str] = ()
    class_names: str | None = None

    @property
    def given(self) -> bool:
        """True when any flag was given."""
        return any(
            (
                self.num_classes is not None,
                self.input_shape is not None,
                self.channel_order is not None,
                self.mean,
                self.std,
                self.class_names is not None,
            )
        )


def _numbers(flag: str, values: Sequence[str], kind: type[float] | type[int]) -> list[Any]:
    parts = [p.strip() for value in values for p in value.split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, got {values!r}") from None


def resolve_task(data: bytes, flags: TaskFlags) -> TaskMetadata:
    """Return the task metadata of a model: its own ``metadata_props``, overridden by flags.

    Fields neither gives are taken from the model's declared input and output shapes.

    Raises
    ------
    NotOnnxError, ModelTooLarge
        The bytes are not an ONNX model this client can read.
    MetadataError
        The model's metadata is malformed, or the result is incomplete or inconsistent.
    ConfigError
        A flag is malformed.
    """
    model = parse_model(data, IntakeLimits())
    own = read_metadata(model)
    merged: dict[str, Any] = {} if own is None else task_to_dict(own)
    declared_shape, declared_classes = declared_task_shapes(model)
    if flags.num_classes is not None:
        merged["num_classes"] = flags.num_classes
    elif "num_classes" not in merged and declared_classes is not None:
        merged["num_classes"] = declared_classes
    if flags.input_shape is not None:
        merged["input_shape"] = _numbers("--input-shape", [flags.input_shape], int)
    elif "input_shape" not in merged and declared_shape is not None:
        merged["input_shape"] = list(declared_shape)
    if flags.channel_order is not None:
        merged["channel_order"] = flags.channel_order.lower()
    elif "channel_order" not in merged and len(merged.get("input_shape", [])) == 3:
        # Without a word from the owner, one channel is gray and three are RGB.
        merged["channel_order"] = (
            ChannelOrder.GRAY if merged["input_shape"][0] == 1 else ChannelOrder.RGB
        ).value
    channels = len(merged.get("input_shape", [])) and merged["input_shape"][0]
    for key, given in (("mean", flags.mean), ("std", flags.std)):
        if given:
            values = _numbers(f"--{key}", given, float)
            # One value stands for every channel, as in `free-client export`.
            merged[key] = values * channels if len(values) == 1 and channels else values
    if flags.class_names is not None:
        merged["class_names"] = [n.strip() for n in flags.class_names.split(",") if n.strip()]
    missing = [
        flag
        for key, flag in (
            ("num_classes", "--classes"),
            ("input_shape", "--input-shape"),
            ("mean", "--mean"),
            ("std", "--std"),
        )
        if key not in merged
    ]
    if missing:
        raise MetadataError(
            "the model carries no FREE task metadata: give "
            f"{', '.join(missing)} (the values used in training), or write them into the file "
            "with `free-client export --from-onnx`"
        )
    return task_from_dict(merged)
