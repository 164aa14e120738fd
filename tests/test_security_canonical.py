"""Canonical bytes: one spelling per record, one domain tag per kind, stable format."""

from __future__ import annotations

import dataclasses
import json

import pytest

from free_common.errors import CanonicalFormError
from free_common.security import DOMAIN_TAGS, canonical_bytes, record_from_canonical
from free_common.security.canonical import canonical_json
from free_common.types import (
    ChannelOrder,
    Receipt,
    ReleaseManifest,
    SubmissionManifest,
    TaskMetadata,
)

KEY = "00112233445566778899aabbccddeeff"
SHA = "ab" * 32
TASK = TaskMetadata(
    3, (3, 32, 32), ChannelOrder.RGB, (0.5, 0.25, 1e-07), (1.0, 2.5, 3.0), ("a", "é", "猫")
)
MANIFEST = SubmissionManifest(KEY, SHA, 1234, TASK, 1_700_000_000_000, bytes(range(16)))
RECEIPT = Receipt("sub-1", KEY, SHA, 1234, 1_700_000_000_500, KEY)
RELEASE = ReleaseManifest(2, "conv4", '{"lr": 0.1}', SHA, 99, ("s1", "s2"), "{}", 5, KEY)
ALL = [MANIFEST, RECEIPT, RELEASE]


def test_manifest_bytes_are_pinned() -> None:
    # Stored signatures stay valid only while this spelling never changes.
    assert canonical_bytes(MANIFEST) == (
        b"free-fed/v1/submission-manifest\n"
        b'{"client_id":"00112233445566778899aabbccddeeff","created_at_ms":1700000000000,'
        b'"format":"onnx","nonce":"000102030405060708090a0b0c0d0e0f",'
        b'"payload_sha256":"' + SHA.encode() + b'","payload_size":1234,'
        b'"task":{"channel_order":"rgb","class_names":["a","\\u00e9","\\u732b"],'
        b'"input_shape":[3,32,32],"mean":[0.5,0.25,1e-07],"num_classes":3,'
        b'"std":[1.0,2.5,3.0]}}'
    )


def test_receipt_and_release_bytes_are_pinned() -> None:
    assert canonical_bytes(RECEIPT) == (
        b"free-fed/v1/receipt\n"
        b'{"client_id":"' + KEY.encode() + b'","payload_sha256":"' + SHA.encode() + b'",'
        b'"payload_size":1234,"received_at_ms":1700000000500,"server_key_id":"'
        + KEY.encode()
        + b'","status":"received","submission_id":"sub-1"}'
    )
    assert canonical_bytes(RELEASE).startswith(
        b'free-fed/v1/release-manifest\n{"architecture":"conv4","config_json":"{\\"lr\\": 0.1}"'
    )


@pytest.mark.parametrize("record", ALL, ids=lambda r: type(r).__name__)
def test_every_field_is_signed(record: SubmissionManifest | Receipt | ReleaseManifest) -> None:
    fields = {f.name for f in dataclasses.fields(record)}
    assert set(canonical_json(record)) == fields
    if isinstance(record, SubmissionManifest):
        task_fields = {f.name for f in dataclasses.fields(TaskMetadata)}
        assert set(canonical_json(record)["task"]) == task_fields


def test_equal_records_give_equal_bytes_however_built() -> None:
    task = TaskMetadata(
        class_names=["a", "é", "猫"],  # a list, not a tuple
        std=(1, 2.5, 3),  # integers
        mean=(0.5, 0.25, 1e-07),
        channel_order=ChannelOrder.RGB,
        input_shape=[3, 32, 32],
        num_classes=3,
    )
    same = SubmissionManifest(
        nonce=bytes(range(16)),
        created_at_ms=1_700_000_000_000,
        task=task,
        payload_size=1234,
        payload_sha256=SHA,
        client_id=KEY,
    )
    assert same == MANIFEST
    assert canonical_bytes(same) == canonical_bytes(MANIFEST)
    negative_zero = dataclasses.replace(TASK, mean=(-0.0, 0.25, 1e-07))
    assert canonical_bytes(dataclasses.replace(MANIFEST, task=negative_zero)) == canonical_bytes(
        dataclasses.replace(MANIFEST, task=dataclasses.replace(TASK, mean=(0.0, 0.25, 1e-07)))
    )


