"""`free-bench adapt`: every adaptation protocol on the same tasks, release vs random init.

Example::

    free-bench adapt --release demo-output/owners/owner-6/release --data data-cache/benchmark
        --split meta-test --out benchmarks/results/adaptation
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from free_common.bench.adapt import AdaptRequest, parse_shapes, run_adaptation
from free_common.console import out_console
from free_common.security.keys import load_public_key

__all__ = ["adapt"]


def adapt(
    release: Annotated[
        Path, typer.Option(help="release folder (meta.safetensors + manifest.json)")
    ],
    data: Annotated[Path, typer.Option(help="glyph set folder (free-bench data build)")],
    out: Annotated[Path, typer.Option(help="folder for results.json and results.md")],
    split: Annotated[
        str, typer.Option(help="meta-val (to choose defaults) or meta-test (to report)")
    ] = "meta-test",
    shapes: Annotated[str, typer.Option(help="task shapes, WAYSxSHOTS")] = "5x1,5x5,20x1",
    episodes: Annotated[int, typer.Option(min=2, help="tasks per domain and shape")] = 30,
    seed: Annotated[int, typer.Option(help="seeds the tasks and the random init")] = 0,
    server_pub: Annotated[
        Path | None, typer.Option(help="the aggregator's server.pub: check the signature too")
    ] = None,
    source: Annotated[str, typer.Option(help="where the release came from (recorded)")] = "",
) -> None:
    """Score every adaptation protocol on the same tasks, from the release and random init."""
    request = AdaptRequest(
        release=release,
        data=data,
        out=out,
        split=split,
        shapes=parse_shapes(shapes),
        episodes=episodes,
        seed=seed,
        server_pub=None if server_pub is None else load_public_key(server_pub),
        release_source=source,
        command="free-bench " + shlex.join(sys.argv[1:]),
    )
    run_adaptation(request, _say)
    _say(f"wrote {out / 'results.md'} and {out / 'results.json'}")


def _say(text: str) -> None:
    out_console.print(text, markup=False, highlight=False)
