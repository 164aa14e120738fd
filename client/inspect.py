"""`free-client inspect`: the server's intake verdict on a model, run locally.

The same `run_intake` the server runs after an upload (static checks, then the
bounded worker with the onnxruntime probe and the torch conversion), so what it
prints is what the server will see. It takes the task flags of `submit`
(`free_client.task_flags`), resolved the same way, so what inspect accepts, submit
accepts. Exit status 0 when the model would be accepted, 2 when refused; ``--json``
prints ``{"verdict": "accept"|"refuse", "reason": ..., ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from free_client.task_flags import (
    ChannelOrderOption,
    ClassNamesOption,
    InputShapeOption,
    MeanOption,
    NumClassesOption,
    StdOption,
    TaskFlags,
    resolve_task,
)
from free_common.console import out_console

if TYPE_CHECKING:
    from free_common.models.intake import IntakeResult
    from free_common.models.onnx_static import IntakeLimits

__all__ = ["inspect", "inspect_file"]


def inspect_file(
    path: Path, limits: IntakeLimits | None = None, flags: TaskFlags | None = None
) -> tuple[IntakeResult, dict[str, Any]]:
    """Run intake on the model file at `path`, with the task `flags` give (as `submit` would).

    Returns
    -------
    tuple
        The verdict, and a JSON-able report: the verdict's fields plus, for a
        refused model that parses, what it declares (inputs, outputs, metadata).
    """
    # Intake loads torch and onnxruntime: only when a model is inspected.
    from free_common.models.intake import run_intake
    from free_common.models.onnx_static import IntakeLimits, peek

    limits = limits or IntakeLimits()
    with path.open("rb") as handle:
        # One byte over the cap is enough for intake to refuse the size.
        data = handle.read(limits.max_bytes + 1)
    task = None
    if flags is not None and flags.given and len(data) <= limits.max_bytes:
        task = resolve_task(data, flags)
    result = run_intake(data, task=task, limits=limits)
    report = result.to_dict()
    if not result.accepted:
        declared = peek(data, limits)
        if declared is not None:
            report["declared"] = declared
    return result, report


def _shape(dims: list[Any]) -> str:
    return "[" + ", ".join("batch" if d is None else str(d) for d in dims) + "]"


def _show(text: str) -> None:
    # Plain text: "[batch, 1, 28, 28]" is not rich markup, and long reasons stay on one line.
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _print_report(path: Path, result: IntakeResult, report: dict[str, Any]) -> None:
    if result.accepted and result.summary is not None:
        s = result.summary
        task = s.task
        _show(f"{path}: accept")
        layout = " (NHWC: transposed to NCHW for the teacher)" if s.channels_last else ""
        _show(f"  input    {s.input_name} {_shape(list(s.input_shape))} float32{layout}")
        head = {
            "softmax": " (ends in Softmax: the teacher is used on the logits beneath it)",
            "log_softmax": " (ends in LogSoftmax: the teacher is used on the logits beneath it)",
        }.get(s.output_head, "")
        _show(f"  output   {s.output_name} {_shape(list(s.output_shape))}{head}")
        names = f" ({', '.join(task.class_names)})" if task.class_names else ""
        _show(f"  classes  {task.num_classes}{names}")
        _show(
            f"  task     {task.channel_order.value}, mean {list(task.mean)}, std {list(task.std)}"
        )
        ops = ", ".join(f"{op} x{n}" for op, n in s.op_counts.items())
        _show(
            f"  graph    IR {s.ir_version}, opset {s.opset}, {s.producer or 'unknown producer'}; "
            f"{s.num_parameters:,} parameters; {s.num_batch_norms} batch-norm layers"
        )
        _show(f"  nodes    {ops}")
        if s.folded_nodes:
            _show(
                f"  folded   {s.folded_nodes} shape-computing nodes, into constants for this size"
            )
        _show(f"  parity   max |torch - onnxruntime| = {s.max_abs_diff:.2g}")
        for key, value in s.metadata_props.items():
            _show(f"  metadata {key} = {value}")
    else:
        _show(f"{path}: refuse ({result.refusal})")
        _show(f"  reason   {result.reason}")
        declared = report.get("declared")
        if declared:
            for value in declared["inputs"]:
                _show(f"  input    {value['name']} {_shape(value['shape'])}")
            for value in declared["outputs"]:
                _show(f"  output   {value['name']} {_shape(value['shape'])}")
            for key, value in declared["metadata_props"].items():
                _show(f"  metadata {key} = {value}")
    for warning in result.warnings:
        _show(f"  warning  {warning}")


def inspect(
    model: Annotated[Path, typer.Argument(help="the .onnx file to check")],
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON")] = False,
    classes: NumClassesOption = None,
    input_shape: InputShapeOption = None,
    channel_order: ChannelOrderOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    class_names: ClassNamesOption = None,
) -> None:
    """Show what the server's intake will see in MODEL and whether it accepts it.

    The task flags are those of `submit`: give them for a model without FREE metadata.
    """
    flags = TaskFlags(classes, input_shape, channel_order, mean or (), std or (), class_names)
    result, report = inspect_file(model, flags=flags)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(model, result, report)
    raise typer.Exit(0 if result.accepted else 2)
