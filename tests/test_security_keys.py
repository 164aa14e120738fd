"""Ed25519 key files: write, load, key ids, and one clear line for every bad file."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from free_common.errors import ConfigError, KeyFormatError
from free_common.security import (
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_pem,
    public_key_pem,
    write_private_key,
    write_public_key,
)
from free_common.security.keys import describe_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_pair_round_trips_with_owner_only_private_file(tmp_path: Path) -> None:
    key = generate_signing_key()
    private, public = tmp_path / "keys" / "owner.pem", tmp_path / "keys" / "owner.pub.pem"
    write_private_key(key, private)
    write_public_key(key.public_key(), public)
    assert _mode(private) == 0o600
    assert _mode(private.parent) == 0o700
    assert _mode(public) == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    loaded = load_private_key(private)
    assert key_id(loaded.public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(public)) == key_id(key.public_key())
    assert not list(private.parent.glob(".*tmp")), "temporary files left behind"


def test_key_id_is_documented_sha256_prefix() -> None:
    key = generate_signing_key().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:32]
    assert key_id(key) != key_id(generate_signing_key().public_key())
    assert key_id(public_key_from_pem(public_key_pem(key))) == key_id(key)


def test_existing_key_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first, second = generate_signing_key(), generate_signing_key()
    write_private_key(first, path)
    with pytest.raises(ConfigError, match="already exists: move it away"):
        write_private_key(second, path)
    assert key_id(load_private_key(path).public_key()) == key_id(first.public_key())
    write_private_key(second, path, overwrite=True)
    assert key_id(load_private_key(path).public_key()) == key_id(second.public_key())
    assert _mode(path) == 0o600


def _pem_private(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


EC_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = generate_signing_key()
ED_PRIVATE = ED_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
ED_PUBLIC = public_key_pem(ED_KEY.public_key())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_pem_private(EC_KEY), "holds an EC secp384r1 key, not an Ed25519 key"),
        (_pem_private(RSA_KEY), "holds an RSA 2048-bit key, not an Ed25519 key"),
        (b"hello, not a key\n", "is not a PEM Ed25519 private key: no PEM block found"),
        (b"", "is not a PEM Ed25519 private key"),
        (ED_PRIVATE[:60] + ED_PRIVATE[70:], "the private key PEM block is damaged"),
        (ED_PUBLIC, "it holds a public key; give the private key file"),
        (
            ED_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "is password-protected: FREE-Fed needs an unencrypted",
        ),
        (
            ED_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            "it is an OpenSSH private key; FREE-Fed signing keys are PKCS#8 PEM",
        ),
        (b"x" * (64 * 1024 + 1), "too big to be a key file (Ed25519 private key expected)"),
    ],
)
def test_bad_private_key_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    with pytest.raises(KeyFormatError) as info:
        load_private_key(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_pem_public(EC_KEY), "holds an EC secp384r1 key, not an Ed25519 public key"),
        (_pem_public(RSA_KEY), "holds an RSA 2048-bit key, not an Ed25519 public key"),
        (ED_PRIVATE, "it holds a private key; give the public key file"),
        (b"garbage", "no PEM block found"),
        (ED_PUBLIC[:40] + ED_PUBLIC[50:], "the public key PEM block is damaged"),
        (
            ED_KEY.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
            "it is an OpenSSH public key line; FREE-Fed public keys are PEM",
        ),
    ],
)
def test_bad_public_key_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "key.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFormatError) as info:
        load_public_key(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_unreadable_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match="does not exist: check the path, or generate"):
        load_private_key(tmp_path / "nope.pem")
    with pytest.raises(KeyFormatError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(KeyFormatError, match="cannot read Ed25519 private key file"):
        load_private_key(tmp_path)  # a directory


def test_describe_key_names_algorithms() -> None:
    assert describe_key(EC_KEY.public_key()) == "an EC secp384r1 key"
    assert describe_key(ED_KEY) == "an Ed25519 key"
    assert describe_key(object()) == "a key of type object"
