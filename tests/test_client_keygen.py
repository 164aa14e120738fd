"""`free-client keygen`: the owner's Ed25519 and SuperNode key pairs, as flwr reads them."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from free_client.keygen import generate_keys
from free_common.errors import ConfigError
from free_common.security.keys import key_id, load_private_key, load_public_key

BIN = Path(sys.executable).parent
FILES = ("client.key", "client.pub", "node.key", "node.pub")


def _keygen(out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [str(BIN / "free-client"), "keygen", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("owner") / "keys"
    result = _keygen(out)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_keygen_writes_four_files_with_owner_only_private_keys(made: tuple[Path, str]) -> None:
    out, stdout = made
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in FILES}
    assert modes == {
        "client.key": 0o600,
        "client.pub": 0o644,
        "node.key": 0o600,
        "node.pub": 0o644,
    }
    signing = load_private_key(out / "client.key")
    assert key_id(signing.public_key()) == key_id(load_public_key(out / "client.pub"))
    assert key_id(signing.public_key()) in stdout


def test_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = generate_keys(tmp_path)
    private, public = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(paths.node_key), auth_supernode_public_key=None
        )
    )
    assert isinstance(private.curve, ec.SECP384R1)
    assert public == private.public_key()
    registered = try_load_public_key(paths.node_pub)
    assert registered.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_two_runs_give_different_keys(tmp_path: Path) -> None:
    first, second = generate_keys(tmp_path / "a"), generate_keys(tmp_path / "b")
    assert first.key_id != second.key_id
    assert first.node_pub.read_bytes() != second.node_pub.read_bytes()


@pytest.mark.parametrize("existing", FILES)
def test_keygen_never_overwrites_and_writes_nothing_on_refusal(
    tmp_path: Path, existing: str
) -> None:
    (tmp_path / existing).write_text("precious")
    with pytest.raises(ConfigError, match="never overwrites"):
        generate_keys(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_text() == "precious"


def test_keygen_refusal_on_the_command_line_is_one_line(made: tuple[Path, str]) -> None:
    out, _ = made
    before = {name: (out / name).read_bytes() for name in FILES}
    again = _keygen(out)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "never overwrites" in again.stderr
    assert {name: (out / name).read_bytes() for name in FILES} == before


def test_keygen_into_a_file_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        generate_keys(tmp_path / "file")
