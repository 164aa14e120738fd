"""Task metadata of a teacher and its home in an ONNX file's ``metadata_props``.

`free_common.types.TaskMetadata` says how to feed a teacher (input shape,
channel order, normalization) and what it predicts (number of classes, optional
class names). `free-client export` writes it into ``metadata_props`` under
``free.*`` keys; intake reads it back from untrusted bytes, so parsing is strict
and every failure is a `MetadataError` that says what to fix.

Keys (values are strings; lists are JSON)::

    free.metadata_version  "1"
    free.num_classes       "5"
    free.input_shape       "[1, 28, 28]"        channels, height, width
    free.channel_order     "gray" | "rgb" | "bgr"
    free.mean              "[0.5]"              one value per channel
    free.std               "[0.5]"
    free.class_names       '["a", "b", ...]'   optional
    free.dp_epsilon        "8.0"                optional, with free.dp_delta: the
    free.dp_delta          "1e-05"              owner's declared DP-SGD guarantee

The two ``dp`` keys are read apart from the task (`dp_from_props`): a model either
declares both or neither.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import onnx

from free_common.errors import MetadataError, RecordError
from free_common.types import MAX_JSON_CHARS, ChannelOrder, DpGuarantee, TaskMetadata

__all__ = [
    "DP_KEYS",
    "METADATA_PREFIX",
    "METADATA_VERSION",
    "dp_from_props",
    "dp_to_props",
    "metadata_from_props",
    "metadata_to_props",
    "read_dp",
    "read_metadata",
    "task_from_dict",
    "task_to_dict",
    "write_metadata",
]

METADATA_PREFIX = "free."
METADATA_VERSION = "1"
_JSON_KEYS = ("num_classes", "input_shape", "mean", "std", "class_names")
DP_KEYS = (METADATA_PREFIX + "dp_epsilon", METADATA_PREFIX + "dp_delta")


def dp_to_props(dp: DpGuarantee) -> dict[str, str]:
    """Return the ``free.dp_epsilon`` and ``free.dp_delta`` entries of `dp`."""
    return {DP_KEYS[0]: repr(dp.epsilon), DP_KEYS[1]: repr(dp.delta)}


def dp_from_props(props: Mapping[str, str]) -> DpGuarantee | None:
    """Parse the declared DP guarantee in `props`; None when it declares none.

    Raises
    ------
    MetadataError
        Only one of the two keys, or a value that is not a number in its range.
    """
    present = [key in props for key in DP_KEYS]
    if not any(present):
        return None
    if not all(present):
        raise MetadataError("free.dp_epsilon and free.dp_delta go together: give both or neither")
    try:
        return DpGuarantee(float(props[DP_KEYS[0]][:40]), float(props[DP_KEYS[1]][:40]))
    except ValueError:
        raise MetadataError("free.dp_epsilon and free.dp_delta must be numbers") from None
    except RecordError as exc:
        raise MetadataError(f"metadata {exc.message}") from None


def task_to_dict(task: TaskMetadata) -> dict[str, Any]:
    """Plain JSON-able form of `task` (lists for tuples, the channel order as text)."""
    return {
        "num_classes": task.num_classes,
        "input_shape": list(task.input_shape),
        "channel_order": task.channel_order.value,
        "mean": list(task.mean),
        "std": list(task.std),
        "class_names": list(task.class_names),
    }


def task_from_dict(data: Mapping[str, Any]) -> TaskMetadata:
    """Inverse of `task_to_dict`; the input may be untrusted.

    Raises
    ------
    MetadataError
        A field is missing, of the wrong type or out of its range.
    """
    try:
        shape = data["input_shape"]
        if not isinstance(shape, list) or len(shape) != 3:
            raise MetadataError(f"input_shape must be [channels, height, width]; got {shape!r:.80}")
        names = data.get("class_names") or []
        if not isinstance(names, list):
            raise MetadataError("class_names must be a list of names")
        order = data["channel_order"]
        if order not in {o.value for o in ChannelOrder}:
            choices = ", ".join(o.value for o in ChannelOrder)
            raise MetadataError(f"channel_order must be one of {choices}; got {order!r:.40}")
        return TaskMetadata(
            num_classes=data["num_classes"],
            input_shape=(shape[0], shape[1], shape[2]),
            channel_order=ChannelOrder(order),
            mean=data["mean"],
            std=data["std"],
            class_names=tuple(names),
        )
    except KeyError as exc:
        raise MetadataError(f"task metadata lacks {exc.args[0]!r}") from None
    except RecordError as exc:
        raise MetadataError(f"task metadata: {exc.message}") from None


def metadata_to_props(task: TaskMetadata) -> dict[str, str]:
    """Return the ``free.*`` ``metadata_props`` entries that describe `task`."""
    plain = task_to_dict(task)
    props = {"metadata_version": METADATA_VERSION, "channel_order": plain["channel_order"]}
    for key in _JSON_KEYS:
        if key != "class_names" or plain[key]:
            props[key] = json.dumps(plain[key], ensure_ascii=False)
    return {METADATA_PREFIX + k: v for k, v in props.items()}


def metadata_from_props(props: Mapping[str, str]) -> TaskMetadata | None:
    """Parse the ``free.*`` entries of `props`; None when there are none.

    Raises
    ------
    MetadataError
        The entries are present but malformed, unknown or inconsistent.
    """
    ours = {
        k[len(METADATA_PREFIX) :]: v
        for k, v in props.items()
        if k.startswith(METADATA_PREFIX) and k not in DP_KEYS
    }
    if not ours:
        return None
    version = ours.pop("metadata_version", None)
    if version != METADATA_VERSION:
        raise MetadataError(
            f"free.metadata_version is {version!r:.20}, this version reads {METADATA_VERSION!r}; "
            "re-export the model with this free-client"
        )
    data: dict[str, Any] = {}
    for key, text in ours.items():
        if key == "channel_order":
            data[key] = text
        elif key in _JSON_KEYS:
            if len(text) > MAX_JSON_CHARS:
                raise MetadataError(f"free.{key} is longer than {MAX_JSON_CHARS} characters")
            try:
                data[key] = json.loads(text, parse_constant=_refuse_constant)
            except (ValueError, RecursionError):
                raise MetadataError(f"free.{key} is not valid JSON: {text!r:.60}") from None
        else:
            raise MetadataError(f"unknown metadata key free.{key:.40}; re-export the model")
    return task_from_dict(data)


def _refuse_constant(token: str) -> object:
    raise ValueError(f"{token} is not JSON")


def write_metadata(
    model: onnx.ModelProto, task: TaskMetadata, dp: DpGuarantee | None = None
) -> None:
    """Replace the model's ``free.*`` metadata_props with `task` and `dp` (others are kept)."""
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    ours = {**metadata_to_props(task), **(dp_to_props(dp) if dp is not None else {})}
    for key, value in [*kept, *ours.items()]:
        model.metadata_props.add(key=key, value=value)


def read_dp(model: onnx.ModelProto) -> DpGuarantee | None:
    """Read the DP guarantee `model` declares; None when it declares none.

    Raises
    ------
    MetadataError
        The keys are malformed or only one is present.
    """
    return dp_from_props({p.key: p.value for p in model.metadata_props})


def read_metadata(model: onnx.ModelProto) -> TaskMetadata | None:
    """Read the task metadata in `model`'s metadata_props; None when it has no ``free.*`` keys.

    Raises
    ------
    MetadataError
        The keys are present but malformed, repeated or inconsistent.
    """
    keys = [p.key for p in model.metadata_props]
    if len(set(keys)) != len(keys):
        raise MetadataError("metadata_props repeats a key; each key may appear once")
    return metadata_from_props({p.key: p.value for p in model.metadata_props})
