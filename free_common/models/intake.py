"""Intake of untrusted ONNX teachers: verdict, and conversion for the engine.

`run_intake` gives the verdict on a model's bytes: the static checks run here
(cheap, and a refusal needs no worker), then full intake runs in a worker
process (`free_common.models.intake_worker`, forked for each model from a
pre-imported server: `free_common.models.intake_forkserver`) under a memory
limit, a wall-clock timeout and an empty working directory. A refusal is a typed `IntakeError`
subclass with a reason the owner can act on; `IntakeResult` carries its name
and message, so the server can store the verdict and the client can print it.

`load_teacher` is what the engine calls: intake, then conversion to a frozen,
differentiable torch module in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from free_common import errors
from free_common.errors import (
    IntakeError,
    IntakeResourceError,
    IntakeTimeout,
    RuntimeProbeError,
)
from free_common.models.intake_forkserver import fork_worker
from free_common.models.metadata import task_from_dict, task_to_dict
from free_common.models.onnx_static import IntakeLimits, check_static
from free_common.models.static_worker import header_for, out_of_memory_reason
from free_common.types import TaskMetadata

if TYPE_CHECKING:
    import torch

    from free_common.models.convert import OnnxModule

__all__ = [
    "IntakeResult",
    "ModelSummary",
    "Teacher",
    "load_teacher",
    "run_intake",
    "run_intake_file",
]

_FEED_CHUNK = 1 << 20
"""Bytes of a model file copied to the worker at a time."""

_KILL_WAIT_S = 10.0
"""How long a killed worker may take to be reaped."""

_REFUSALS: dict[str, type[IntakeError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, IntakeError)
}


@dataclass(frozen=True)
class ModelSummary:
    """What intake saw in an accepted model (what `free-client inspect` shows).

    Attributes
    ----------
    input_name, input_shape, output_name, output_shape
        The single input and output; the batch axis is a name or None.
    task
        The task metadata in force.
    metadata_props
        Every ``metadata_props`` entry of the file.
    ir_version, opset, producer
        Format versions and the exporter that wrote the file.
    op_counts
        Nodes per operator type.
    num_parameters
        Weight values in the file.
    num_batch_norms
        Batch-norm layers in the converted module.
    max_abs_diff
        Largest |torch - onnxruntime| logit difference in the parity probe.
    fixed_batch, channels_last, output_head, folded_nodes
        How the graph meets the engine (`free_common.models.convert.GraphForm`): the
        batch size it fixes, an NHWC input, the (Log)Softmax removed from its output,
        the shape computations folded at intake.
    """

    input_name: str
    input_shape: tuple[int | str | None, ...]
    output_name: str
    output_shape: tuple[int | str | None, ...]
    task: TaskMetadata
    metadata_props: dict[str, str]
    ir_version: int
    opset: int
    producer: str
    op_counts: dict[str, int]
    num_parameters: int
    num_batch_norms: int
    max_abs_diff: float
    fixed_batch: int | None = None
    channels_last: bool = False
    output_head: str = "logits"
    folded_nodes: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSummary:
        """Build from the worker's JSON summary."""
        form = data.get("graph_form", {})
        return cls(
            input_name=data["input"]["name"],
            input_shape=tuple(data["input"]["shape"]),
            output_name=data["output"]["name"],
            output_shape=tuple(data["output"]["shape"]),
            task=task_from_dict(data["task"]),
            metadata_props=dict(data["metadata_props"]),
            ir_version=int(data["ir_version"]),
            opset=int(data["opset"]),
            producer=str(data["producer"]),
            op_counts={str(k): int(v) for k, v in data["op_counts"].items()},
            num_parameters=int(data["num_parameters"]),
            num_batch_norms=int(data["num_batch_norms"]),
            max_abs_diff=float(data["max_abs_diff"]),
            fixed_batch=form.get("fixed_batch"),
            channels_last=bool(form.get("channels_last", False)),
            output_head=str(form.get("head", "logits")),
            folded_nodes=int(form.get("folded_nodes", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the inverse of `from_dict`)."""
        return {
            "input": {"name": self.input_name, "shape": list(self.input_shape)},
            "output": {"name": self.output_name, "shape": list(self.output_shape)},
            "task": task_to_dict(self.task),
            "metadata_props": dict(self.metadata_props),
            "ir_version": self.ir_version,
            "opset": self.opset,
            "producer": self.producer,
            "op_counts": dict(self.op_counts),
            "num_parameters": self.num_parameters,
            "num_batch_norms": self.num_batch_norms,
            "max_abs_diff": self.max_abs_diff,
            "graph_form": {
                "fixed_batch": self.fixed_batch,
                "channels_last": self.channels_last,
                "head": self.output_head,
                "folded_nodes": self.folded_nodes,
            },
        }


@dataclass(frozen=True)
class IntakeResult:
    """The verdict of intake on one model.

    Attributes
    ----------
    accepted
        True when the model may reach the engine.
    reason
        Empty when accepted; otherwise one line: what is wrong and what to do.
    refusal
        Name of the `IntakeError` subclass that refused the model, e.g.
        ``"ExternalDataError"``; None when accepted.
    summary
        What intake saw; None when refused.
    warnings
        Things that are allowed but worth telling the owner.
    """

    accepted: bool
    reason: str = ""
    refusal: str | None = None
    summary: ModelSummary | None = None
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def refused(cls, error: IntakeError) -> IntakeResult:
        """Build the result of a refusal raised as `error`."""
        return cls(accepted=False, reason=error.message, refusal=type(error).__name__)

    def error(self) -> IntakeError | None:
        """Return the refusal as an exception of its own class; None when accepted."""
        if self.accepted:
            return None
        return _REFUSALS.get(self.refusal or "", IntakeError)(self.reason)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"verdict": "accept"|"refuse", "reason": ..., ...}``."""
        out: dict[str, Any] = {
            "verdict": "accept" if self.accepted else "refuse",
            "reason": self.reason,
            "refusal": self.refusal,
            "warnings": list(self.warnings),
        }
        if self.summary is not None:
            out.update(self.summary.to_dict())
        return out


@dataclass(frozen=True)
class Teacher:
    """A converted teacher, ready for inversion.

    Attributes
    ----------
    module
        Frozen torch module: normalized images ``[N, *input_shape]`` to logits
        ``[N, num_classes]``, in eval mode, batch norm kept as real modules.
    task
        The teacher's task metadata.
    summary
        What intake saw.
    """

    module: OnnxModule
    task: TaskMetadata
    summary: ModelSummary | None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the teacher takes."""
        return self.task.input_shape

    @property
    def num_classes(self) -> int:
        """Number of logits."""
        return self.task.num_classes

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel normalization mean, shaped ``[1, C, 1, 1]``."""
        import torch  # here, not at the top: `free-client submit` runs intake without torch

        return torch.tensor(self.task.mean).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        """Per-channel normalization std, shaped ``[1, C, 1, 1]``."""
        import torch

        return torch.tensor(self.task.std).view(1, -1, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[0, 1]`` images ``[N, C, H, W]`` to the teacher's input (differentiable)."""
        mean, std = self.mean.to(images), self.std.to(images)
        return (images - mean) / std


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread each: intake runs beside other work, and small models gain nothing.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def _feed(stdin: IO[bytes], header: bytes, model: bytes | Path) -> None:
    """Write the header and the model to the worker, the file in chunks (never whole here)."""
    try:
        stdin.write(header)
        if isinstance(model, Path):
            with model.open("rb") as source:
                shutil.copyfileobj(source, stdin, _FEED_CHUNK)
        else:
            stdin.write(model)
    except BrokenPipeError:
        pass  # the worker died before reading it all: its exit status says why


def _run_worker(
    model: bytes | Path, task: TaskMetadata | None, limits: IntakeLimits, niceness: int = 0
) -> IntakeResult:
    with tempfile.TemporaryDirectory(prefix="free-intake-") as empty:
        worker = fork_worker(empty, niceness, _worker_env())
        try:
            # The worker reads all of its input before it writes a byte, so feeding it
            # first and collecting its output after cannot deadlock.
            _feed(worker.stdin, header_for(task, limits), model)
            with contextlib.suppress(BrokenPipeError):
                worker.stdin.close()
            try:
                stdout, stderr, returncode = worker.communicate(limits.timeout_s)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.communicate(_KILL_WAIT_S)
                return IntakeResult.refused(
                    IntakeTimeout(
                        f"full intake took longer than {limits.timeout_s:g} s; a teacher should "
                        "run a small batch in well under a second: export a smaller model"
                    )
                )
        finally:
            worker.close()
    return _reply_of(returncode, stdout, stderr, limits)


def _reply_of(
    returncode: int, stdout: bytes, stderr_bytes: bytes, limits: IntakeLimits
) -> IntakeResult:
    lines = stdout.decode(errors="replace").strip().splitlines()
    if returncode == 0 and lines:
        return _parse_reply(lines[-1])
    if returncode == -signal.SIGXCPU:
        return IntakeResult.refused(
            IntakeTimeout(
                f"full intake used more than {limits.timeout_s:g} s of CPU time; export a "
                "smaller model"
            )
        )
    stderr = stderr_bytes.decode(errors="replace")
    if "bad_alloc" in stderr or "MemoryError" in stderr or returncode == -signal.SIGKILL:
        detail = "the worker was killed" if returncode < 0 else "allocation failed"
        return IntakeResult.refused(
            IntakeResourceError(out_of_memory_reason(limits.memory_bytes, detail))
        )
    last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
    return IntakeResult.refused(
        RuntimeProbeError(f"the intake worker failed on the model (exit {returncode}): {last}")
    )


def _parse_reply(line: str) -> IntakeResult:
    reply = json.loads(line)
    if not reply["ok"]:
        refusal = reply["refusal"] if reply["refusal"] in _REFUSALS else "RuntimeProbeError"
        return IntakeResult(accepted=False, reason=str(reply["reason"]), refusal=refusal)
    summary = ModelSummary.from_dict(reply["summary"])
    return IntakeResult(
        accepted=True, summary=summary, warnings=tuple(reply["summary"]["warnings"])
    )


def run_intake(
    data: bytes, *, task: TaskMetadata | None = None, limits: IntakeLimits | None = None
) -> IntakeResult:
    """Decide whether an untrusted ONNX model may reach the engine.

    Parameters
    ----------
    data
        The model file's bytes. Nothing is read from any path: the file is
        self-contained or refused.
    task
        Task metadata given outside the file (``submit`` flags); wins over the
        model's ``metadata_props``.
    limits
        Caps, worker limits and parity tolerance; `IntakeLimits()` when omitted.

    Returns
    -------
    IntakeResult
        Accepted with a summary, or refused with a typed reason. Model faults
        never raise.
    """
    limits = limits or IntakeLimits()
    try:
        check_static(data, task=task, limits=limits)
    except IntakeError as exc:
        return IntakeResult.refused(exc)
    return _run_worker(data, task, limits)


def run_intake_file(
    path: Path,
    *,
    task: TaskMetadata | None = None,
    limits: IntakeLimits | None = None,
    niceness: int = 0,
) -> IntakeResult:
    """Decide on a model stored at `path`, without ever holding it in this process.

    What the server's intake threads call: the file is streamed to the worker,
    which runs the static checks itself before the rest (`run_intake` runs them
    here first, to spare a worker for a model the client is about to refuse).
    `niceness` lowers the worker's CPU priority by that much below this
    process's. Other arguments and result as `run_intake`.
    """
    return _run_worker(path, task, limits or IntakeLimits(), niceness)


def load_teacher(
    data: bytes,
    *,
    task: TaskMetadata | None = None,
    limits: IntakeLimits | None = None,
    already_accepted: bool = False,
) -> Teacher:
    """Run intake on `data` and convert the accepted model to a frozen torch teacher.

    Parameters
    ----------
    data
        The ONNX file's bytes.
    task
        Task metadata given outside the file; wins over the model's own.
    limits
        Caps; `IntakeLimits()` when omitted.
    already_accepted
        The bytes passed full intake before (the server stores the verdict):
        skip the worker and only repeat the static checks before converting.

    Returns
    -------
    Teacher

    Raises
    ------
    IntakeError
        The subclass that refused the model.
    """
    limits = limits or IntakeLimits()
    summary = None
    if not already_accepted:
        result = run_intake(data, task=task, limits=limits)
        refusal = result.error()
        if refusal is not None:
            raise refusal
        summary = result.summary
    report = check_static(data, task=task, limits=limits)
    from free_common.models.convert import convert  # torch: only when a teacher is loaded

    return Teacher(module=convert(report.model, limits), task=report.task, summary=summary)
