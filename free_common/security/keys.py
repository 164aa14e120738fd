"""Ed25519 signing keys: generate, store as PEM, load, and name by key id.

Private keys are unencrypted PKCS#8 PEM files with mode 0600 (the server reads
its key unattended); public keys are SubjectPublicKeyInfo PEM. A key id is the
first `KEY_ID_HEX_CHARS` (32) hex characters of sha256 over the raw 32-byte
public key: 128 bits, enough that no one can make a second key with the same id,
and short enough to read in a log line. Owners are known by the key id of their
public key (the manifest's ``client_id``), the server by its ``server_key_id``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from free_common.errors import KeyFormatError
from free_common.security.files import read_key_file, write_key_file
from free_common.types import KEY_ID_HEX_CHARS

__all__ = [
    "describe_key",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_from_pem",
    "public_key_pem",
    "write_private_key",
    "write_public_key",
]


def generate_signing_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key id of a public key: sha256 of its raw bytes, first 32 hex characters.

    Parameters
    ----------
    public_key
        The Ed25519 public key.

    Returns
    -------
    str
        Lower-case hex, `KEY_ID_HEX_CHARS` long.
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_CHARS]


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """Encode a public key as SubjectPublicKeyInfo PEM."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_private_key(
    private_key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False
) -> None:
    """Store a private key as unencrypted PKCS#8 PEM, readable by its owner only (0600).

    Raises
    ------
    ConfigError
        When ``path`` exists and ``overwrite`` is false, or it cannot be written.
    """
    data = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_key_file(path, data, private=True, overwrite=overwrite)


def write_public_key(public_key: Ed25519PublicKey, path: Path, *, overwrite: bool = False) -> None:
    """Store a public key as SubjectPublicKeyInfo PEM (mode 0644).

    Raises
    ------
    ConfigError
        When ``path`` exists and ``overwrite`` is false, or it cannot be written.
    """
    write_key_file(path, public_key_pem(public_key), private=False, overwrite=overwrite)


def describe_key(key: object) -> str:
    """Name a key's algorithm for an error message, e.g. ``"an EC secp384r1 key"``."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"an RSA {key.key_size}-bit key"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return "a DSA key"
    if isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "an Ed448 key"
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return "an X25519 key"
    if isinstance(key, x448.X448PrivateKey | x448.X448PublicKey):
        return "an X448 key"
    return f"a key of type {type(key).__name__}"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from an unencrypted PKCS#8 PEM file.

    Raises
    ------
    KeyFormatError
        The file is missing or unreadable, encrypted, not PEM, a public key, or
        another kind of key (EC, RSA, ...).
    """
    what = "Ed25519 private key"
    data = read_key_file(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's signal for "this key needs a password".
        raise KeyFormatError(
            f"{path} is password-protected: FREE-Fed needs an unencrypted {what} file"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(f"{path} is not a PEM {what}: {_guess(data, private=True)}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(
            f"{path} holds {describe_key(key)}, not an Ed25519 key: give the Ed25519 signing key"
        )
    return key


def public_key_from_pem(data: bytes, source: str = "public key") -> Ed25519PublicKey:
    """Parse an Ed25519 public key from SubjectPublicKeyInfo PEM bytes.

    Parameters
    ----------
    data
        The PEM bytes.
    source
        Where the bytes came from, for the message (a file name, "allow-list entry").

    Raises
    ------
    KeyFormatError
        The bytes are not a PEM public key, or hold another kind of key.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(
            f"{source} is not a PEM Ed25519 public key: {_guess(data, private=False)}"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{source} holds {describe_key(key)}, not an Ed25519 public key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a SubjectPublicKeyInfo PEM file.

    Raises
    ------
    KeyFormatError
        The file is missing or unreadable, not PEM, a private key, or another kind of key.
    """
    return public_key_from_pem(read_key_file(path, "Ed25519 public key"), str(path))


def _guess(data: bytes, *, private: bool) -> str:
    """Say what the bytes look like instead, so the message tells the user what to do."""
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        return "it is an OpenSSH private key; FREE-Fed signing keys are PKCS#8 PEM"
    if b"PRIVATE KEY-----" in data:
        if private:
            return "the private key PEM block is damaged"
        return "it holds a private key; give the public key file (never share the private one)"
    if b"PUBLIC KEY-----" in data:
        if private:
            return "it holds a public key; give the private key file"
        return "the public key PEM block is damaged"
    if data.startswith((b"ssh-", b"ecdsa-")):
        return "it is an OpenSSH public key line; FREE-Fed public keys are PEM"
    if b"-----BEGIN" in data:
        return "the PEM block is damaged or of an unsupported kind"
    return "no PEM block found"
