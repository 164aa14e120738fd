r"""Canonical bytes of signed records: the exact bytes every FREE-Fed signature covers.

Signatures never cover protobuf serializations, which are not canonical (field
order, default values and unknown fields may differ between encoders). They cover
``DOMAIN_TAG + JSON`` built from the plain record:

- The domain tag names the kind of record, e.g. ``b"free-fed/v1/receipt\n"``.
  Each kind has its own tag and no tag is a prefix of another (they end in the
  only newline they contain, and JSON text has no raw newline), so a receipt
  signature can never pass as a manifest signature, even for equal JSON.
- The JSON is one object holding every field of the record, nothing else: keys
  sorted, no whitespace, ASCII only (other characters escaped as ``\uXXXX``).
  Each field has one fixed JSON type: text as strings; integers as integers;
  floats in Python's shortest round-trip form (always with ``.`` or ``e``; -0.0 is
  folded to 0.0 by the record); bytes as lower-case hex strings; enums as their
  value; tuples as arrays; the task metadata as a nested object.

Equal records therefore give equal bytes whatever order their fields were given
in, and `record_from_canonical` accepts only bytes that re-encode to themselves,
so no second spelling (other whitespace, key order, ``1`` for ``1.0``) of the same
record is accepted either.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, cast

from free_common.errors import CanonicalFormError, RecordError
from free_common.types import (
    ChannelOrder,
    Receipt,
    ReceiptStatus,
    ReleaseManifest,
    Signed,
    SignedRecord,
    SubmissionManifest,
    TaskMetadata,
)

__all__ = [
    "DOMAIN_TAGS",
    "RELEASE_FORMAT",
    "canonical_bytes",
    "canonical_json",
    "record_from_canonical",
    "record_kind",
    "release_document",
]

DOMAIN_TAGS: dict[type, bytes] = {
    SubmissionManifest: b"free-fed/v1/submission-manifest\n",
    Receipt: b"free-fed/v1/receipt\n",
    ReleaseManifest: b"free-fed/v1/release-manifest\n",
}
"""Domain-separation prefix of each kind of signed record."""

_KIND_NAMES: dict[type, str] = {
    SubmissionManifest: "submission manifest",
    Receipt: "receipt",
    ReleaseManifest: "release manifest",
}

JsonObject = dict[str, Any]

RELEASE_FORMAT = "free-fed-release/1"
"""The ``format`` of a signed release manifest document (`release_document`)."""


def record_kind(record_type: type) -> str:
    """Human name of a kind of signed record, e.g. ``"receipt"``."""
    return _KIND_NAMES[record_type]


def _task_json(task: TaskMetadata) -> JsonObject:
    return {
        "channel_order": task.channel_order.value,
        "class_names": list(task.class_names),
        "input_shape": list(task.input_shape),
        "mean": list(task.mean),
        "num_classes": task.num_classes,
        "std": list(task.std),
    }


def _manifest_json(manifest: SubmissionManifest) -> JsonObject:
    return {
        "client_id": manifest.client_id,
        "created_at_ms": manifest.created_at_ms,
        "format": manifest.format,
        "nonce": manifest.nonce.hex(),
        "payload_sha256": manifest.payload_sha256,
        "payload_size": manifest.payload_size,
        "task": _task_json(manifest.task),
    }


def _receipt_json(receipt: Receipt) -> JsonObject:
    return {
        "client_id": receipt.client_id,
        "payload_sha256": receipt.payload_sha256,
        "payload_size": receipt.payload_size,
        "received_at_ms": receipt.received_at_ms,
        "server_key_id": receipt.server_key_id,
        "status": receipt.status.value,
        "submission_id": receipt.submission_id,
    }


def _release_json(release: ReleaseManifest) -> JsonObject:
    return {
        "architecture": release.architecture,
        "config_json": release.config_json,
        "created_at_ms": release.created_at_ms,
        "metrics_json": release.metrics_json,
        "payload_sha256": release.payload_sha256,
        "payload_size": release.payload_size,
        "server_key_id": release.server_key_id,
        "source_submission_ids": list(release.source_submission_ids),
        "version": release.version,
    }


def canonical_json(record: SubmissionManifest | Receipt | ReleaseManifest) -> JsonObject:
    """Return the JSON object (before encoding) of a signed record."""
    if isinstance(record, SubmissionManifest):
        return _manifest_json(record)
    if isinstance(record, Receipt):
        return _receipt_json(record)
    return _release_json(record)


def canonical_bytes(record: SubmissionManifest | Receipt | ReleaseManifest) -> bytes:
    """Return the bytes a signature over ``record`` covers: domain tag + canonical JSON.

    Parameters
    ----------
    record
        A submission manifest, receipt or release manifest.

    Returns
    -------
    bytes
        Deterministic bytes; equal records give equal bytes.
    """
    body = json.dumps(
        canonical_json(record),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return DOMAIN_TAGS[type(record)] + body.encode("ascii")


def _task_from_json(obj: object) -> TaskMetadata:
    fields = _exact_keys(obj, "task", TaskMetadata)
    return TaskMetadata(
        num_classes=fields["num_classes"],
        input_shape=fields["input_shape"],
        channel_order=ChannelOrder(fields["channel_order"]),
        mean=fields["mean"],
        std=fields["std"],
        class_names=fields["class_names"],
    )


def _manifest_from_json(obj: object) -> SubmissionManifest:
    fields = _exact_keys(obj, "manifest", SubmissionManifest)
    nonce = fields["nonce"]
    if not isinstance(nonce, str):
        raise ValueError("nonce must be a hex string")
    return SubmissionManifest(
        client_id=fields["client_id"],
        payload_sha256=fields["payload_sha256"],
        payload_size=fields["payload_size"],
        task=_task_from_json(fields["task"]),
        created_at_ms=fields["created_at_ms"],
        nonce=bytes.fromhex(nonce),
        format=fields["format"],
    )


def _receipt_from_json(obj: object) -> Receipt:
    fields = _exact_keys(obj, "receipt", Receipt)
    return Receipt(
        submission_id=fields["submission_id"],
        client_id=fields["client_id"],
        payload_sha256=fields["payload_sha256"],
        payload_size=fields["payload_size"],
        received_at_ms=fields["received_at_ms"],
        server_key_id=fields["server_key_id"],
        status=ReceiptStatus(fields["status"]),
    )


def _release_from_json(obj: object) -> ReleaseManifest:
    fields = _exact_keys(obj, "release manifest", ReleaseManifest)
    return ReleaseManifest(
        version=fields["version"],
        architecture=fields["architecture"],
        config_json=fields["config_json"],
        payload_sha256=fields["payload_sha256"],
        payload_size=fields["payload_size"],
        source_submission_ids=fields["source_submission_ids"],
        metrics_json=fields["metrics_json"],
        created_at_ms=fields["created_at_ms"],
        server_key_id=fields["server_key_id"],
    )


def _exact_keys(obj: object, where: str, record_type: type) -> JsonObject:
    # The JSON keys are the record's field names, so the expected set comes from
    # the dataclass itself and a new field cannot slip past the decoder unsigned.
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object")
    expected = {field.name for field in dataclasses.fields(record_type)}
    if set(obj) != expected:
        missing = sorted(expected - set(obj))
        extra = sorted(set(obj) - expected)
        raise ValueError(f"{where} fields differ (missing {missing}, unexpected {extra})")
    return obj


_DECODERS: dict[type, Callable[[object], SubmissionManifest | Receipt | ReleaseManifest]] = {
    SubmissionManifest: _manifest_from_json,
    Receipt: _receipt_from_json,
    ReleaseManifest: _release_from_json,
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a JSON object repeats a key")
    return dict(pairs)


def _no_constant(token: str) -> object:
    raise ValueError(f"{token} is not allowed")


def record_from_canonical(data: bytes, kind: type[SignedRecord]) -> SignedRecord:
    """Decode canonical bytes back into a record of the expected kind.

    Only bytes that `canonical_bytes` would produce are accepted: the right domain
    tag, then JSON that re-encodes to exactly the same bytes.

    Parameters
    ----------
    data
        Bytes as produced by `canonical_bytes` (for example read from a stored file).
    kind
        ``SubmissionManifest``, ``Receipt`` or ``ReleaseManifest``.

    Returns
    -------
    SubmissionManifest | Receipt | ReleaseManifest
        The record, of type ``kind``.

    Raises
    ------
    CanonicalFormError
        Wrong domain tag (another kind of record), invalid JSON or fields, or a
        non-canonical spelling.
    """
    name = record_kind(kind)
    tag = DOMAIN_TAGS[kind]
    if not data.startswith(tag):
        other = next((record_kind(t) for t, v in DOMAIN_TAGS.items() if data.startswith(v)), None)
        found = f"a {other}" if other else "no FREE-Fed domain tag"
        raise CanonicalFormError(f"expected a signed {name}, found {found}")
    try:
        obj = json.loads(
            data[len(tag) :].decode("ascii"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
        # The decoder table is keyed by kind, so the record has type `kind`.
        record = cast(SignedRecord, _DECODERS[kind](obj))
    except (ValueError, TypeError, RecordError) as err:
        raise CanonicalFormError(f"{name} bytes are not a valid {name}: {err}") from None
    except RecursionError:
        raise CanonicalFormError(f"{name} bytes are nested too deeply to be a {name}") from None
    if canonical_bytes(record) != data:
        raise CanonicalFormError(
            f"{name} bytes are not in canonical form (whitespace, key order or number "
            "spelling differ): re-encode the record instead of editing the file"
        )
    return record


def release_document(signed: Signed[ReleaseManifest]) -> bytes:
    """Return the signed release manifest as an owner stores it (``manifest.json``).

    ``{"format": RELEASE_FORMAT, "manifest": {...its fields...}, "signature": "<hex>"}``,
    indented, keys sorted, with a final newline.
    """
    document = {
        "format": RELEASE_FORMAT,
        "manifest": canonical_json(signed.record),
        "signature": signed.signature.hex(),
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
