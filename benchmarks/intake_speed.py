"""Intake time of a ResNet-18 as owners export it, on this machine's cores.

For the paper's ResNet-18 (CloserLook layout, widths 64-512, 11.2 M parameters) at
84 x 84 (mini-ImageNet) and 224 x 224, each exported three ways: our own recipe
(`free_common.models.export.to_onnx`: legacy exporter, batch norm kept, dynamic
batch), the legacy exporter's defaults (opset 17, batch norm folded, batch 1) and
the dynamo exporter's defaults; it times the full `run_intake` a server runs (static
checks, then the bounded worker: onnx checker, shape inference, onnxruntime probe,
conversion with shape folding, parity) and writes JSON plus a Markdown table.

Usage::

    .venv/bin/python benchmarks/intake_speed.py --repeats 3 \\
        --out benchmarks/results/intake-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from free_common.models.backbones import build_backbone
from free_common.models.export import to_onnx
from free_common.models.intake import run_intake
from free_common.types import ChannelOrder, TaskMetadata


def _default_export(model: torch.nn.Module, size: int, dynamo: bool) -> bytes:
    """What ``torch.onnx.export(model, x, path)`` writes with no settings but the exporter."""
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")
        path = Path(folder, "model.onnx")
        x = torch.rand(1, 3, size, size)
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True)
            assert program is not None
            program.save(path, external_data=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
        return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[84, 224])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        task = TaskMetadata(5, (3, size, size), ChannelOrder.RGB, (0.5,) * 3, (0.25,) * 3)
        model = build_backbone("resnet18", 5, 3, size, width=64).eval()
        exports = {
            "free-client export (BN kept)": to_onnx(model, task),
            "torch.onnx legacy defaults": _default_export(model, size, False),
            "torch.onnx dynamo defaults": _default_export(model, size, True),
        }
        for name, data in exports.items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = run_intake(data, task=task)
                times.append(time.perf_counter() - start)
                assert result.accepted, result.reason
            assert result.summary is not None
            row = {
                "image": size,
                "export": name,
                "mb": round(len(data) / 2**20, 1),
                "parameters": result.summary.num_parameters,
                "batch_norms": result.summary.num_batch_norms,
                "fixed_batch": result.summary.fixed_batch,
                "max_abs_diff": result.summary.max_abs_diff,
                "median_s": round(statistics.median(times), 2),
                "max_s": round(max(times), 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Intake time of a ResNet-18",
        "",
        f"`{report['command']}` on {os.cpu_count()} cores (torch {torch.__version__}).",
        f"Full `run_intake`, as the server runs it after an upload; median of {args.repeats} runs.",
        "",
        "| image | export | MB | BN layers | fixed batch | parity | median s | max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['image']} | {r['export']} | {r['mb']} | {r['batch_norms']} | {r['fixed_batch']} "
        f"| {r['max_abs_diff']:.1e} | {r['median_s']} | {r['max_s']} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
