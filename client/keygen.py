"""`free-client keygen`: the data owner's two key pairs.

- ``client.key`` / ``client.pub``: Ed25519 (PKCS#8 / SubjectPublicKeyInfo PEM)
  to sign submissions; the aggregator registers ``client.pub``.
- ``node.key`` / ``node.pub``: EC P-384 in OpenSSH format, what flwr reads for
  SuperNode authentication (``--auth-supernode-private-key node.key``;
  ``flwr supernode register node.pub``).

Private keys get mode 0600. Nothing is ever overwritten: all four paths are
checked before the first is written, so a refusal leaves no half set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization

from free_common.console import out_console
from free_common.errors import ConfigError
from free_common.security.files import write_key_file
from free_common.security.keys import (
    generate_signing_key,
    key_id,
    write_private_key,
    write_public_key,
)
from free_common.security.node_keys import generate_node_key, node_public_key_line

__all__ = ["KeyPaths", "generate_keys", "keygen"]


@dataclass(frozen=True)
class KeyPaths:
    """Where `generate_keys` put the keys, and the signing key's id."""

    client_key: Path
    client_pub: Path
    node_key: Path
    node_pub: Path
    key_id: str

    @classmethod
    def under(cls, folder: Path, key_id: str = "") -> KeyPaths:
        """Return the standard file names inside `folder`."""
        return cls(
            folder / "client.key",
            folder / "client.pub",
            folder / "node.key",
            folder / "node.pub",
            key_id,
        )


def generate_keys(folder: Path) -> KeyPaths:
    """Write a fresh signing key pair and SuperNode key pair into `folder`.

    Raises
    ------
    ConfigError
        One of the four files already exists, or `folder` cannot be written.
    """
    planned = KeyPaths.under(folder)
    targets = (planned.client_key, planned.client_pub, planned.node_key, planned.node_pub)
    existing = [path.name for path in targets if path.exists() or path.is_symlink()]
    if existing:
        raise ConfigError(
            f"{folder} already holds {', '.join(existing)}: keygen never overwrites keys;"
            " choose another --out folder"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder: choose another --out")
    signing = generate_signing_key()
    node = generate_node_key()
    node_private = node.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    written: list[Path] = []
    try:
        write_private_key(signing, planned.client_key)
        written.append(planned.client_key)
        write_public_key(signing.public_key(), planned.client_pub)
        written.append(planned.client_pub)
        write_key_file(planned.node_key, node_private, private=True, overwrite=False)
        written.append(planned.node_key)
        write_key_file(
            planned.node_pub, node_public_key_line(node) + b"\n", private=False, overwrite=False
        )
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return KeyPaths.under(folder, key_id(signing.public_key()))


def keygen(
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for the four key files.", show_default=False),
    ],
) -> None:
    """Make your keys: client.key/.pub (signs submissions), node.key/.pub (Flower)."""
    paths = generate_keys(out)
    out_console.print(
        f"wrote {paths.client_key} and {paths.client_pub} (key id {paths.key_id})",
        highlight=False,
        soft_wrap=True,
    )
    out_console.print(
        f"wrote {paths.node_key} and {paths.node_pub} (SuperNode key, EC P-384)",
        highlight=False,
        soft_wrap=True,
    )
    out_console.print(
        "send client.pub and node.pub to the aggregator; keep the .key files private",
        highlight=False,
        soft_wrap=True,
    )
