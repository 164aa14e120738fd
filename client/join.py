"""`free-client join`: take part in meta rounds as a Flower SuperNode.

Runs a real ``flower-supernode`` that connects to the aggregator's Flower front
(``--superlink HOST:PORT``, the server's flower port) over TLS, trusting only
``--ca``, and authenticates with the owner's node key (``KEYDIR/node.key``, EC
P-384, registered by the aggregator with ``free-server clients add ...
--node-pub node.pub``). It stays in the foreground until Ctrl-C or SIGTERM.

The SuperNode runs only the ClientApp of the installed ``free_client``
(`free_client.trusted_clientapp`): a run that ships any other app bundle is
refused. For each meta round it receives the release, checks the server's
signature against ``--server-pub``, stores it as
``OUT/releases/<version>/meta.safetensors`` and ``manifest.json``, and, with
``--data DIR``, fine-tunes it on local few-shot episodes and replies with the
accuracy (`free_client.client_app`; the folder layout is in
`free_client.local_tasks`: ``DIR/<class>/<images>``).

``OUT`` (default: the key folder) also gets ``.flower/``: Flower's own folder,
the node config and the ``flwr-clientapp`` command the SuperNode runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from free_client.node_settings import JoinSettings
from free_common.console import out_console
from free_common.errors import ConfigError, FlowerError, NodeNotAdmitted, TlsError
from free_common.security.keys import load_public_key
from free_common.security.node_keys import load_node_private_key

__all__ = ["JoinOptions", "join", "prepare", "run_supernode", "supernode_command"]

log = logging.getLogger("free_client.join")

_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
_SHIM = """#!{python}
# Written by `free-client join`: Flower's SuperNode runs this for every task.
from free_client.trusted_clientapp import main

