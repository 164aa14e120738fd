"""The load benchmark's asyncio owners against a real server: the client's stream and checks."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from exchange_harness import address, enroll, make_owner, new_home, serving

from free_client.stub import Connection
from free_common.security.keys import generate_signing_key, load_public_key
from free_server.home import ServerHome

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load


def _upload(home: ServerHome, where: str, key: Ed25519PrivateKey, data: bytes) -> load.Outcome:
    spec = load.Generator(where, home.ca_cert, home.signing_pub, len(data), 4096, 30.0, False)
    outcome = load.Outcome()
    owner = load.run_owner_async(
        Connection(where, ca=home.ca_cert),
        key,
        data,
        load_public_key(home.signing_pub),
        spec,
        time.monotonic(),
        outcome,
    )
    asyncio.run(owner)
    return outcome


def test_an_asyncio_owner_streams_its_model_and_checks_the_receipt(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    data = load.owner_model(load.template_model(20_000), 0)
    with serving(home) as runtime:
        outcome = _upload(home, address(runtime), alice.key, data)
    assert outcome.error is None
    assert outcome.submission_id is not None and outcome.latency_s is not None
    with home.open_store() as store:
        row = store.submission(int(outcome.submission_id))
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert row.client_key_id == alice.key_id


def test_an_asyncio_owner_the_server_refuses_stops_at_once(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    data = load.owner_model(load.template_model(20_000), 1)
    with serving(home) as runtime:
        outcome = _upload(home, address(runtime), generate_signing_key(), data)
    assert outcome.submission_id is None
    assert outcome.error is not None and outcome.error.startswith("UNAUTHENTICATED")
    assert outcome.busy_retries == outcome.unavailable_retries == outcome.handshake_retries == 0
