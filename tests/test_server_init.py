"""`free-server init` and `clients add|list|revoke`, run as real commands; the config file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from free_client.keygen import generate_keys
from free_common.errors import ConfigError, HomeError
from free_common.security.keys import key_id, load_private_key, load_public_key
from free_server.config import (
    LimitSettings,
    NetworkSettings,
    ServerConfig,
    load_config,
    write_config,
)
from free_server.home import ServerHome, create_home
from free_server.migrations import SCHEMA_VERSION
from free_server.toml_text import TomlValue, dumps

BIN = Path(sys.executable).parent


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [str(BIN / str(args[0])), *map(str, args[1:])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server") / "home"
    result = _run("free-server", "init", "--home", root, "--host", "fed.example.org")
    assert result.returncode == 0, result.stderr
    assert "server.pub" in result.stdout and "ca.pem" in result.stdout
    return root


@pytest.fixture(scope="module")
def owner_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("owner") / "keys"
    generate_keys(folder)
    return folder


def test_init_makes_a_complete_home(home: Path) -> None:
    opened = ServerHome.open(home)
    assert opened.config.network.hosts == ("fed.example.org",)
    assert opened.config.network.exchange_port == 9091 and opened.config.network.flower_port == 9092
    for private in ("ca.key", "tls.key", "server.key"):
        assert stat.S_IMODE((home / private).stat().st_mode) == 0o600, private
    signing = load_private_key(opened.signing_key)
    assert key_id(signing.public_key()) == key_id(load_public_key(opened.signing_pub))
    cert = x509.load_pem_x509_certificate(opened.tls_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(opened.ca_cert.read_bytes())
    assert cert.issuer == ca.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fed.example.org", "localhost"]
    with opened.open_store() as store:
        assert store.schema_version == SCHEMA_VERSION and store.list_clients() == []


def test_init_refuses_an_existing_home_and_changes_nothing(home: Path) -> None:
    before = {p: p.read_bytes() for p in home.iterdir() if p.is_file()}
    line = _one_line_error(_run("free-server", "init", "--home", home))
    assert "already exists" in line and "never overwrites" in line
    assert {p: p.read_bytes() for p in home.iterdir() if p.is_file()} == before


def test_init_accepts_an_empty_folder_but_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    create_home(tmp_path / "empty")
    assert (tmp_path / "empty" / "config.toml").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(HomeError):
        create_home(tmp_path / "file")


def test_init_with_a_bad_host_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    result = _run("free-server", "init", "--home", tmp_path / "h", "--host", "no spaces allowed")
    assert result.returncode == 2
    assert "--host" in _one_line_error(result)
    assert not (tmp_path / "h").exists()


def test_clients_add_list_revoke(home: Path, owner_keys: Path) -> None:
    added = _run(
        "free-server",
        "clients",
        "add",
        "alice",
        owner_keys / "client.pub",
        "--node-pub",
        owner_keys / "node.pub",
        "--home",
        home,
    )
    assert added.returncode == 0, added.stderr
    expected_id = key_id(load_public_key(owner_keys / "client.pub"))
    assert expected_id in added.stdout
    listed = json.loads(_run("free-server", "clients", "list", "--json", "--home", home).stdout)
    (alice,) = listed
    assert alice["name"] == "alice" and alice["key_id"] == expected_id and alice["active"]
    assert alice["node_public_key"] == (owner_keys / "node.pub").read_text().strip()
    table = _run("free-server", "clients", "list", "--home", home).stdout
    assert "alice" in table and expected_id in table

    again = _run(
        "free-server", "clients", "add", "alice2", owner_keys / "client.pub", "--home", home
    )
    assert "already registered" in _one_line_error(again)

    assert _run("free-server", "clients", "revoke", "alice", "--home", home).returncode == 0
    listed = json.loads(_run("free-server", "clients", "list", "--json", "--home", home).stdout)
    assert listed[0]["revoked_at"] is not None and not listed[0]["active"]


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("clients", "add", "bob", "{keys}/node.pub"), 4, "OpenSSH public key line"),
        (
            ("clients", "add", "bob", "{keys}/client.pub", "--node-pub", "{keys}/client.pub"),
            4,
            "not an OpenSSH public key",
        ),
        (("clients", "add", "bad name", "{keys}/client.pub"), 2, "not allowed"),
        (("clients", "add", "bob", "{keys}/missing.pub"), 4, "does not exist"),
        (("clients", "revoke", "nobody"), 2, "no client"),
    ],
)
def test_clients_bad_input_is_one_line(
    home: Path, owner_keys: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    result = _run("free-server", *[a.format(keys=owner_keys) for a in args], "--home", home)
    assert result.returncode == code
    assert words in _one_line_error(result)


def test_commands_on_a_missing_home_say_to_run_init(tmp_path: Path) -> None:
    result = _run("free-server", "clients", "list", "--home", tmp_path / "nope")
    assert "free-server init" in _one_line_error(result)


# -- config -----------------------------------------------------------------------------


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = ServerConfig(
        network=NetworkSettings(hosts=("a.example", "10.0.0.1"), mutual_tls=True),
        limits=LimitSettings(max_upload_bytes=1000, chunk_bytes=100),
    )
    write_config(tmp_path / "config.toml", config)
    assert load_config(tmp_path / "config.toml") == config
    with pytest.raises(FileExistsError):
        write_config(tmp_path / "config.toml", config)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[network]\nexchange_prot = 1\n", "unknown setting network.exchange_prot"),
        ("[netwrk]\n", "unknown table [netwrk]"),
        ('[rounds]\nmin_models = "3"\n', "rounds.min_models must be of type int"),
        ("[network]\nmutual_tls = 1\n", "network.mutual_tls must be of type bool"),
        ("[network]\nflower_port = 9091\n", "must all differ"),
        ("[network]\nexchange_port = 70000\n", "not a TCP port"),
        ("[intake]\ntimeout_s = 0\n", "intake.timeout_s = 0 must be positive"),
        ("[limits]\nchunk_bytes = 99999999999\n", "chunk_bytes must not exceed"),
        ("[network\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert words in caught.value.message and str(path) in caught.value.message


def test_missing_tables_fall_back_to_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[rounds]\nmin_models = 7\n")
    config = load_config(path)
    assert config.rounds.min_models == 7 and config.limits == LimitSettings()


@given(
    st.text(),
    st.lists(st.text(max_size=5), max_size=3),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
)
def test_toml_writer_round_trips_any_string(
    text: str, items: list[str], number: int, flag: bool
) -> None:
    tables: dict[str, dict[str, TomlValue]] = {
        "t": {"s": text, "list": items, "n": number, "b": flag},
        "key with space": {"x": 1.5},
    }
    assert tomllib.loads(dumps(tables, header="line one\nline two")) == tables
