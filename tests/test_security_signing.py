"""Sign and verify: every way a signed record can be wrong gives one SignatureError line."""

from __future__ import annotations

import dataclasses

import pytest

from free_common.errors import SignatureError
from free_common.security import (
    canonical_bytes,
    generate_signing_key,
    key_id,
    sign,
    signature_is_valid,
    verify,
)
from free_common.types import (
    ChannelOrder,
    Receipt,
    ReleaseManifest,
    Signed,
    SubmissionManifest,
    TaskMetadata,
)

OWNER = generate_signing_key()
OWNER_ID = key_id(OWNER.public_key())
OTHER = generate_signing_key()
OTHER_ID = key_id(OTHER.public_key())
SHA = "cd" * 32
TASK = TaskMetadata(5, (1, 28, 28), ChannelOrder.GRAY, (0.5,), (0.5,))


def _manifest(nonce: bytes = bytes(16), signer: str = OWNER_ID) -> SubmissionManifest:
    return SubmissionManifest(signer, SHA, 4096, TASK, 1_700_000_000_000, nonce)


def _receipt(signer: str = OWNER_ID) -> Receipt:
    return Receipt("sub-1", OWNER_ID, SHA, 4096, 1_700_000_000_100, signer)


def _release(signer: str = OWNER_ID) -> ReleaseManifest:
    return ReleaseManifest(1, "conv4", "{}", SHA, 10, ("sub-1",), "{}", 7, signer)


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


@pytest.mark.parametrize("record", [_manifest(), _receipt(), _release()], ids=str)
def test_sign_then_verify(record: SubmissionManifest | Receipt | ReleaseManifest) -> None:
    signed = sign(OWNER, record)
    assert len(signed.signature) == 64
    assert verify(OWNER.public_key(), signed) == record
    assert signature_is_valid(OWNER.public_key(), signed)
    # Ed25519 is deterministic: signing again gives the same bytes.
    assert sign(OWNER, record).signature == signed.signature


def _refused(signed: Signed[SubmissionManifest] | Signed[Receipt], expected: str) -> None:
    with pytest.raises(SignatureError) as info:
        verify(OWNER.public_key(), signed)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message
    assert not signature_is_valid(OWNER.public_key(), signed)


def test_wrong_key_is_refused_by_name() -> None:
    signed = sign(OTHER, _manifest(signer=OTHER_ID))
    _refused(signed, f"is signed by key {OTHER_ID}, but the trusted key is {OWNER_ID}")


def test_forged_signature_under_the_trusted_name_is_refused() -> None:
    # The record claims the owner's key id, but another key made the signature.
    record = _manifest()
    forged = Signed(record, OTHER.sign(canonical_bytes(record)))
    _refused(forged, f"signature does not verify with key {OWNER_ID}")


def test_flipped_bit_in_the_message_is_refused() -> None:
    signed = sign(OWNER, _manifest())
    for index in (0, 7, 15):
        altered = dataclasses.replace(signed.record, nonce=_flip(signed.record.nonce, index))
        _refused(Signed(altered, signed.signature), "signature does not verify")
    bigger = dataclasses.replace(signed.record, payload_size=4097)
    _refused(Signed(bigger, signed.signature), "refusing an altered or forged submission manifest")


@pytest.mark.parametrize("index", [0, 1, 31, 32, 63])
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_bit_in_the_signature_is_refused(index: int, bit: int) -> None:
    signed = sign(OWNER, _manifest())
    _refused(Signed(signed.record, _flip(signed.signature, index, bit)), "does not verify")


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_signature_of_wrong_length_is_refused(length: int) -> None:
    signed = sign(OWNER, _manifest())
    cut = (signed.signature * 3)[:length]
    _refused(Signed(signed.record, cut), f"signature is {length} bytes, an Ed25519 signature is 64")


def test_another_manifests_signature_is_refused() -> None:
    first = sign(OWNER, _manifest(nonce=bytes(16)))
    second = sign(OWNER, _manifest(nonce=bytes(range(16))))
    _refused(Signed(first.record, second.signature), "does not verify")


def test_receipt_signature_cannot_pass_as_manifest_signature() -> None:
    # Same key signs both kinds: only the domain tag keeps them apart.
    receipt_signature = sign(OWNER, _receipt()).signature
    _refused(Signed(_manifest(), receipt_signature), "signature does not verify")
    manifest_signature = sign(OWNER, _manifest()).signature
    _refused(Signed(_receipt(), manifest_signature), "receipt signature does not verify")
    # Without the tag the same body would still differ, but the tag alone must suffice:
    # a signature over the bare JSON of a record verifies as neither kind.
    body = canonical_bytes(_manifest()).split(b"\n", 1)[1]
    _refused(Signed(_manifest(), OWNER.sign(body)), "does not verify")


def test_signing_with_a_key_the_record_does_not_name_is_refused() -> None:
    with pytest.raises(SignatureError, match=f"names key {OTHER_ID}, but the signing key is"):
        sign(OWNER, _manifest(signer=OTHER_ID))
