"""`free-bench privacy`: leakage audit and membership attacks on a zoo whose data is known.

Example::

    free-bench privacy --data data-cache/benchmark --zoo data-cache/zoo-bench-conv4-30 --out DIR
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from free_common.bench.privacy import PrivacyRequest, run_privacy, write_report
from free_common.console import out_console
from free_common.privacy.audit import AuditConfig

__all__ = ["privacy"]


def privacy(
    data: Annotated[Path, typer.Option(help="glyph set folder (free-bench data build)")],
    zoo: Annotated[Path, typer.Option(help="teacher zoo (free-bench zoo)")],
    out: Annotated[Path, typer.Option(help="folder for results.json, results.md, figures/")],
    teachers: Annotated[int, typer.Option(help="zoo teachers the round and audit use")] = 24,
    preset: Annotated[str, typer.Option(help="engine preset of the round")] = "cpu",
    round_steps: Annotated[int, typer.Option(help="steps of the round")] = 24,
    images_per_class: Annotated[int, typer.Option(help="images recovered per class")] = 10,
    adapt_steps: Annotated[
        int | None, typer.Option(help="generator steps per teacher (default: the round's)")
    ] = None,
    test_episodes: Annotated[
        int, typer.Option(help="meta-test episodes per shot count for the release (0: skip)")
    ] = 0,
    seed: Annotated[int, typer.Option(help="seeds the round, the audit and the bootstrap")] = 0,
) -> None:
    """Audit the images a round recovers from each teacher and attack teachers and release."""
    request = PrivacyRequest(data, zoo, out, teachers, preset, round_steps, test_episodes, seed)
    audit = AuditConfig(images_per_class=images_per_class, adapt_steps=adapt_steps, seed=seed)
    result = run_privacy(request, audit, notify=lambda line: out_console.print(line, markup=False))
    command = shlex.join(["free-bench", *sys.argv[1:]])
    write_report(result, out / "results.md", command)
    out_console.print(f"wrote {out / 'results.json'} and {out / 'results.md'}", highlight=False)
