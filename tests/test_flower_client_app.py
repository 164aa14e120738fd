"""The owner's side of the Flower plane, in process: the pinned bundle, the ClientApp's checks.

A release pushed to a joined SuperNode is stored only when the pinned server key
signed it and the weights match the signed manifest; anything else is refused
and leaves nothing on disk. The executor accepts only the installed round app's
bundle.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flower_harness import owner_data
from flwr.app import ConfigRecord, RecordDict
from flwr.common.config import parse_config_args
from safetensors.torch import save

from free_client.client_app import app as client_app
from free_client.client_app import receive_release
from free_client.node_settings import JoinSettings
from free_client.trusted_clientapp import check_bundle, installed_client_app
from free_common.engine import LearnerSpec, build_learner
from free_common.errors import AppBundleRefused, PayloadMismatch, SignatureError, WireError
from free_common.flower_app import (
    RELEASE_RECORD,
    app_bundle,
    app_bundle_sha256,
    app_pyproject,
    read_release_content,
    release_content,
)
from free_common.security.keys import (
    generate_signing_key,
    key_id,
    load_public_key,
    write_public_key,
)
from free_common.security.release_dir import load_release
from free_common.security.signing import sign
from free_common.types import ReleaseManifest, Signed

SPEC = LearnerSpec(arch="mlp", width=16, ways=5, channels=1, image_size=16)


def _weights() -> bytes:
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in build_learner(SPEC).state_dict().items()}
    return save(state)


def _release(key: Ed25519PrivateKey, weights: bytes, version: int = 1) -> Signed[ReleaseManifest]:
    architecture = {"arch": "mlp", "width": 16, "ways": 5, "channels": 1, "image_size": 16}
    manifest = ReleaseManifest(
        version=version,
        architecture="mlp",
        config_json=json.dumps({"architecture": architecture}),
        payload_sha256=hashlib.sha256(weights).hexdigest(),
        payload_size=len(weights),
        source_submission_ids=("1", "2"),
        metrics_json="{}",
        created_at_ms=int(time.time() * 1000),
        server_key_id=key_id(key.public_key()),
    )
    return sign(key, manifest)


@pytest.fixture
def server(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = generate_signing_key()
    write_public_key(key.public_key(), tmp_path / "server.pub")
    return key, tmp_path / "server.pub"


def _settings(tmp_path: Path, server_pub: Path, data: Path | None = None) -> JoinSettings:
    return JoinSettings(
        server_pub=server_pub,
        releases_dir=tmp_path / "releases",
        data_dir=data,
        shots=1,
        episodes=2,
        steps=2,
    )


def test_round_app_bundle_is_reproducible_and_pinned_by_version() -> None:
    assert app_bundle() == app_bundle()
    assert b'serverapp = "free_server.server_app:app"' in app_pyproject()
    assert app_bundle_sha256("9.9.9") != app_bundle_sha256()
    assert check_bundle(app_bundle()) == Path()
    with pytest.raises(AppBundleRefused, match="refused"):
        check_bundle(app_bundle("9.9.9"))


def test_executor_loads_the_installed_client_app_whatever_the_bundle_says() -> None:
    load = installed_client_app("other.module:app", "/somewhere", True)
    assert load("someone/otherapp", "6.6.6", "0" * 64) is client_app


def test_a_release_signed_by_the_pinned_key_is_stored_and_scored(
    tmp_path: Path, server: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = server
    weights = _weights()
    data = owner_data(tmp_path / "data")
    metrics = receive_release(
        release_content(_release(key, weights), weights), _settings(tmp_path, pub, data)
    )
    assert metrics["version"] == 1.0 and metrics["stored"] == 1.0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["episodes"] == 2.0
    manifest, path = load_release(tmp_path / "releases" / "1", load_public_key(pub))
    assert path.read_bytes() == weights and manifest.version == 1


def test_without_data_the_release_is_only_stored(
    tmp_path: Path, server: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = server
    weights = _weights()
    metrics = receive_release(
        release_content(_release(key, weights), weights), _settings(tmp_path, pub)
    )
    assert metrics == {"version": 1.0, "stored": 1.0}


def test_tampered_weights_are_refused_and_nothing_is_written(
    tmp_path: Path, server: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = server
    weights = _weights()
    tampered = bytearray(weights)
    tampered[-1] ^= 0x01
    content = release_content(_release(key, weights), bytes(tampered))
    with pytest.raises(PayloadMismatch):
        receive_release(content, _settings(tmp_path, pub))
    assert not any((tmp_path / "releases" / "1").glob("*"))


def test_a_release_signed_by_another_key_is_refused(
    tmp_path: Path, server: tuple[Ed25519PrivateKey, Path]
) -> None:
    _, pub = server
    weights = _weights()
    content = release_content(_release(generate_signing_key(), weights), weights)
    with pytest.raises(SignatureError):
        receive_release(content, _settings(tmp_path, pub))
    assert not (tmp_path / "releases").exists()


def test_an_altered_manifest_is_refused(
    tmp_path: Path, server: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = server
    weights = _weights()
    signed = _release(key, weights, version=1)
    forged = _release(key, weights, version=2).record
    content = release_content(Signed(forged, signed.signature), weights)
    with pytest.raises(SignatureError):
        receive_release(content, _settings(tmp_path, pub))
    assert not (tmp_path / "releases").exists()


def test_messages_without_a_release_are_refused(
    tmp_path: Path, server: tuple[Ed25519PrivateKey, Path]
) -> None:
    _, pub = server
    with pytest.raises(WireError, match="holds no release"):
        receive_release(RecordDict({"x": ConfigRecord({"a": 1})}), _settings(tmp_path, pub))
    bad = RecordDict({RELEASE_RECORD: ConfigRecord({"manifest": b"{}", "signature": b"x"})})
    with pytest.raises(WireError):
        read_release_content(bad)


def test_join_settings_survive_flowers_node_config_parser(tmp_path: Path) -> None:
    settings = JoinSettings(
        server_pub=tmp_path / 'a "quoted" dir' / "server.pub",
        releases_dir=tmp_path / "with space" / "releases",
        data_dir=None,
        lr=0.005,
    )
    path = tmp_path / "node-config.toml"
    path.write_text(settings.to_toml())
    assert JoinSettings.from_node_config(parse_config_args([str(path)])) == settings
