"""`free-bench`: build data sets, train teacher zoos and run benchmarks.

Examples::

    free-bench data build --size small --out data-cache/small
    free-bench data show data-cache/small --split meta-train --ways 5 --shots 1
    free-bench zoo --data data-cache/small --models 8 --arch mix --out data-cache/zoo
    free-bench run --preset smoke --data data-cache/small --zoo data-cache/zoo --out runs/smoke
    free-bench poison --data data-cache/benchmark --zoo data-cache/zoo --out runs/poison
    free-bench privacy --data data-cache/benchmark --zoo data-cache/zoo --out runs/privacy
    free-bench adapt --release RELEASE --data data-cache/benchmark --out runs/adapt
"""

from __future__ import annotations

from typing import NoReturn

import typer

from free_common.bench.adapt_cmd import adapt
from free_common.bench.data_cmd import data_app
from free_common.bench.poison_cmd import poison
from free_common.bench.privacy_cmd import privacy
from free_common.bench.run_cmd import run
from free_common.bench.zoo_cmd import zoo
from free_common.console import run_app

app = typer.Typer(
    name="free-bench",
    help="FREE-Fed research and benchmark tools: data sets, teacher zoos, benchmark runs,"
    " adaptation protocols.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.command("zoo")(zoo)
app.command("run")(run)
app.command("poison")(poison)
app.command("privacy")(privacy)
app.command("adapt")(adapt)


def main() -> NoReturn:
    """Console-script entry point of `free-bench`."""
    run_app(app)


if __name__ == "__main__":  # the ranks of `free-bench run --workers N` start here
    main()
