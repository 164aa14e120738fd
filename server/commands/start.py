"""`free-server start`: run the exchange service and the intake workers until stopped."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from free_common.console import out_console
from free_server.commands.options import HomeOption
from free_server.home import ServerHome

__all__ = ["start"]


def start(
    home: HomeOption,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            help="Exchange (gRPC) port; default network.exchange_port; 0 picks a free one.",
        ),
    ] = None,
    flower_port: Annotated[
        int | None,
        typer.Option("--flower-port", help="Port of the Flower TLS front for owners' SuperNodes."),
    ] = None,
    min_models: Annotated[
        int | None,
        typer.Option("--min-models", help="Start a meta round once this many new models wait."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Serve in plaintext, without TLS (local tests only)."),
    ] = False,
    console_port: Annotated[
        int | None,
        typer.Option(
            "--console-port",
            help="Serve the read-only web console and /metrics on this port (TLS, token;"
            " console.listen, loopback by default); 0 picks a free one. Off unless given.",
        ),
    ] = None,
    no_flower: Annotated[
        bool,
        typer.Option(
            "--no-flower",
            help="Exchange only: no SuperLink, no owners' front, no scheduled rounds.",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Processes per meta round, started by torch's launcher (gloo on CPU,"
            " NCCL with one GPU each); rank 0 checkpoints and publishes.",
        ),
    ] = 1,
) -> None:
    """Serve owners: receive signed models, judge them, serve releases. Stop with Ctrl-C."""
    # The runtime pulls in the intake stack (onnx, torch): only load it to run.
    from free_server.runtime import ServerRuntime, StartOptions

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options = StartOptions(
        port=port,
        flower_port=flower_port,
        min_models=min_models,
        insecure=insecure,
        flower=not no_flower,
        console_port=console_port,
        workers=workers,
    )
    runtime = ServerRuntime(ServerHome.open(home), options)
    runtime.start()
    exchange = runtime.exchange
    assert exchange is not None  # set by start()
    show = out_console.print
    show(
        f"exchange service listening on {exchange.address} ({exchange.listen.security}),"
        f" server key id {runtime.server_key_id}",
        highlight=False,
        soft_wrap=True,
    )
    if runtime.flower is not None:
        show(
            f"flower front for owners' SuperNodes on {runtime.flower.front.address} (TLS)",
            highlight=False,
            soft_wrap=True,
        )
    if runtime.console is not None:
        show(
            f"console on {runtime.console.url} (TLS, read-only); a token comes from"
            " `free-server console token`",
            highlight=False,
            soft_wrap=True,
        )
    if insecure:
        show("warning: plaintext transport; never use --insecure across a network", style="yellow")
    show("stop with Ctrl-C or SIGTERM", highlight=False)
    sys.stdout.flush()
    runtime.serve_until_signalled()
    show("server stopped", highlight=False)
