"""EC P-384 SuperNode key pairs: flwr's own loaders accept the files we write."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from free_common.errors import ConfigError, KeyFormatError
from free_common.security import (
    generate_node_key,
    generate_signing_key,
    load_node_private_key,
    node_public_key_line,
    write_node_key_pair,
)

# `ssh-keygen -t ecdsa -b 384 -N pw`: writing an encrypted OpenSSH key with
# cryptography needs bcrypt, which is not installed, so a throwaway one is inlined.
ENCRYPTED_P384 = b"""-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABBsJ2KfJS
jkNOwIbcBB+ArCAAAAEAAAAAEAAACIAAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlz
dHAzODQAAABhBH5MVEkTapQ3ZEVldOvt+E6wt3g1NRem+DhfAc2uZPf+5wqO0zCCZvGWFb
wWq4a8IYsnEJLrqrF+jZhIi+EWbOgxeId3hgoJO8Is66w1vpUWOTQhrq7qRyuvK0I3rtJS
fgAAANBMd5YBipxiPaWS6EueP6936/mvho30g7Xhhp4UtizrWU99HiqqKp/T4u3NrrLm7q
Dp1Tadvm2ThsJnPpK+9uAwlTpz1L9o2PSxFx0c0htGbU9cge6ZZgRuz5zqVpiUE4+VEBGj
s76Xq8YWmVN2a2u/MTab9CG+JC+lPR0AnzqJpYOpUIy34eRPZUopZ5CxH4ZgD+hvPZo4Ov
a3l1L5rYW7cvR8gstODRP/QjNiOV/hWNTms9HO60oHulDtzVb4QYm2Juo18+/2HeFA7A5a
xNGc
-----END OPENSSH PRIVATE KEY-----
"""


def test_node_key_pair_is_what_flwr_reads(tmp_path: Path) -> None:
    key = generate_node_key()
    assert isinstance(key.curve, ec.SECP384R1)
    private, public = write_node_key_pair(key, tmp_path / "sn1")
    assert public == tmp_path / "sn1.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    assert public.read_bytes().rstrip(b"\n") == node_public_key_line(key)

    # What `flower-supernode --auth-supernode-private-key` runs on the file.
    args = argparse.Namespace(
        auth_supernode_private_key=str(private), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    assert loaded[0].private_numbers() == key.private_numbers()
    # What `flwr supernode register sn1.pub` runs on the public file.
    registered = try_load_public_key(public)
    assert registered == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert load_node_private_key(private).private_numbers() == key.private_numbers()


def test_node_key_pair_is_not_overwritten_by_halves(tmp_path: Path) -> None:
    path = tmp_path / "sn1"
    (tmp_path / "sn1.pub").write_bytes(b"someone else's key\n")
    with pytest.raises(ConfigError, match=r"sn1\.pub already exists"):
        write_node_key_pair(generate_node_key(), path)
    assert not path.exists()
    write_node_key_pair(generate_node_key(), path, overwrite=True)
    assert load_node_private_key(path).curve.name == "secp384r1"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            generate_signing_key().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            "holds an Ed25519 key; a SuperNode needs an EC key on a NIST curve",
        ),
        (
            # A PKCS#8 EC key: the right curve in a format flwr cannot read.
            generate_node_key().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "is not an OpenSSH private key: make one with `ssh-keygen -t ecdsa -b 384",
        ),
        (ENCRYPTED_P384, "is password-protected: flwr needs an unencrypted"),
        (b"junk", "is not an OpenSSH private key"),
    ],
)
def test_bad_node_key_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "sn"
    path.write_bytes(content)
    with pytest.raises(KeyFormatError) as info:
        load_node_private_key(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
