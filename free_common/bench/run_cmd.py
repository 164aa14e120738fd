"""`free-bench run`: every method on the same teachers, results.json, results.md, pictures.

Example::

    free-bench data build --size small --out data-cache/small
    free-bench zoo --data data-cache/small --models 8 --out data-cache/zoo
    free-bench run --preset smoke --data data-cache/small --zoo data-cache/zoo --out runs/smoke
    free-bench run ... --tensorboard runs/tb     # then: tensorboard --logdir runs/tb

With ``--tensorboard DIR`` each trained method's round writes TensorBoard event files
to ``DIR/<method>/`` (`free_common.engine.tensorboard`), so the methods' curves can be
laid side by side.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from free_common.bench.launch import relaunch, under_launcher
from free_common.bench.run import METHODS, BenchRequest, run_benchmark
from free_common.console import Advance, out_console, progress
from free_common.engine import (
    EngineEvent,
    RoundFinished,
    RoundStarted,
    ScratchRecovered,
    StepFinished,
)
from free_common.engine.distributed import init_from_env, shutdown
from free_common.engine.tensorboard import TensorBoardLogger

__all__ = ["run"]


class _Progress:
    """Turns engine events into one progress bar per round and one line per result."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._advance: Advance | None = None

    def __call__(self, method: str, event: EngineEvent | str) -> None:
        if isinstance(event, str):
            out_console.print(f"{method}: {event}", markup=False, highlight=False)
        elif isinstance(event, RoundStarted):
            label = f"{method}: {event.teachers} teachers, {event.steps} steps"
            self._advance = self._stack.enter_context(progress(label, event.steps))
            if event.start_step:
                self._advance(event.start_step)
        elif isinstance(event, StepFinished | ScratchRecovered) and self._advance is not None:
            if isinstance(event, StepFinished):
                self._advance(1)
        elif isinstance(event, RoundFinished):
            self._stack.close()
            self._advance = None
            out_console.print(
                f"{method}: done in {event.seconds:.0f} s, selected step {event.selected_step} "
                f"({event.selection})",
                markup=False,
                highlight=False,
            )

    def close(self) -> None:
        self._stack.close()


class _TensorBoard:
    """Hands each method's engine events to its own TensorBoard logger in ``DIR/<method>``."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._loggers: dict[str, TensorBoardLogger] = {}

    def __call__(self, method: str, event: EngineEvent | str) -> None:
        if isinstance(event, str):
            return
        if method not in self._loggers:
            self._loggers[method] = TensorBoardLogger(self._root / method)
        self._loggers[method](event)

    def close(self) -> None:
        for logger in self._loggers.values():
            logger.close()


def _both(
    first: Callable[[str, EngineEvent | str], None],
    second: Callable[[str, EngineEvent | str], None],
) -> Callable[[str, EngineEvent | str], None]:
    def notify(method: str, event: EngineEvent | str) -> None:
        first(method, event)
        second(method, event)

    return notify


def run(
    preset: Annotated[str, typer.Option(help="smoke (minutes), cpu (2-core CPU), paper (GPU)")],
    data: Annotated[Path, typer.Option(help="glyph set folder (free-bench data build)")],
    zoo: Annotated[Path, typer.Option(help="teacher zoo folder (free-bench zoo)")],
    out: Annotated[Path, typer.Option(help="folder for results.json, results.md, figures/")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int | None, typer.Option(help="seed (default: the preset's)")] = None,
    rounds: Annotated[
        str | None,
        typer.Option(
            help="run only these rounds (comma-separated: free,free-no-iga,scratch,distill) "
            "into OUT/work and stop; a later --reuse-rounds run measures and reports"
        ),
    ] = None,
    reuse_rounds: Annotated[
        bool,
        typer.Option(help="take rounds already finished in OUT/work with the same settings"),
    ] = False,
    skip: Annotated[
        str | None,
        typer.Option(help="leave out trained methods (comma-separated; not free); reported"),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="processes per round (torch.distributed: gloo on CPU, NCCL with one GPU "
            "each); rank 0 measures and writes the results",
        ),
    ] = 1,
    tensorboard: Annotated[
        Path | None,
        typer.Option(help="write TensorBoard event files of each round to DIR/<method>/"),
    ] = None,
) -> None:
    """Run FREE, FREE without iGA, scratch inversion, weight averaging and random init."""
    if workers > 1 and not under_launcher():
        raise typer.Exit(relaunch(workers, sys.argv[1:]))
    main = True
    if under_launcher():
        group, _ = init_from_env(device)
        main = group.is_main
    _run(preset, data, zoo, out, device, seed, rounds, reuse_rounds, skip, main, tensorboard)
    shutdown()


def _run(
    preset: str,
    data: Path,
    zoo: Path,
    out: Path,
    device: str,
    seed: int | None,
    rounds: str | None,
    reuse_rounds: bool,
    skip: str | None,
    main: bool,
    tensorboard: Path | None,
) -> None:
    command = "free-bench " + shlex.join(sys.argv[1:])
    only = tuple(m.strip() for m in rounds.split(",") if m.strip()) if rounds else ()
    left_out = tuple(m.strip() for m in skip.split(",") if m.strip()) if skip else ()
    request = BenchRequest(
        preset, data, zoo, out, device, seed, command, only, reuse_rounds, left_out
    )
    reporter = _Progress()
    board = _TensorBoard(tensorboard) if tensorboard is not None and main else None
    notify = reporter if board is None else _both(reporter, board)
    try:
        results = run_benchmark(request, notify if main else None)
    finally:
        reporter.close()
        if board is not None:
            board.close()
    if not main:
        return
    if only:
        for method, sha in results["rounds"].items():
            out_console.print(f"{method}: round finished, initialization {sha[:16]}...",
                              markup=False, highlight=False)  # fmt: skip
        return
    for row in results["accuracy"]:
        out_console.print(
            f"{row['method']:>12} {row['shots']}-shot: {100 * row['mean']:.2f} "
            f"± {100 * row['ci95']:.2f}",
            markup=False,
            highlight=False,
        )
    recovery = results["recovery"]
    scratch = (
        "scratch not run"
        if recovery["speedup"] is None
        else f"scratch {recovery['scratch_seconds_per_teacher']:.2f} s per teacher "
        f"({recovery['speedup']:.1f}x)"
    )
    out_console.print(
        f"recovery: FIVE {recovery['free_seconds_per_teacher']:.2f} s, {scratch}; teacher "
        f"accuracy {recovery['free_teacher_accuracy']:.2f}",
        markup=False,
        highlight=False,
    )
    out_console.print(
        f"wrote {out / 'results.md'} ({', '.join(METHODS)})", markup=False, highlight=False
    )
