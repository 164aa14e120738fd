"""Releases over the exchange: verified before they touch the disk, refused when tampered."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from exchange_harness import (
    Owner,
    client,
    enroll,
    make_owner,
    new_home,
    publish_release,
    release_weights,
    serving,
)

from free_common.errors import (
    CanonicalFormError,
    PayloadMismatch,
    ServerRefused,
    SignatureError,
)
from free_common.security.keys import generate_signing_key, load_public_key
from free_common.security.release_dir import MANIFEST_NAME, WEIGHTS_NAME, load_release, save_release
from free_server.home import ServerHome
from free_server.runtime import ServerRuntime


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ServerRuntime, Owner]]:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with serving(home) as runtime:
        yield runtime, alice


def _fetch(runtime: ServerRuntime, owner: Owner, out: Path, version: int | None = None) -> None:
    with client(runtime, owner) as c:
        signed, chunks = c.fetch_release(version)
        save_release(signed, chunks, out, load_public_key(runtime.home.signing_pub))


def test_latest_release_is_fetched_verified_and_readable_again(
    setup: tuple[ServerRuntime, Owner], tmp_path: Path
) -> None:
    runtime, alice = setup
    with client(runtime, alice) as c, pytest.raises(ServerRefused) as caught:
        c.fetch_release()
    assert caught.value.status == "NOT_FOUND"
    weights = release_weights()
    publish_release(runtime.home, b"older weights", version=1)
    publish_release(runtime.home, weights, version=2)
    out = tmp_path / "release"
    _fetch(runtime, alice, out)
    assert (out / WEIGHTS_NAME).read_bytes() == weights
    document = json.loads((out / MANIFEST_NAME).read_text())
    assert document["manifest"]["version"] == 2
    release, path = load_release(out, load_public_key(runtime.home.signing_pub))
    assert release.payload_sha256 == hashlib.sha256(weights).hexdigest()
    assert path == out / WEIGHTS_NAME
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    _fetch(runtime, alice, tmp_path / "old", version=1)
    assert (tmp_path / "old" / WEIGHTS_NAME).read_bytes() == b"older weights"
    with client(runtime, alice) as c:
        status = c.status()
    assert (status.releases, status.latest_release) == (2, 2)


def _tamper_blob(home: ServerHome, weights: bytes) -> None:
    with home.open_store() as store:
        path = store.blob_path(hashlib.sha256(weights).hexdigest())
    path.chmod(0o600)
    path.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))


def test_weights_altered_on_the_server_are_refused_with_data_loss(
    setup: tuple[ServerRuntime, Owner], tmp_path: Path
) -> None:
    runtime, alice = setup
    weights = release_weights()
    publish_release(runtime.home, weights)
    _tamper_blob(runtime.home, weights)
    out = tmp_path / "release"
    with pytest.raises(ServerRefused) as caught:
        _fetch(runtime, alice, out)
    assert caught.value.status == "DATA_LOSS"
    assert "damaged" in caught.value.message
    assert list(out.iterdir()) == []


def test_release_signed_by_another_key_is_refused_by_the_server(
    setup: tuple[ServerRuntime, Owner], tmp_path: Path
) -> None:
    runtime, alice = setup
    publish_release(runtime.home, release_weights(), signer=generate_signing_key())
    with pytest.raises(ServerRefused) as caught:
        _fetch(runtime, alice, tmp_path / "release")
    assert caught.value.status == grpc.StatusCode.DATA_LOSS.name
    assert not (tmp_path / "release").exists()


def test_client_refuses_a_release_not_signed_by_its_pinned_key(
    setup: tuple[ServerRuntime, Owner], tmp_path: Path
) -> None:
    runtime, alice = setup
    publish_release(runtime.home, release_weights())
    out = tmp_path / "release"
    with client(runtime, alice) as c:
        signed, chunks = c.fetch_release()
        with pytest.raises(SignatureError, match="trusted key"):
            save_release(signed, chunks, out, generate_signing_key().public_key())
    assert not out.exists()


def test_client_refuses_weights_that_differ_from_the_signed_manifest(
    setup: tuple[ServerRuntime, Owner], tmp_path: Path
) -> None:
    runtime, _ = setup
    weights = release_weights()
    signed = publish_release(runtime.home, weights)
    out = tmp_path / "release"
    out.mkdir()
    (out / WEIGHTS_NAME).write_bytes(b"the previous release")
    pub = load_public_key(runtime.home.signing_pub)
    with pytest.raises(PayloadMismatch, match="nothing was written"):
        save_release(signed, [weights[:10], b"X" + weights[11:]], out, pub)
    assert [p.name for p in out.iterdir()] == [WEIGHTS_NAME]
    assert (out / WEIGHTS_NAME).read_bytes() == b"the previous release"


def test_a_release_folder_edited_on_disk_fails_to_load(
    setup: tuple[ServerRuntime, Owner], tmp_path: Path
) -> None:
    runtime, alice = setup
    publish_release(runtime.home, release_weights())
    out = tmp_path / "release"
    _fetch(runtime, alice, out)
    pub = load_public_key(runtime.home.signing_pub)
    (out / WEIGHTS_NAME).write_bytes(b"changed")
    with pytest.raises(PayloadMismatch):
        load_release(out, pub)
    _fetch(runtime, alice, out)
    document = json.loads((out / MANIFEST_NAME).read_text())
    document["manifest"]["architecture"] = "resnet12"
    (out / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(SignatureError, match="does not verify"):
        load_release(out, pub)
    document["manifest"]["extra"] = 1
    (out / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(CanonicalFormError):
        load_release(out, pub)
