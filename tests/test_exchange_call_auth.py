"""Per-call signatures, and the map from errors to gRPC statuses at the RPC boundary."""

from __future__ import annotations

import grpc
import pytest

from free_common import errors
from free_common.errors import FreeError, SignatureError, StaleRequest, StoreError
from free_common.security.call_auth import (
    CALL_TAG,
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    read_call_metadata,
    sign_call,
    verify_call,
)
from free_common.security.canonical import DOMAIN_TAGS
from free_common.security.keys import generate_signing_key
from free_server.auth import EXCHANGE_METHOD_PREFIX
from free_server.rpc_errors import public_message, status_code
from free_server.servicer import full_service_name

METHOD = "/free.v1.Exchange/GetVerdict"
NOW = 1_800_000_000_000
WINDOW = 300_000


def test_a_signed_call_verifies_only_for_its_method_key_and_time() -> None:
    key = generate_signing_key()
    credentials = read_call_metadata(sign_call(key, METHOD, NOW))
    verify_call(key.public_key(), METHOD, credentials, now=NOW + WINDOW, window_ms=WINDOW)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_call(key.public_key(), "/free.v1.Exchange/Submit", credentials, now=NOW, window_ms=1)
    with pytest.raises(SignatureError, match="another key"):
        verify_call(generate_signing_key().public_key(), METHOD, credentials, now=NOW, window_ms=1)
    with pytest.raises(StaleRequest, match="s ago"):
        verify_call(key.public_key(), METHOD, credentials, now=NOW + WINDOW + 1, window_ms=WINDOW)
    with pytest.raises(StaleRequest, match="in the future"):
        verify_call(key.public_key(), METHOD, credentials, now=NOW - WINDOW - 1, window_ms=WINDOW)


@pytest.mark.parametrize("drop", [KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_missing_or_repeated_entries_are_refused(drop: str) -> None:
    metadata = sign_call(generate_signing_key(), METHOD, NOW)
    with pytest.raises(SignatureError, match=drop):
        read_call_metadata([m for m in metadata if m[0] != drop])
    with pytest.raises(SignatureError, match=drop):
        read_call_metadata([*metadata, *[m for m in metadata if m[0] == drop]])


def test_malformed_entries_are_refused() -> None:
    good = dict(sign_call(generate_signing_key(), METHOD, NOW))
    for key, bad in [
        (KEY_ID_HEADER, "short"),
        (TIMESTAMP_HEADER, "-5"),
        (TIMESTAMP_HEADER, "1e9"),
        (SIGNATURE_HEADER, b"\x00" * 10),
    ]:
        with pytest.raises(SignatureError, match=key):
            read_call_metadata(list({**good, key: bad}.items()))


def test_call_tag_cannot_be_confused_with_a_record_tag() -> None:
    for tag in DOMAIN_TAGS.values():
        assert not tag.startswith(CALL_TAG)
        assert not CALL_TAG.startswith(tag)


def test_every_error_class_names_a_real_grpc_status() -> None:
    classes = [
        cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, FreeError)
    ]
    assert len(classes) > 40
    for cls in classes:
        assert isinstance(getattr(grpc.StatusCode, cls.grpc_status), grpc.StatusCode), cls


def test_internal_errors_reach_the_peer_without_their_detail() -> None:
    code, message = public_message(StoreError("disk full at /srv/free/store/store.db"), "Submit")
    assert code is grpc.StatusCode.INTERNAL
    assert "/srv" not in message and "log" in message
    code, message = public_message(StaleRequest("signed 900 s ago"), "Submit")
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, "signed 900 s ago")
    assert status_code(errors.ReplayError("x")) is grpc.StatusCode.ALREADY_EXISTS


def test_the_interceptor_guards_the_generated_service_name() -> None:
    assert f"/{full_service_name()}/" == EXCHANGE_METHOD_PREFIX
