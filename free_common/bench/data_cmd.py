"""`free-bench data`: build the glyph benchmark, look at episodes, check Fashion-MNIST.

Examples::

    free-bench data build --size small --out data-cache/small
    free-bench data show data-cache/small --split meta-test --ways 5 --shots 1 --out ep.png
    free-bench data export-folders data-cache/small --split meta-test --classes 5 --out owner
    free-bench data fashion-mnist
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from free_common.bench.folders import export_class_folders
from free_common.console import err_console, out_console, progress
from free_common.data.episodes import sample_episode
from free_common.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from free_common.data.glyphs_build import build_glyph_set
from free_common.data.glyphs_config import size_config
from free_common.data.picture import episode_picture
from free_common.data.sources import KINDS, load_split
from free_common.errors import ConfigError

__all__ = ["data_app"]

data_app = typer.Typer(
    help="Data sets: build the glyph benchmark, draw episodes, check Fashion-MNIST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Size(StrEnum):
    """Glyph set sizes (see free_common.data.glyphs_config)."""

    small = "small"
    benchmark = "benchmark"


def _summary(manifest: dict[str, Any]) -> Table:
    table = Table(title=f"glyph set '{manifest['size']}'")
    for column in ("split", "classes", "images", "instances/class", "scripts"):
        table.add_column(column, justify="left" if column in ("split", "scripts") else "right")
    for split, info in manifest["splits"].items():
        per = info["instances_per_class"]
        scripts = ", ".join(f"{name} {count}" for name, count in info["scripts"].items())
        table.add_row(
            split,
            str(info["classes"]),
            str(info["images"]),
            f"{per['min']}-{per['max']} (mean {per['mean']})",
            scripts or "-",
        )
    return table


@data_app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the glyph set to.")],
    size: Annotated[Size, typer.Option(help="small (tests, demo) or benchmark.")] = Size.small,
    force: Annotated[bool, typer.Option(help="Rebuild even if OUT is up to date.")] = False,
    package: Annotated[
        list[str] | None,
        typer.Option(help="Build from these Debian font packages instead (repeatable)."),
    ] = None,
    font_dir: Annotated[
        Path | None, typer.Option(help="Build from the font files of this folder instead.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Rendering processes (default: the cores).")
    ] = None,
) -> None:
    """Build the glyph benchmark (characters of Debian fonts, split by script)."""
    if package and font_dir is not None:
        raise ConfigError("give --package or --font-dir, not both")
    config = size_config(size.value)
    if package:
        config = config.with_packages(tuple(package))
    result = build_glyph_set(
        out, config, font_dir=font_dir, force=force, workers=workers, progress=progress
    )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    out_console.print(_summary(result.manifest))
    if result.reused:
        out_console.print(f"{out} is up to date (use --force to rebuild)", soft_wrap=True)
    else:
        done = f"built {out} in {result.seconds:.1f} s; manifest: {out / 'manifest.json'}"
        out_console.print(done, soft_wrap=True)


@data_app.command("show")
def show(
    source: Annotated[
        str, typer.Argument(help="A data folder (glyph set, CIFAR-FS, ...) or 'fashion-mnist'.")
    ],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    split: Annotated[str, typer.Option(help="Split to draw from.")] = "meta-train",
    ways: Annotated[int, typer.Option(min=1)] = 5,
    shots: Annotated[int, typer.Option(min=1)] = 1,
    queries: Annotated[int, typer.Option(min=0)] = 2,
    seed: Annotated[int, typer.Option(help="Episode seed.")] = 0,
    kind: Annotated[
        str | None, typer.Option(help=f"Source kind: {', '.join(KINDS)} (default: detect).")
    ] = None,
    scale: Annotated[int, typer.Option(min=1, max=8, help="Pixel zoom of the picture.")] = 3,
) -> None:
    """Sample one episode of a split and save it as a labelled picture."""
    data = load_split(source, split, kind=kind)
    episode = sample_episode(data, ways, shots, queries, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    episode_picture(episode, scale).save(out)
    out_console.print(
        f"{ways}-way {shots}-shot episode of {data.split} ({data.num_classes} classes): {out}",
        soft_wrap=True,
    )


@data_app.command("fashion-mnist")
def fashion_mnist(
    root: Annotated[Path, typer.Option(help="Folder of the *-ubyte.gz files.")] = DEFAULT_ROOT,
) -> None:
    """Check the Fashion-MNIST files and summarise them."""
    table = Table(title=f"Fashion-MNIST ({root})")
    for column in ("split", "images", "size", "classes", "per class"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in ("train", "test"):
        data = load_fashion_mnist(split, root)
        counts = data.class_counts()
        height, width = data.image_size
        table.add_row(
            split,
            str(len(data)),
            f"{height}x{width}",
            str(data.num_classes),
            f"{counts.min()}-{counts.max()}",
        )
    out_console.print(table)


@data_app.command("export-folders")
def export_folders(
    source: Annotated[
        str, typer.Argument(help="A data folder (glyph set, CIFAR-FS, ...) or 'fashion-mnist'.")
    ],
    out: Annotated[Path, typer.Option("--out", help="New folder for OUT/<class>/<i>.png.")],
    split: Annotated[str, typer.Option(help="Split to draw from.")] = "meta-test",
    classes: Annotated[int, typer.Option(min=1, help="Number of classes.")] = 5,
    per_class: Annotated[int, typer.Option(min=1, help="Images per class.")] = 20,
    seed: Annotated[int, typer.Option(help="Seeds the draw of classes and images.")] = 0,
    kind: Annotated[
        str | None, typer.Option(help=f"Source kind: {', '.join(KINDS)} (default: detect).")
    ] = None,
) -> None:
    """Write random classes of a split as class folders, the layout `free-client --data` reads."""
    data = load_split(source, split, kind=kind)
    written = export_class_folders(data, out, classes=classes, per_class=per_class, seed=seed)
    out_console.print(
        f"wrote {written.images} images of {len(written.folders)} {data.split} classes to {out}:"
        f" {', '.join(written.folders)}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
