"""Full intake of one untrusted ONNX model, run in a bounded worker process.

`free_common.models.intake` starts ``python -m free_common.models.intake_worker``
with an empty temporary directory as working directory, writes a small JSON
header and the model bytes to its stdin, and reads one JSON line from its
stdout. Before it reads anything the worker caps its own address space (so an
allocation bomb fails here, not in the server), CPU time, file writes and core
dumps.

`examine` runs, in order: the static checks again (defence in depth),
``onnx.checker`` with full checking on the in-memory proto, strict shape
inference and a per-image cap on every intermediate tensor, an onnxruntime
probe on a random batch, the conversion to torch, and the parity of torch and
onnxruntime (forward values, and a finite input gradient).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from free_common.errors import (
    IntakeError,
    IntakeResourceError,
    InvalidModelError,
    OutputShapeError,
    ParityError,
    RuntimeProbeError,
    TensorLimitError,
)
from free_common.models.convert import OnnxModule, convert
from free_common.models.metadata import task_from_dict, task_to_dict
from free_common.models.onnx_static import (
    IntakeLimits,
    StaticReport,
    check_static,
    takes_channels_last,
)
from free_common.models.static_worker import limit_process, out_of_memory_reason, refusal_reply
from free_common.types import TaskMetadata

__all__ = ["examine", "main"]

_ALLOCATION_MARKERS = ("alloc", "out of memory", "cannot allocate memory")


def _is_allocation_failure(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _ALLOCATION_MARKERS)


def _check_activations(model: onnx.ModelProto, limits: IntakeLimits) -> onnx.ModelProto:
    """Infer every intermediate shape strictly and cap its size per image."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise InvalidModelError(
            f"shape inference fails: {str(exc).splitlines()[0][:200]}"
        ) from None
    graph = inferred.graph
    for value in (*graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        # The batch axis is symbolic; every other axis is a number once the input is fixed.
        fixed = [d.dim_value for d in dims if d.HasField("dim_value")]
        if math.prod(fixed) > limits.max_activation_elements:
            raise TensorLimitError(
                f"intermediate tensor {value.name!r:.60} has {math.prod(fixed):,} values per "
                f"image; the limit is {limits.max_activation_elements:,}"
            )
    return inferred


def _onnxruntime_logits(
    data: bytes, report: StaticReport, images: np.ndarray, limits: IntakeLimits
) -> np.ndarray:
    """Run the graph on NCHW `images`, fed in its own layout and batch size."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if takes_channels_last(report.model.graph, report.input_name):
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    fixed = report.input_dims[0]
    size = fixed if isinstance(fixed, int) else len(images)
    count = len(images)
    if count % size:
        images = np.concatenate(
            [images, np.zeros((size - count % size, *images.shape[1:]), images.dtype)]
        )
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        groups = [
            session.run([report.output_name], {report.input_name: images[i : i + size]})[0]
            for i in range(0, len(images), size)
        ]
        logits = np.concatenate(groups)[:count]
    # onnxruntime's exceptions subclass Exception directly, with no public common base.
    except Exception as exc:  # noqa: BLE001
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if _is_allocation_failure(message):
            raise IntakeResourceError(
                _out_of_memory(limits, "onnxruntime could not allocate")
            ) from None
        raise RuntimeProbeError(f"onnxruntime cannot run the model: {message}") from None
    return np.asarray(logits)


_HEADS = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}


def _torch_parity(
    report: StaticReport, images: np.ndarray, expected: np.ndarray, limits: IntakeLimits
) -> tuple[float, OnnxModule]:
    module = convert(report.model, limits)
    x = torch.from_numpy(images).requires_grad_(True)
    logits = module(x)
    # The module returns the logits beneath a removed (Log)Softmax: compare what the graph gives.
    head = _HEADS.get(module.graph.head)
    got = (logits if head is None else head(logits, 1)).detach().numpy()
    if got.shape != expected.shape:
        raise ParityError(
            f"the torch conversion gives logits of shape {list(got.shape)}, onnxruntime "
            f"{list(expected.shape)}"
        )
    excess = np.abs(got - expected) - (limits.atol + limits.rtol * np.abs(expected))
    worst = float(np.abs(got - expected).max())
    if (excess > 0).any():
        raise ParityError(
            f"the torch conversion and onnxruntime disagree by up to {worst:.3g} (tolerance "
            f"{limits.atol:g} + {limits.rtol:g}*|logit|); the model relies on an operator "
            "form the converter does not reproduce"
        )
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, dim=1).sum(), x)
    if not torch.isfinite(grad).all():
        raise ParityError("the gradient of the logits with respect to the input is not finite")
    return worst, module


def examine(data: bytes, task: TaskMetadata | None, limits: IntakeLimits) -> dict[str, Any]:
    """Run full intake on `data` in this process and describe the accepted model.

    Parameters
    ----------
    data
        The ONNX file's bytes.
    task
        Task metadata given outside the file; wins over the model's own.
    limits
        Caps and tolerances.

    Returns
    -------
    dict
        A JSON-able summary (see `free_common.models.intake.ModelSummary`).

    Raises
    ------
    IntakeError
        A subclass naming the first problem found.
    """
    report = check_static(data, task=task, limits=limits)
    try:
        onnx.checker.check_model(report.model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModelError(
            f"onnx's checker refuses the model: {str(exc).splitlines()[0][:200]}"
        ) from None
    _check_activations(report.model, limits)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((limits.probe_batch, *report.task.input_shape), dtype=np.float32)
    logits = _onnxruntime_logits(data, report, images, limits)
    want = (limits.probe_batch, report.task.num_classes)
    if logits.shape != want:
        raise OutputShapeError(
            f"the model outputs shape {list(logits.shape)} for {limits.probe_batch} images, but "
            f"the task declares {report.task.num_classes} classes (expected {list(want)})"
        )
    if not np.isfinite(logits).all():
        raise RuntimeProbeError("the model outputs NaN or Inf logits on a random input")
    worst, module = _torch_parity(report, images, logits, limits)
    return {
        "input": {"name": report.input_name, "shape": list(report.input_dims)},
        "output": {"name": report.output_name, "shape": list(report.output_dims)},
        "task": task_to_dict(report.task),
        "metadata_props": report.metadata_props,
        "ir_version": report.ir_version,
        "opset": report.opset,
        "producer": report.producer,
        "op_counts": report.op_counts,
        "num_parameters": report.num_parameters,
        "num_batch_norms": len(module.batch_norms),
        "max_abs_diff": worst,
        "graph_form": dataclasses.asdict(module.graph),
        "warnings": list(report.warnings),
    }


def _out_of_memory(limits: IntakeLimits, detail: str) -> str:
    return out_of_memory_reason(limits.memory_bytes, detail)


def main() -> None:
    """Read ``<header length: 8 bytes><header JSON><model bytes>`` on stdin, print one JSON line."""
    stdin = sys.stdin.buffer
    header_len = int.from_bytes(stdin.read(8), "big")
    header = json.loads(stdin.read(header_len))
    limits = IntakeLimits(**header["limits"])
    # CPU seconds as a backstop should the parent die before its wall-clock limit.
    limit_process(limits.memory_bytes, cpu_s=math.ceil(limits.timeout_s) + 1)
    torch.set_num_threads(1)
    try:
        data = stdin.read()
        task = None if header["task"] is None else task_from_dict(header["task"])
        reply: dict[str, Any] = {"ok": True, "summary": examine(data, task, limits)}
    except IntakeError as exc:
        reply = refusal_reply(exc)
    except MemoryError:
        reply = refusal_reply(
            IntakeResourceError(_out_of_memory(limits, "Python could not allocate"))
        )
    except RuntimeError as exc:  # torch reports failed allocations as RuntimeError
        if not _is_allocation_failure(str(exc)):
            raise
        reply = refusal_reply(
            IntakeResourceError(_out_of_memory(limits, "torch could not allocate"))
        )
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    # Skip interpreter teardown: nothing is left to flush, and it costs time.
    os._exit(0)


if __name__ == "__main__":
    main()
