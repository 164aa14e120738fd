"""Options the exchange commands (`submit`, `fetch`) share, and the connection they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from free_client.stub import Connection
from free_common.security.keys import load_public_key

__all__ = [
    "CaOption",
    "InsecureOption",
    "KeyOption",
    "ServerOption",
    "TlsCertOption",
    "TlsKeyOption",
    "connection",
    "pinned_key",
]

ServerOption = Annotated[
    str,
    typer.Option("--server", help="HOST:PORT of the aggregator's exchange.", show_default=False),
]
KeyOption = Annotated[
    Path,
    typer.Option("--key", help="Your client.key (Ed25519, from keygen).", show_default=False),
]
CaOption = Annotated[
    Path | None,
    typer.Option("--ca", help="The aggregator's ca.pem: the only CA trusted for TLS."),
]
InsecureOption = Annotated[
    bool,
    typer.Option("--insecure", help="Plaintext, for a server started with --insecure."),
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option("--tls-cert", help="Client certificate, for a server that requires mutual TLS."),
]
TlsKeyOption = Annotated[
    Path | None,
    typer.Option("--tls-key", help="Private key of --tls-cert."),
]


def connection(
    server: str,
    ca: Path | None,
    insecure: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> Connection:
    """Build the connection the options describe (checked by `Connection`)."""
    return Connection(server=server, ca=ca, insecure=insecure, tls_cert=tls_cert, tls_key=tls_key)


def pinned_key(path: Path | None) -> Ed25519PublicKey | None:
    """Load the pinned server key, if one was given."""
    return None if path is None else load_public_key(path)
