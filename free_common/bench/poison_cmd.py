"""`free-bench poison`: bad models of five kinds, and what screening makes of them.

Example::

    free-bench poison --data data-cache/benchmark --zoo data-cache/zoo-bench-conv4-30 --out DIR
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from free_common.bench.poison import PoisonRequest, run_poison, write_report
from free_common.console import out_console
from free_common.screening import ScreeningConfig

__all__ = ["poison"]


def poison(
    data: Annotated[Path, typer.Option(help="glyph set folder (free-bench data build)")],
    zoo: Annotated[Path, typer.Option(help="Conv4 teacher zoo (free-bench zoo)")],
    out: Annotated[Path, typer.Option(help="folder for results.json, results.md, work/")],
    pool: Annotated[int, typer.Option(help="honest teachers of the first round")] = 24,
    per_kind: Annotated[int, typer.Option(help="bad models built of each kind")] = 6,
    other_archs: Annotated[
        int, typer.Option(help="honest ResNet and MLP models trained, each")
    ] = 2,
    round_steps: Annotated[int, typer.Option(help="steps of the first round")] = 24,
    seed: Annotated[int, typer.Option(help="seeds every draw")] = 0,
    releases: Annotated[
        bool, typer.Option(help="also compare the releases of clean, poisoned and screened pools")
    ] = False,
    release_steps: Annotated[
        int | None, typer.Option(help="steps of those rounds (default: the cpu preset's)")
    ] = None,
    test_episodes: Annotated[int, typer.Option(help="meta-test episodes per release")] = 600,
) -> None:
    """Screen random, permuted, constant, other-domain and backdoored models, and honest ones."""
    request = PoisonRequest(
        data,
        zoo,
        out,
        pool,
        per_kind,
        other_archs,
        round_steps,
        seed,
        releases=releases,
        release_steps=release_steps,
        test_episodes=test_episodes,
    )
    result = run_poison(request, ScreeningConfig(), notify=lambda line: out_console.print(line))
    command = shlex.join(["free-bench", *sys.argv[1:]])
    write_report(result, out / "results.md", command)
    out_console.print(f"wrote {out / 'results.json'} and {out / 'results.md'}", highlight=False)
