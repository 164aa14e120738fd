"""Sign records and verify signed records with Ed25519.

A signature covers `canonical_bytes(record)`, which starts with a tag naming the
kind of record, so a signature is bound to one record of one kind. Every record
also names the key id of its signer (a manifest's ``client_id``, a receipt's or
release's ``server_key_id``); `verify` checks that name against the trusted key
first, so "signed by another key" and "altered" get different messages.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from free_common.errors import SignatureError
from free_common.security.canonical import canonical_bytes, record_kind
from free_common.security.keys import key_id
from free_common.types import (
    Receipt,
    ReleaseManifest,
    Signed,
    SignedRecord,
    SubmissionManifest,
)

__all__ = ["SIGNATURE_BYTES", "sign", "signature_is_valid", "signer_key_id", "verify"]

SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""


def signer_key_id(record: SubmissionManifest | Receipt | ReleaseManifest) -> str:
    """Return the key id a record says it is signed with."""
    if isinstance(record, SubmissionManifest):
        return record.client_id
    return record.server_key_id


def sign(private_key: Ed25519PrivateKey, record: SignedRecord) -> Signed[SignedRecord]:
    """Sign the canonical bytes of a record.

    Parameters
    ----------
    private_key
        The signer's Ed25519 key; its key id must be the one the record names.
    record
        A submission manifest, receipt or release manifest.

    Returns
    -------
    Signed
        The record with its signature.

    Raises
    ------
    SignatureError
        When the record names another key id than the private key's.
    """
    own_id = key_id(private_key.public_key())
    named = signer_key_id(record)
    if named != own_id:
        raise SignatureError(
            f"cannot sign: the {record_kind(type(record))} names key {named}, "
            f"but the signing key is {own_id}; build it with this key's id"
        )
    return Signed(record, private_key.sign(canonical_bytes(record)))


def verify(public_key: Ed25519PublicKey, signed: Signed[SignedRecord]) -> SignedRecord:
    """Check a signed record against a trusted public key and return the record.

    Parameters
    ----------
    public_key
        The key the verifier trusts for this signer (allow-list entry, pinned server key).
    signed
        The record and its signature.

    Returns
    -------
    SubmissionManifest | Receipt | ReleaseManifest
        ``signed.record``, now trusted.

    Raises
    ------
    SignatureError
        One line: the record names another key, the signature has the wrong length,
        or it does not verify (the record was altered or signed by another key).
    """
    record = signed.record
    kind = record_kind(type(record))
    trusted_id = key_id(public_key)
    named = signer_key_id(record)
    if named != trusted_id:
        raise SignatureError(
            f"{kind} is signed by key {named}, but the trusted key is {trusted_id}: "
            "refusing it (check which key you trust)"
        )
    if len(signed.signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"{kind} signature is {len(signed.signature)} bytes, an Ed25519 signature is "
            f"{SIGNATURE_BYTES}: refusing a damaged or forged {kind}"
        )
    try:
        public_key.verify(signed.signature, canonical_bytes(record))
    except InvalidSignature:
        raise SignatureError(
            f"{kind} signature does not verify with key {trusted_id}: "
            f"refusing an altered or forged {kind}"
        ) from None
    return record


def signature_is_valid(public_key: Ed25519PublicKey, signed: Signed[SignedRecord]) -> bool:
    """Tell whether `verify` would accept the signed record."""
    try:
        verify(public_key, signed)
    except SignatureError:
        return False
    return True
