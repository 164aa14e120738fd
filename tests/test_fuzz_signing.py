"""Property-based fuzzing of signature checking: records, canonical bytes, call credentials.

Every check ends in acceptance or in a typed refusal (`SignatureError`,
`StaleRequest`, `CanonicalFormError`, `KeyFormatError`), never another exception,
whatever the keys, signatures, records, metadata or bytes; and a refusal is what
any change gets: another key, a flipped bit of the signature, a field of the record
changed after signing, a call signed for another method or time. Records signed with
the right key, drawn from the strategies of `test_wire`, are accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_wire import manifests, receipts, releases

from free_common.errors import (
    CanonicalFormError,
    KeyFormatError,
    SignatureError,
    StaleRequest,
)
from free_common.security.call_auth import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    read_call_metadata,
    sign_call,
    verify_call,
)
from free_common.security.canonical import canonical_bytes, record_from_canonical
from free_common.security.keys import key_id, public_key_from_pem, public_key_pem
from free_common.security.signing import sign, verify
from free_common.types import Receipt, ReleaseManifest, Signed, SubmissionManifest

FUZZ = settings(max_examples=150, deadline=None)

keys = st.binary(min_size=32, max_size=32).map(Ed25519PrivateKey.from_private_bytes)
records = st.one_of(manifests, receipts, releases)
KINDS = (SubmissionManifest, Receipt, ReleaseManifest)


def _signed_by(record: Any, key: Ed25519PrivateKey) -> Any:
    """The record, naming `key` as its signer."""
    field = "client_id" if isinstance(record, SubmissionManifest) else "server_key_id"
    return dataclasses.replace(record, **{field: key_id(key.public_key())})


@FUZZ
@given(records, keys)
def test_records_signed_with_the_right_key_are_accepted(
    record: Any, key: Ed25519PrivateKey
) -> None:
    record = _signed_by(record, key)
    signed = sign(key, record)
    assert verify(key.public_key(), signed) == record
    assert record_from_canonical(canonical_bytes(record), type(record)) == record


@FUZZ
@given(records, keys, keys, st.integers(0, 511))
def test_another_key_or_a_flipped_bit_is_refused(
    record: Any, key: Ed25519PrivateKey, other: Ed25519PrivateKey, bit: int
) -> None:
    record = _signed_by(record, key)
    signed = sign(key, record)
    flipped = bytearray(signed.signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SignatureError):
        verify(key.public_key(), Signed(record, bytes(flipped)))
    assume(key_id(other.public_key()) != key_id(key.public_key()))
    with pytest.raises(SignatureError):
        verify(other.public_key(), signed)
    # Re-signed in the other key's name, it still does not pass for the first key.
    with pytest.raises(SignatureError):
        verify(key.public_key(), sign(other, _signed_by(record, other)))


@FUZZ
@given(st.data(), keys)
def test_a_field_changed_after_signing_is_refused(
    data: st.DataObject, key: Ed25519PrivateKey
) -> None:
    record = _signed_by(data.draw(records), key)
    signed = sign(key, record)
    donor = _signed_by(data.draw(_same_kind(record)), key)
    # The signer's id and a receipt's one-valued status are not worth changing here.
    fields = [f.name for f in dataclasses.fields(record)]
    field = data.draw(
        st.sampled_from([f for f in fields if f not in ("client_id", "server_key_id", "status")])
    )
    changed = dataclasses.replace(record, **{field: getattr(donor, field)})
    assume(changed != record)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(key.public_key(), Signed(changed, signed.signature))


def _same_kind(record: Any) -> st.SearchStrategy[Any]:
    return {SubmissionManifest: manifests, Receipt: receipts, ReleaseManifest: releases}[
        type(record)
    ]


@FUZZ
@given(records, keys, st.binary(max_size=128))
def test_arbitrary_signatures_are_refused(
    record: Any, key: Ed25519PrivateKey, signature: bytes
) -> None:
    record = _signed_by(record, key)
    assume(signature != sign(key, record).signature)
    with pytest.raises(SignatureError):
        verify(key.public_key(), Signed(record, signature))


@st.composite
def canonical_mutants(draw: st.DrawFn) -> tuple[bytes, type]:
    """Canonical bytes of a record with a few bytes changed, or bytes of any kind."""
    record = draw(records)
    data = bytearray(canonical_bytes(record))
    for where, value in draw(
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3)
    ):
        data[where % len(data)] = value
    kind = draw(st.sampled_from(KINDS))
    return draw(st.one_of(st.just(bytes(data)), st.binary(max_size=300))), kind


@FUZZ
@given(canonical_mutants())
def test_canonical_bytes_decode_to_themselves_or_are_refused(case: tuple[bytes, type]) -> None:
    data, kind = case
    try:
        record = record_from_canonical(data, kind)
    except CanonicalFormError as error:
        assert "\n" not in error.message
        return
    assert canonical_bytes(record) == data


headers = st.sampled_from([KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER, "other"])
header_values = st.one_of(
    st.text(max_size=80), st.binary(max_size=80), st.from_regex(r"[0-9]{1,20}", fullmatch=True)
)
METHODS = ["/free.v1.Exchange/Submit", "/free.v1.Exchange/GetVerdict"]


@FUZZ
@given(st.lists(st.tuples(headers, header_values), max_size=6), keys, st.integers(0, 2**60))
def test_arbitrary_call_metadata_is_refused_with_a_typed_error(
    metadata: list[tuple[str, str | bytes]], key: Ed25519PrivateKey, now: int
) -> None:
    try:
        credentials = read_call_metadata(metadata)
    except SignatureError:
        return
    with pytest.raises((SignatureError, StaleRequest)):
        verify_call(key.public_key(), METHODS[0], credentials, now=now, window_ms=300_000)


@FUZZ
@given(
    keys,
    keys,
    st.sampled_from(METHODS),
    st.sampled_from(METHODS),
    st.integers(0, 2**50),
    st.integers(-(10**7), 10**7),
)
def test_call_signatures_bind_key_method_and_time(
    key: Ed25519PrivateKey,
    other: Ed25519PrivateKey,
    signed_for: str,
    called: str,
    stamp: int,
    skew: int,
) -> None:
    credentials = read_call_metadata(sign_call(key, signed_for, stamp))
    window = 300_000
    try:
        verify_call(key.public_key(), called, credentials, now=stamp + skew, window_ms=window)
        accepted = True
    except SignatureError:
        assert called != signed_for
        accepted = False
    except StaleRequest:
        assert abs(skew) > window
        accepted = False
    assert accepted == (called == signed_for and abs(skew) <= window)
    assume(key_id(other.public_key()) != key_id(key.public_key()))
    with pytest.raises(SignatureError):
        verify_call(other.public_key(), signed_for, credentials, now=stamp, window_ms=window)


@FUZZ
@given(
    st.one_of(st.binary(max_size=400), keys.map(lambda k: public_key_pem(k.public_key()))),
    st.integers(0, 50),
)
def test_public_keys_parse_or_are_refused(data: bytes, cut: int) -> None:
    data = data[: len(data) - cut] if cut < len(data) else data
    try:
        public = public_key_from_pem(data, "fuzzed key")
    except KeyFormatError as error:
        assert "\n" not in error.message
        return
    assert len(key_id(public)) == 32
