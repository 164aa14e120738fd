"""Export a torch classifier to one self-contained ONNX file that intake accepts.

The recipe is the one measured in `reference/onnx.md` (section 1): the legacy
TorchScript exporter at opset 17 with constant folding off. Constant folding
(and the dynamo exporter's default optimizer) fuse BatchNorm into the preceding
Conv or Gemm, which would take the running statistics away from inversion; with
folding off every BatchNormalization node stays, with its statistics as
initializers. The batch axis is dynamic and the task metadata goes into
``metadata_props``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from free_common.errors import ConfigError
from free_common.models.metadata import write_metadata
from free_common.types import DpGuarantee, TaskMetadata

__all__ = ["EXPORT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "to_onnx"]

EXPORT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def to_onnx(model: nn.Module, task: TaskMetadata, dp: DpGuarantee | None = None) -> bytes:
    """Serialize `model` as ONNX bytes with BatchNorm kept and `task` in metadata_props.

    Parameters
    ----------
    model
        A classifier mapping ``[N, *task.input_shape]`` normalized images to
        ``[N, task.num_classes]`` logits. Exported in eval mode; its own mode is
        restored afterwards and its weights are not changed.
    task
        The metadata written into the file.
    dp
        The DP guarantee it was trained to, written beside the task when given.

    Returns
    -------
    bytes
        The whole ONNX file (no external data).

    Raises
    ------
    ConfigError
        The model does not map the declared input shape to the declared classes.
    """
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(2, *task.input_shape)
        with torch.no_grad():
            try:
                logits = model(example)
            except RuntimeError as exc:
                raise ConfigError(
                    f"the model cannot take images of shape {list(task.input_shape)}: "
                    f"{str(exc).splitlines()[0][:200]}"
                ) from None
        if tuple(logits.shape) != (2, task.num_classes):
            raise ConfigError(
                f"the model gives outputs of shape {list(logits.shape[1:])} per image but the task "
                f"declares {task.num_classes} classes"
            )
        with tempfile.TemporaryDirectory(prefix="free-export-") as tmp, warnings.catch_warnings():
            # The legacy exporter is deprecated in favour of dynamo, which folds BatchNorm.
            warnings.simplefilter("ignore", DeprecationWarning)
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                opset_version=EXPORT_OPSET,
                do_constant_folding=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
            exported = path.read_bytes()
    finally:
        model.train(was_training)
    proto = onnx.ModelProto()
    proto.ParseFromString(exported)
    write_metadata(proto, task, dp)
    return bytes(proto.SerializeToString())