@pytest.mark.parametrize("record", ALL, ids=lambda r: type(r).__name__)
def test_decoding_inverts_encoding(record: SubmissionManifest | Receipt | ReleaseManifest) -> None:
    assert record_from_canonical(canonical_bytes(record), type(record)) == record


def test_domain_tags_are_distinct_and_prefix_free() -> None:
    tags = list(DOMAIN_TAGS.values())
    assert len(set(tags)) == len(tags)
    for a in tags:
        assert a.endswith(b"\n") and a.count(b"\n") == 1
        for b in tags:
            assert a == b or not b.startswith(a)


def test_one_kind_cannot_be_read_as_another() -> None:
    with pytest.raises(
        CanonicalFormError, match=r"^expected a signed submission manifest, found a receipt$"
    ):
        record_from_canonical(canonical_bytes(RECEIPT), SubmissionManifest)
    with pytest.raises(
        CanonicalFormError, match="expected a signed receipt, found a release manifest"
    ):
        record_from_canonical(canonical_bytes(RELEASE), Receipt)
    body = canonical_bytes(MANIFEST).split(b"\n", 1)[1]
    with pytest.raises(CanonicalFormError, match="found no FREE-Fed domain tag"):
        record_from_canonical(body, SubmissionManifest)


def _respell(record: SubmissionManifest, *, reverse: bool = False, **dump_options: object) -> bytes:
    obj = canonical_json(record)
    if reverse:
        obj = dict(reversed(list(obj.items())))
    tag = DOMAIN_TAGS[SubmissionManifest]
    return tag + json.dumps(obj, **dump_options).encode()  # type: ignore[arg-type]


def _edit(old: bytes, new: bytes) -> bytes:
    data = canonical_bytes(MANIFEST)
    assert old in data
    return data.replace(old, new, 1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_respell(MANIFEST, sort_keys=True), "not in canonical form"),  # ", " and ": "
        (_respell(MANIFEST, reverse=True, separators=(",", ":")), "not in canonical form"),
        (
            _respell(MANIFEST, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
            "not a valid submission manifest",  # raw UTF-8 is not ASCII
        ),
        (_edit(b'"std":[1.0,', b'"std":[1,'), "not in canonical form"),
        (_edit(b'"mean":[0.5,', b'"mean":[5e-1,'), "not in canonical form"),
        (_edit(b'"nonce":"0001', b'"nonce":"0X01'), "not a valid submission manifest"),
        (_edit(b'0a0b0c0d0e0f"', b'0A0B0C0D0E0F"'), "not in canonical form"),
        (_edit(b'"format":"onnx",', b'"format":"onnx","format":"onnx",'), "repeats a key"),
        (_edit(b'"format":"onnx",', b'"format":"onnx","extra":1,'), "unexpected ['extra']"),
        (_edit(b'"format":"onnx",', b""), "missing ['format']"),
        (_edit(b'"payload_size":1234', b'"payload_size":NaN'), "NaN is not allowed"),
        (
            _edit(b'"payload_size":1234', b'"payload_size":1234.0'),
            "payload_size must be an integer",
        ),
        (_edit(b'"num_classes":3', b'"num_classes":true'), "num_classes must be an integer"),
        (_edit(b'"channel_order":"rgb"', b'"channel_order":"cmyk"'), "'cmyk' is not a valid"),
        (_edit(b'"task":{', b'"task":['), "not a valid submission manifest"),
        (_edit(b'"task":{', b'"task":' + b"[" * 100_000), "nested too deeply"),
        (canonical_bytes(MANIFEST) + b" ", "not in canonical form"),
        (canonical_bytes(MANIFEST) + b"{}", "not a valid submission manifest"),
        (canonical_bytes(MANIFEST) + b"\n", "not in canonical form"),
    ],
)
def test_non_canonical_or_invalid_bytes_are_refused(data: bytes, expected: str) -> None:
    with pytest.raises(CanonicalFormError) as info:
        record_from_canonical(data, SubmissionManifest)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