main()
"""


@dataclass(frozen=True)
class JoinOptions:
    """Everything `join` was given, checked.

    Attributes
    ----------
    superlink
        ``HOST:PORT`` of the aggregator's Flower front.
    node_key
        The owner's SuperNode private key (``KEYDIR/node.key``).
    ca
        The aggregator's CA certificate, the only one trusted for TLS.
    settings
        What the ClientApp does with each release.
    state_dir
        ``OUT/.flower``: Flower's folder, the node config, the executor command.
    runtime_port
        Port on 127.0.0.1 of the SuperNode's local API for its ClientApp tasks.
    """

    superlink: str
    node_key: Path
    ca: Path
    settings: JoinSettings
    state_dir: Path
    runtime_port: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _check_address(superlink: str) -> str:
    match = _ADDRESS.fullmatch(superlink)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(
            f"--superlink {superlink!r} is not HOST:PORT: give the aggregator's address and"
            " flower port, e.g. server.example.org:9092"
        )
    return superlink


def prepare(
    superlink: str,
    key_dir: Path,
    ca: Path,
    server_pub: Path,
    *,
    data: Path | None = None,
    out: Path | None = None,
    runtime_port: int | None = None,
    shots: int = 5,
    episodes: int = 20,
) -> JoinOptions:
    """Check the options and write ``OUT/.flower`` (node config, executor command).

    Raises
    ------
    ConfigError
        A bad address, folder or number.
    KeyFormatError
        The node key or the server key cannot be read.
    """
    _check_address(superlink)
    node_key = key_dir / "node.key"
    load_node_private_key(node_key)
    load_public_key(server_pub)
    if not ca.is_file():
        raise ConfigError(f"--ca {ca} does not exist: give the aggregator's ca.pem")
    if data is not None and not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder (expected DATA/<class>/<images>)")
    root = (out or key_dir).resolve()
    settings = JoinSettings(
        server_pub=server_pub.resolve(),
        releases_dir=root / "releases",
        data_dir=None if data is None else data.resolve(),
        shots=shots,
        episodes=episodes,
    )
    state = root / ".flower"
    (state / "bin").mkdir(parents=True, exist_ok=True)
    (state / "flwr-home").mkdir(exist_ok=True)
    (state / "node-config.toml").write_text(settings.to_toml(), encoding="utf-8")
    shim = state / "bin" / "flwr-clientapp"
    shim.write_text(_SHIM.format(python=sys.executable), encoding="utf-8")
    shim.chmod(0o755)
    return JoinOptions(
        superlink=superlink,
        node_key=node_key.resolve(),
        ca=ca.resolve(),
        settings=settings,
        state_dir=state,
        runtime_port=runtime_port or _free_port(),
    )


def supernode_command(options: JoinOptions) -> tuple[list[str], dict[str, str]]:
    """Return the ``flower-supernode`` command line and environment for `options`."""
    # flower_app loads flwr: only when a node is started, not with the command line.
    from free_common.flower_app import flower_environment

    state = options.state_dir
    env = flower_environment(state / "flwr-home", path_first=[state / "bin"])
    binary = shutil.which("flower-supernode", path=env["PATH"])
    if binary is None:
        raise ConfigError(
            "the flower-supernode command is not installed: install flwr 1.41"
            " (pip install 'flwr>=1.41,<1.42')"
        )
    command = [
        binary,
        "--superlink",
        options.superlink,
        "--root-certificates",
        str(options.ca),
        "--auth-supernode-private-key",
        str(options.node_key),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(options.runtime_port),
        "--node-config",
        str(options.state_dir / "node-config.toml"),
    ]
    return command, env


def _die_with_parent() -> None:
    """In the child: get SIGTERM when `join` dies, even by SIGKILL (Linux)."""
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        pr_set_pdeathsig = 1
        ctypes.CDLL(libc_name).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _failure(code: int, lines: list[str], options: JoinOptions) -> Exception:
    text = "\n".join(lines)
    if "[code: 2004]" in text or "[code: 2001]" in text:
        return NodeNotAdmitted(
            f"the aggregator's Flower SuperLink does not accept the node key {options.node_key}:"
            " ask the aggregator to run `free-server clients add NAME client.pub --node-pub"
            " node.pub` (or it was revoked)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return TlsError(
            f"the Flower front at {options.superlink} has a certificate that --ca {options.ca}"
            " does not trust: give the aggregator's ca.pem"
        )
    last = next((line for line in reversed(lines) if line.strip()), "no output")
    return FlowerError(f"the Flower SuperNode stopped (exit {code}): {last.strip()}")


def run_supernode(options: JoinOptions) -> int:
    """Run the SuperNode in the foreground until it ends or join is signalled.

    Returns
    -------
    int
        0 when stopped by SIGINT/SIGTERM.

    Raises
    ------
    NodeNotAdmitted, TlsError, FlowerError
        The SuperNode ended on its own (node key refused, TLS, other).
    """
    command, env = supernode_command(options)
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=options.state_dir,
        preexec_fn=_die_with_parent,  # only sets the parent-death signal
    )
    tail: list[str] = []
    stopped = threading.Event()

    def relay() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip("\n"))
            del tail[:-40]

    reader = threading.Thread(target=relay, name="supernode-output", daemon=True)
    reader.start()

    def handle(signum: int, _frame: FrameType | None) -> None:
        stopped.set()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=5.0)
    if stopped.is_set():
        return 0
    raise _failure(code, tail, options)


def join(
    superlink: Annotated[
        str,
        typer.Option(
            "--superlink",
            help="HOST:PORT of the aggregator's Flower front (its flower port).",
            show_default=False,
        ),
    ],
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="Your key folder (from keygen); node.key is used.", show_default=False
        ),
    ],
    ca: Annotated[
        Path,
        typer.Option(
            "--ca", help="The aggregator's ca.pem: the only CA trusted.", show_default=False
        ),
    ],
    server_pub: Annotated[
        Path,
        typer.Option(
            "--server-pub",
            help="The aggregator's server.pub: only releases it signed are stored.",
            show_default=False,
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Local data (DATA/<class>/<images>) to fine-tune each release on."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where releases/<version>/ go; default the --key folder."),
    ] = None,
    shots: Annotated[
        int, typer.Option("--shots", min=1, help="Support images per class in local episodes.")
    ] = 5,
    episodes: Annotated[
        int, typer.Option("--episodes", min=1, help="Local episodes per release.")
    ] = 20,
    runtime_port: Annotated[
        int | None,
        typer.Option(
            "--runtime-port",
            min=1,
            max=65535,
            help="Local port of the SuperNode's task API; default a free one.",
        ),
    ] = None,
) -> None:
    """Join meta rounds as a Flower SuperNode: receive, verify, store and score releases."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    options = prepare(
        superlink,
        key,
        ca,
        server_pub,
        data=data,
        out=out,
        runtime_port=runtime_port,
        shots=shots,
        episodes=episodes,
    )
    out_console.print(
        f"joining {options.superlink} as a SuperNode; releases go to"
        f" {options.settings.releases_dir}; stop with Ctrl-C",
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()
    run_supernode(options)
    out_console.print("left the federation", highlight=False)
