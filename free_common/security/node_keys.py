"""EC P-384 key pairs for Flower SuperNode authentication.

Flower authenticates SuperNodes with NIST EC keys, not Ed25519, so every data
owner has a second key pair next to its signing key. The formats are the ones
flwr 1.41 reads: ``flower-supernode --auth-supernode-private-key FILE`` loads
FILE with ``load_ssh_private_key`` (OpenSSH private key format, unencrypted), and
``flwr supernode register FILE.pub`` loads an OpenSSH public key line
(``ecdsa-sha2-nistp384 AAAA...``) -- what ``ssh-keygen -t ecdsa -b 384`` writes.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from free_common.errors import ConfigError, KeyFormatError
from free_common.security.files import read_key_file, write_key_file
from free_common.security.keys import describe_key

__all__ = [
    "NIST_CURVES",
    "generate_node_key",
    "load_node_private_key",
    "node_public_key_line",
    "write_node_key_pair",
]

NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
"""Curves flwr accepts for SuperNode keys that ssh also supports."""


def generate_node_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh EC P-384 (secp384r1) private key, the curve flwr generates itself."""
    return ec.generate_private_key(ec.SECP384R1())


def node_public_key_line(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the OpenSSH public key line of a node key, as `flwr supernode register` reads it."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def write_node_key_pair(
    private_key: ec.EllipticCurvePrivateKey, path: Path, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``path`` (OpenSSH private key, 0600) and ``path.pub`` (OpenSSH public line).

    Parameters
    ----------
    private_key
        The node key, from `generate_node_key`.
    path
        Private key file; the public key goes next to it with ``.pub`` appended.
    overwrite
        Replace existing files instead of refusing.

    Returns
    -------
    tuple[Path, Path]
        The private and public key paths.

    Raises
    ------
    ConfigError
        When a file exists and ``overwrite`` is false, or cannot be written.
    """
    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    if not overwrite:
        # Check both first, so a refusal never leaves half a pair behind.
        for target in (path, public_path):
            if target.exists():
                raise ConfigError(f"{target} already exists: move it away or choose another path")
    private_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_key_file(path, private_bytes, private=True, overwrite=True)
    write_key_file(
        public_path, node_public_key_line(private_key) + b"\n", private=False, overwrite=True
    )
    return path, public_path


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode private key the way flwr will, with a clear message when it cannot.

    Raises
    ------
    KeyFormatError
        The file is missing, unreadable, not an unencrypted OpenSSH private key,
        or not an EC key on a NIST curve.
    """
    what = "SuperNode private key"
    data = read_key_file(path, what)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise KeyFormatError(
            f"{path} is password-protected: flwr needs an unencrypted {what}"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(
            f"{path} is not an OpenSSH private key: make one with "
            f"`ssh-keygen -t ecdsa -b 384 -N '' -f {path}` or the FREE-Fed key command"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise KeyFormatError(
            f"{path} holds {describe_key(key)}; a SuperNode needs an EC key on a NIST curve (P-384)"
        )
    return key
