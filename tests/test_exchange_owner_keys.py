"""Key rotation through the real exchange server (TLS on loopback).

After `Store.rotate_client` (what `free-server clients rotate` runs while the
server serves), the old key is refused with its own line, the new key submits,
and the owner reads the verdict of a submission its old key made; another
owner still cannot.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from exchange_harness import TASK, client, enroll, good_model, make_owner, new_home, serving

from free_client.uploader import upload, wait_for_verdict
from free_common.errors import ServerRefused
from free_common.security.keys import public_key_pem
from free_common.types import VerdictState


def _refused(call: object, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(ServerRefused) as caught:
        call()  # type: ignore[operator]
    assert caught.value.status == code.name, caught.value.message
    assert text in caught.value.message and "\n" not in caught.value.message


def test_a_rotated_owner_submits_with_its_new_key_and_reads_its_old_verdicts(
    tmp_path: Path,
) -> None:
    home = new_home(tmp_path / "home")
    old = enroll(home, make_owner(tmp_path / "old", "alice"))
    other = enroll(home, make_owner(tmp_path, "bob"))
    new = make_owner(tmp_path / "new", "alice")
    with serving(home) as server:
        with client(server, old) as c:
            earlier = upload(c, old.key, good_model(seed=1), TASK).record.submission_id
        with home.open_store() as store:
            store.rotate_client(
                "alice",
                key_id=new.key_id,
                public_key_pem=public_key_pem(new.key.public_key()).decode("ascii"),
            )

        with client(server, old) as c:
            _refused(
                lambda: upload(c, old.key, good_model(seed=2), TASK),
                grpc.StatusCode.PERMISSION_DENIED,
                "was replaced by a newer key",
            )
            _refused(lambda: c.verdict(earlier), grpc.StatusCode.PERMISSION_DENIED, "replaced")
        with client(server, new) as c:
            receipt = upload(c, new.key, good_model(seed=2), TASK).record
            assert receipt.client_id == new.key_id
            verdict = wait_for_verdict(c, earlier, timeout_s=60.0)
            assert verdict.state is VerdictState.ACCEPTED
        with client(server, other) as c:
            _refused(lambda: c.verdict(earlier), grpc.StatusCode.NOT_FOUND, "no submission")
