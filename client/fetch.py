"""`free-client fetch`: download a release and verify it before it touches the output folder.

The server's signature on the release manifest is checked against
``--server-pub`` before a byte of weights is written; the weights' size and
sha256 are checked against that manifest before anything is renamed into
place (`free_common.security.release_dir`). ``--json`` prints the verified manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from free_client.options import (
    CaOption,
    InsecureOption,
    KeyOption,
    ServerOption,
    TlsCertOption,
    TlsKeyOption,
    connection,
)
from free_client.stub import ExchangeClient
from free_common.console import out_console
from free_common.security.canonical import canonical_json
from free_common.security.keys import load_private_key, load_public_key
from free_common.security.release_dir import MANIFEST_NAME, WEIGHTS_NAME, save_release

__all__ = ["fetch"]


def fetch(
    server: ServerOption,
    key: KeyOption,
    server_pub: Annotated[
        Path,
        typer.Option(
            "--server-pub",
            help="The aggregator's server.pub: only releases it signed are accepted.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for meta.safetensors and manifest.json.", show_default=False
        ),
    ],
    ca: CaOption = None,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="Release version; default the latest.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    insecure: InsecureOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Download the latest (or --version) release, verify it, write it to --out."""
    target = connection(server, ca, insecure, tls_cert, tls_key)
    signing_key = load_private_key(key)
    pinned = load_public_key(server_pub)
    with ExchangeClient(target, signing_key) as client:
        signed, chunks = client.fetch_release(version)
        release = save_release(signed, chunks, out, pinned)
    if as_json:
        typer.echo(json.dumps(canonical_json(release), indent=2))
        return
    out_console.print(
        f"release {release.version} ({release.architecture}, {release.payload_size:,} bytes,"
        f" from {len(release.source_submission_ids)} models) verified with server key"
        f" {release.server_key_id}; wrote {out / WEIGHTS_NAME} and {out / MANIFEST_NAME}",
        highlight=False,
        soft_wrap=True,
    )
