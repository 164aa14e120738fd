"""`free-server clients add|list|revoke|rotate`: the allow-list of data owners.

These commands write the store directly, so they work while the server runs:
the server reads the allow-list on every request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.table import Table

from free_common.console import out_console
from free_common.errors import ConfigError, KeyFormatError
from free_common.security.files import read_key_file
from free_common.security.keys import key_id, load_public_key, public_key_pem
from free_common.security.node_keys import NIST_CURVES
from free_server.commands.options import HomeOption
from free_server.home import ServerHome
from free_server.records import ClientRow

__all__ = ["app"]

app = typer.Typer(
    help="The allow-list of data owners (works while the server runs).",
    no_args_is_help=True,
)

_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_name(name: str) -> str:
    if not _CLIENT_NAME.fullmatch(name):
        raise ConfigError(
            f"client name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def _node_public_key(path: Path) -> str:
    """Read a SuperNode public key the way `flwr supernode register` will, as one line."""
    data = read_key_file(path, "SuperNode public key")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(
            f"{path} is not an OpenSSH public key line: give the node.pub that"
            " `free-client keygen` wrote"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise KeyFormatError(f"{path} is not an EC key on a NIST curve, as Flower requires")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode("ascii")


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A short name for the owner.", show_default=False)],
    client_pub: Annotated[
        Path, typer.Argument(help="The owner's client.pub (Ed25519 PEM).", show_default=False)
    ],
    home: HomeOption,
    node_pub: Annotated[
        Path | None,
        typer.Option("--node-pub", help="The owner's node.pub, for owners who will `join`."),
    ] = None,
) -> None:
    """Put a data owner's key on the allow-list."""
    _check_name(name)
    public_key = load_public_key(client_pub)
    node_line = None if node_pub is None else _node_public_key(node_pub)
    with ServerHome.open(home).open_store() as store:
        row = store.add_client(
            name,
            key_id=key_id(public_key),
            public_key_pem=public_key_pem(public_key).decode("ascii"),
            node_public_key=node_line,
        )
    node = " with a node key" if row.node_public_key else ""
    out_console.print(f"added client {row.name} (key id {row.key_id}){node}", highlight=False)


@app.command("list")
def list_(
    home: HomeOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show every registered owner key, revoked and replaced ones included."""
    with ServerHome.open(home).open_store() as store:
        clients = store.list_clients()
    if as_json:
        typer.echo(json.dumps([_client_json(c) for c in clients], indent=2))
        return
    table = Table("name", "node key", "added", "state")
    table.add_column("key id", overflow="fold")  # ids are copied by hand: never cut them
    for client in clients:
        since = client.replaced_at or client.revoked_at
        state = client.state if since is None else f"{client.state} {since:%Y-%m-%d %H:%M}"
        table.add_row(
            client.name,
            "yes" if client.node_public_key else "no",
            f"{client.added_at:%Y-%m-%d %H:%M}",
            state,
            client.key_id,
        )
    out_console.print(table)


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The owner's name.", show_default=False)],
    home: HomeOption,
    keep_submissions: Annotated[
        bool,
        typer.Option(
            "--keep-submissions",
            help="Keep the owner's models in later rounds (a key lost, not stolen).",
        ),
    ] = False,
) -> None:
    """Refuse an owner's key from now on and withdraw its models from later rounds."""
    with ServerHome.open(home).open_store() as store:
        done = store.revoke_client(name, withdraw=not keep_submissions)
    row = done.client
    if keep_submissions:
        kept = "its submissions stay in the pool (--keep-submissions)"
    else:
        kept = f"{done.withdrawn} submission(s) withdrawn from later rounds"
    out_console.print(f"revoked client {row.name} (key id {row.key_id}); {kept}", highlight=False)


@app.command("rotate")
def rotate(
    name: Annotated[str, typer.Argument(help="The owner's name.", show_default=False)],
    client_pub: Annotated[
        Path, typer.Argument(help="The owner's new client.pub (Ed25519 PEM).", show_default=False)
    ],
    home: HomeOption,
    node_pub: Annotated[
        Path | None,
        typer.Option("--node-pub", help="The owner's new node.pub (the old one is dropped)."),
    ] = None,
) -> None:
    """Give an owner a new key: it keeps its name and submissions, the old key is refused."""
    public_key = load_public_key(client_pub)
    node_line = None if node_pub is None else _node_public_key(node_pub)
    with ServerHome.open(home).open_store() as store:
        row = store.rotate_client(
            name,
            key_id=key_id(public_key),
            public_key_pem=public_key_pem(public_key).decode("ascii"),
            node_public_key=node_line,
        )
    if node_pub is not None:
        node = "; node key replaced"
    else:
        node = "; node key kept" if row.node_public_key else ""
    out_console.print(
        f"rotated client {row.name} to key id {row.key_id}; the previous key is refused"
        f" from now on{node}",
        highlight=False,
    )


def _client_json(client: ClientRow) -> dict[str, Any]:
    return {
        "name": client.name,
        "key_id": client.key_id,
        "public_key_pem": client.public_key_pem,
        "node_public_key": client.node_public_key,
        "added_at": client.added_at.isoformat(),
        "revoked_at": None if client.revoked_at is None else client.revoked_at.isoformat(),
        "replaced_at": None if client.replaced_at is None else client.replaced_at.isoformat(),
        "active": client.active,
        "state": client.state,
    }
