"""`free-bench zoo`: train and export a zoo of simulated owners' teachers.

Example::

    free-bench data build --size small --out data-cache/small
    free-bench zoo --data data-cache/small --models 8 --arch mix --out data-cache/zoo
    free-bench zoo --data data-cache/benchmark --mix benchmarks/zoo-mixed.toml --out DIR
    free-bench zoo --data data-cache/benchmark --models 8 --dp-epsilon 8 --out DIR
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from free_common.bench.zoo import ZOO_ARCHS, ZooConfig, read_mix_spec, train_zoo
from free_common.console import out_console, progress
from free_common.data.glyphs_store import load_glyph_split
from free_common.errors import ConfigError
from free_common.privacy.dp import DpConfig

__all__ = ["zoo"]


def zoo(
    data: Annotated[Path, typer.Option(help="glyph set folder (free-bench data build)")],
    out: Annotated[Path, typer.Option(help="folder for <name>.onnx and <name>.json")],
    models: Annotated[
        int | None, typer.Option(help="number of teachers (the mix spec's count with --mix)")
    ] = None,
    mix: Annotated[
        Path | None,
        typer.Option(
            help="JSON or TOML spec of teacher groups (docs/zoo-mix.md); overrides --arch"
        ),
    ] = None,
    arch: Annotated[str, typer.Option(help=f"one of {', '.join(ZOO_ARCHS)}")] = "conv4",
    ways: Annotated[int, typer.Option(help="classes per teacher")] = 5,
    epochs: Annotated[int, typer.Option(help="training epochs per teacher")] = 20,
    batch_size: Annotated[int, typer.Option(help="training batch size")] = 32,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: per arch)")] = None,
    seed: Annotated[int, typer.Option(help="seeds class draws and training")] = 0,
    class_names: Annotated[
        bool, typer.Option(help="declare class names in the models' metadata")
    ] = True,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="train with DP-SGD (Opacus) to this epsilon; Conv4 trains as conv4gn"),
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="DP delta (with --dp-epsilon)")] = 1e-5,
) -> None:
    """Train one classifier per random class subset of meta-train and export each to ONNX."""
    spec = read_mix_spec(mix) if mix is not None else None
    if models is None and spec is None:
        raise ConfigError("say how many teachers: --models N, or a spec with --mix SPEC")
    count = models if models is not None else spec.models if spec is not None else 0
    config = ZooConfig(
        models=count,
        mix=spec,
        arch=arch,
        ways=ways,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        class_names=class_names,
        dp=None if dp_epsilon is None else DpConfig(epsilon=dp_epsilon, delta=dp_delta),
    )
    split = load_glyph_split(data, "meta-train")
    with progress("training teachers", count) as advance:
        records = train_zoo(split, out, config, on_teacher=lambda _record: advance(1))
    for record in records:
        side = record.task["input_shape"][1]
        out_console.print(
            f"{record.name}: {record.arch} {side}x{side}, held-out accuracy "
            f"{record.heldout_accuracy:.1%} (epoch {record.best_epoch}), "
            f"{record.train_seconds:.1f} s"
            + ("" if record.dp_epsilon is None else f", DP epsilon {record.dp_epsilon:.2f}"),
            markup=False,
            highlight=False,
        )
    out_console.print(f"wrote {len(records)} teachers to {out}", markup=False, highlight=False)
