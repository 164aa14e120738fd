"""Plain records of the exchange protocol: manifests, receipts, verdicts, releases.

Frozen dataclasses with no protobuf in them, shared by the server, the client,
`free_common.security` (which signs their canonical bytes) and `free_common.wire`
(which converts them to and from protobuf messages). Every record checks its own
rules when it is built and raises `RecordError` with one line naming the field, so
a record that exists is valid, whoever built it: a CLI from flags, the wire layer
from a message, or the canonical decoder from stored bytes.

The caps below bound what a peer can make the other side hold in memory; the
message-level caps (chunk size, serialized manifest size) live in `free_common.wire`.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from free_common.errors import RecordError

__all__ = [
    "KEY_ID_HEX_CHARS",
    "MAX_CLASS_NAME_CHARS",
    "MAX_COUNT",
    "MAX_IMAGE_SIDE",
    "MAX_JSON_CHARS",
    "MAX_NONCE_BYTES",
    "MAX_NUM_CLASSES",
    "MAX_PAYLOAD_BYTES",
    "MAX_REASON_CHARS",
    "MAX_SOURCE_SUBMISSIONS",
    "MAX_TIME_MS",
    "MAX_VERSION",
    "MAX_VERSION_TEXT_CHARS",
    "MIN_NONCE_BYTES",
    "PAYLOAD_FORMATS",
    "SHA256_HEX_CHARS",
    "ChannelOrder",
    "DpGuarantee",
    "Receipt",
    "ReceiptStatus",
    "ReleaseManifest",
    "ServerStatus",
    "Signed",
    "SignedRecord",
    "SubmissionManifest",
    "TaskMetadata",
    "Verdict",
    "VerdictState",
]

KEY_ID_HEX_CHARS = 32
"""Length of a key id: the first 32 hex characters (128 bits) of sha256(raw public key)."""
SHA256_HEX_CHARS = 64
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
PAYLOAD_FORMATS = ("onnx",)
MAX_PAYLOAD_BYTES = 2**31
"""2 GiB: protobuf's own limit for one ONNX file without external data."""
MAX_NUM_CLASSES = 1000
MAX_CLASS_NAME_CHARS = 64
MAX_IMAGE_SIDE = 4096
MAX_REASON_CHARS = 1000
MAX_JSON_CHARS = 64 * 1024
MAX_SOURCE_SUBMISSIONS = 4096
MAX_VERSION_TEXT_CHARS = 64
MAX_VERSION = 2**32 - 1
"""Release versions are 1 .. MAX_VERSION (a uint32 on the wire; 0 there means latest)."""
MAX_TIME_MS = 253_402_300_799_999
"""Unix milliseconds of 9999-12-31T23:59:59.999Z, the end of what datetime can show."""
MAX_COUNT = 2**63 - 1

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX_RE = re.compile(r"[0-9a-f]+")


class ChannelOrder(str, Enum):
    """How a model expects the channels of its input image."""

    GRAY = "gray"
    RGB = "rgb"
    BGR = "bgr"

    @property
    def channels(self) -> int:
        """Number of image channels this order implies."""
        return 1 if self is ChannelOrder.GRAY else 3


class ReceiptStatus(str, Enum):
    """State a receipt vouches for; a receipt exists only once the bytes are stored."""

    RECEIVED = "received"


class VerdictState(str, Enum):
    """Outcome of full intake for one submission."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REFUSED = "refused"


def _fail(name: str, problem: str) -> RecordError:
    return RecordError(f"{name} {problem}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass; True must not pass as 1.
    if type(value) is not int:
        raise _fail(name, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(name, f"must be in [{low}, {high}], got {value}")


def _check_text(
    name: str, value: object, max_chars: int, *, allow_empty: bool = False, one_line: bool = True
) -> str:
    if not isinstance(value, str):
        raise _fail(name, f"must be text, got {type(value).__name__}")
    if not value and not allow_empty:
        raise _fail(name, "is empty")
    if len(value) > max_chars:
        raise _fail(name, f"has {len(value)} characters; at most {max_chars} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(name, "is not valid Unicode text (lone surrogate)") from None
    # Names and reasons end up on one status line; control characters would break it.
    if one_line and any(unicodedata.category(ch) == "Cc" for ch in value):
        raise _fail(name, "contains control characters (newline, tab, ...)")
    return value


def _check_id(name: str, value: object) -> None:
    if value == "":
        raise _fail(name, "is missing")
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise _fail(
            name,
            f"must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit, "
            f"got {value!r:.80}",
        )


def _check_hex(name: str, value: object, chars: int) -> None:
    if value == "":
        raise _fail(name, "is missing")
    if not isinstance(value, str) or len(value) != chars or _HEX_RE.fullmatch(value) is None:
        raise _fail(name, f"must be {chars} lower-case hex characters, got {value!r:.80}")


def _check_bytes(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, bytes):
        raise _fail(name, f"must be bytes, got {type(value).__name__}")
    if not value and low:
        raise _fail(name, "is missing")
    if not low <= len(value) <= high:
        raise _fail(name, f"must be {low}-{high} bytes long, got {len(value)}")


def _check_enum(name: str, value: object, kind: type[Enum]) -> None:
    if not isinstance(value, kind):
        raise _fail(name, f"must be a {kind.__name__}, got {value!r:.80}")


def _check_json_object(name: str, value: object) -> None:
    text = _check_text(name, value, MAX_JSON_CHARS, one_line=False)

    def _no_constant(token: str) -> object:
        raise ValueError(f"{token} is not JSON")

    try:
        parsed = json.loads(text, parse_constant=_no_constant)
    except ValueError as err:
        raise _fail(name, f"is not valid JSON ({err})") from None
    except RecursionError:
        raise _fail(name, "is nested too deeply to be read") from None
    if not isinstance(parsed, dict):
        raise _fail(name, f"must be a JSON object, got {type(parsed).__name__}")


def _sequence(name: str, value: object) -> Sequence[object]:
    # Lists are accepted (and stored as tuples); text is a sequence too, but never meant.
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise _fail(name, f"must be a sequence, got {type(value).__name__}")
    return value


def _floats(name: str, values: object, count: int) -> tuple[float, ...]:
    values = _sequence(name, values)
    if len(values) != count:
        raise _fail(name, f"must have one value per channel ({count}), got {len(values)}")
    out = []
    for value in values:
        # bool is an int subclass; True must not pass as 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(name, f"must hold numbers, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise _fail(name, f"must be finite, got {number}")
        # -0.0 == 0.0 but prints differently; fold it so equal records have equal bytes.
        out.append(number + 0.0)
    return tuple(out)


@dataclass(frozen=True)
class TaskMetadata:
    """What the aggregator must know to feed a model images it understands.

    Parameters
    ----------
    num_classes
        Number of outputs (classes) of the classifier.
    input_shape
        ``(channels, height, width)`` of one image, without the batch axis.
    channel_order
        Channel layout the model expects; must agree with ``input_shape[0]``.
    mean, std
        Per-channel normalization on [0, 1] pixels, one value per channel.
        Integers are accepted and stored as floats.
    class_names
        Empty, or exactly ``num_classes`` names. Owners who declare the same
        name share that class across teachers.
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    channel_order: ChannelOrder
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("num_classes", self.num_classes, 2, MAX_NUM_CLASSES)
        _check_enum("channel_order", self.channel_order, ChannelOrder)
        shape = _sequence("input_shape", self.input_shape)
        if len(shape) != 3:
            raise _fail("input_shape", f"must be (channels, height, width), got {shape!r:.80}")
        channels = self.channel_order.channels
        _check_int("input_shape channels", shape[0], channels, channels)
        _check_int("input_shape height", shape[1], 1, MAX_IMAGE_SIDE)
        _check_int("input_shape width", shape[2], 1, MAX_IMAGE_SIDE)
        object.__setattr__(self, "input_shape", tuple(shape))
        object.__setattr__(self, "mean", _floats("mean", self.mean, channels))
        std = _floats("std", self.std, channels)
        if any(s <= 0.0 for s in std):
            raise _fail("std", f"must be positive, got {std}")
        object.__setattr__(self, "std", std)
        names = _sequence("class_names", self.class_names)
        if names and len(names) != self.num_classes:
            raise _fail(
                "class_names", f"must be empty or have {self.num_classes} names, got {len(names)}"
            )
        for index, class_name in enumerate(names):
            _check_text(f"class_names[{index}]", class_name, MAX_CLASS_NAME_CHARS)
        object.__setattr__(self, "class_names", tuple(names))


@dataclass(frozen=True)
class DpGuarantee:
    """The (epsilon, delta) differential privacy an owner declares its model was trained to.

    Declared by the owner (``free.dp_epsilon``, ``free.dp_delta`` in the model's
    metadata_props, written by ``free-client export --dp-epsilon``), not verified by the
    server: nothing in a trained model proves how it was trained.
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if type(self.epsilon) not in (int, float) or not 0 < self.epsilon < 1e6:
            raise _fail("dp_epsilon", f"must be a positive number, got {self.epsilon!r:.40}")
        if type(self.delta) not in (int, float) or not 0 < self.delta < 1:
            raise _fail("dp_delta", f"must be between 0 and 1, got {self.delta!r:.40}")
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "delta", float(self.delta))


@dataclass(frozen=True)
class SubmissionManifest:
    """What a data owner states about one upload; signed with the owner's Ed25519 key.

    Parameters
    ----------
    client_id
        Key id of the owner's Ed25519 public key (`free_common.security.key_id`).
    payload_sha256, payload_size
        Lower-case hex sha256 and byte count of the model file.
    task
        How to feed the model.
    created_at_ms
        Unix milliseconds when the manifest was made (checked against a time window).
    nonce
        Fresh random bytes per submission (replay guard).
    format
        Payload format; only ``"onnx"``.
    """

    client_id: str
    payload_sha256: str
    payload_size: int
    task: TaskMetadata
    created_at_ms: int
    nonce: bytes
    format: str = "onnx"

    def __post_init__(self) -> None:
        _check_hex("client_id", self.client_id, KEY_ID_HEX_CHARS)
        _check_hex("payload_sha256", self.payload_sha256, SHA256_HEX_CHARS)
        _check_int("payload_size", self.payload_size, 1, MAX_PAYLOAD_BYTES)
        if not isinstance(self.task, TaskMetadata):
            raise _fail("task", f"must be TaskMetadata, got {type(self.task).__name__}")
        _check_int("created_at_ms", self.created_at_ms, 0, MAX_TIME_MS)
        _check_bytes("nonce", self.nonce, MIN_NONCE_BYTES, MAX_NONCE_BYTES)
        if self.format not in PAYLOAD_FORMATS:
            allowed = ", ".join(PAYLOAD_FORMATS)
            raise _fail("format", f"must be one of {allowed}, got {self.format!r:.40}")


@dataclass(frozen=True)
class Receipt:
    """The aggregator's signed acknowledgement that a submission is durably stored.

    Parameters
    ----------
    submission_id
        Server-assigned id (safe as a file name).
    client_id
        Key id of the submitting owner.
    payload_sha256, payload_size
        What the server received and hashed itself.
    received_at_ms
        Unix milliseconds of the durable write.
    server_key_id
        Key id of the server key that signs the receipt.
    status
        Always ``RECEIVED``; signed so the receipt says so in words.
    """

    submission_id: str
    client_id: str
    payload_sha256: str
    payload_size: int
    received_at_ms: int
    server_key_id: str
    status: ReceiptStatus = ReceiptStatus.RECEIVED

    def __post_init__(self) -> None:
        _check_id("submission_id", self.submission_id)
        _check_hex("client_id", self.client_id, KEY_ID_HEX_CHARS)
        _check_hex("payload_sha256", self.payload_sha256, SHA256_HEX_CHARS)
        _check_int("payload_size", self.payload_size, 1, MAX_PAYLOAD_BYTES)
        _check_int("received_at_ms", self.received_at_ms, 0, MAX_TIME_MS)
        _check_hex("server_key_id", self.server_key_id, KEY_ID_HEX_CHARS)
        _check_enum("status", self.status, ReceiptStatus)


@dataclass(frozen=True)
class Verdict:
    """Outcome of full intake for one submission.

    Parameters
    ----------
    submission_id
        The submission judged.
    state
        Pending, accepted or refused.
    reason
        One line saying what was wrong and what to fix; non-empty exactly when refused.
    decided_at_ms
        Unix milliseconds of the decision; ``None`` exactly while pending.
    """

    submission_id: str
    state: VerdictState
    reason: str = ""
    decided_at_ms: int | None = None

    def __post_init__(self) -> None:
        _check_id("submission_id", self.submission_id)
        _check_enum("state", self.state, VerdictState)
        refused = self.state is VerdictState.REFUSED
        _check_text("reason", self.reason, MAX_REASON_CHARS, allow_empty=not refused)
        if self.reason and not refused:
            raise _fail("reason", f"must be empty when the verdict is {self.state.value}")
        if self.state is VerdictState.PENDING:
            if self.decided_at_ms is not None:
                raise _fail("decided_at_ms", "must be absent while the verdict is pending")
        else:
            if self.decided_at_ms is None:
                raise _fail("decided_at_ms", f"is missing for a {self.state.value} verdict")
            _check_int("decided_at_ms", self.decided_at_ms, 0, MAX_TIME_MS)


@dataclass(frozen=True)
class ReleaseManifest:
    """A released meta-learned initialization; signed with the server's Ed25519 key.

    Parameters
    ----------
    version
        1, 2, ... in publication order.
    architecture
        Meta-learner architecture name, e.g. ``"conv4"``.
    config_json
        Engine configuration of the round, as JSON object text (signed verbatim).
    payload_sha256, payload_size
        Hash and size of the safetensors blob.
    source_submission_ids
        Accepted submissions whose models the release was learned from (no repeats).
    metrics_json
        Evaluation results of the round, as JSON object text.
    created_at_ms
        Unix milliseconds of publication.
    server_key_id
        Key id of the server key that signs the release.
    """

    version: int
    architecture: str
    config_json: str
    payload_sha256: str
    payload_size: int
    source_submission_ids: tuple[str, ...]
    metrics_json: str
    created_at_ms: int
    server_key_id: str

    def __post_init__(self) -> None:
        _check_int("version", self.version, 1, MAX_VERSION)
        _check_id("architecture", self.architecture)
        _check_json_object("config_json", self.config_json)
        _check_hex("payload_sha256", self.payload_sha256, SHA256_HEX_CHARS)
        _check_int("payload_size", self.payload_size, 1, MAX_PAYLOAD_BYTES)
        ids = _sequence("source_submission_ids", self.source_submission_ids)
        if len(ids) > MAX_SOURCE_SUBMISSIONS:
            raise _fail(
                "source_submission_ids",
                f"has {len(ids)} entries; at most {MAX_SOURCE_SUBMISSIONS} are allowed",
            )
        for index, submission_id in enumerate(ids):
            _check_id(f"source_submission_ids[{index}]", submission_id)
        if len(set(ids)) != len(ids):
            raise _fail("source_submission_ids", "lists a submission more than once")
        object.__setattr__(self, "source_submission_ids", tuple(ids))
        _check_json_object("metrics_json", self.metrics_json)
        _check_int("created_at_ms", self.created_at_ms, 0, MAX_TIME_MS)
        _check_hex("server_key_id", self.server_key_id, KEY_ID_HEX_CHARS)


@dataclass(frozen=True)
class ServerStatus:
    """What the exchange service reports about itself.

    Parameters
    ----------
    server_version
        Version of the running free-fed server.
    server_key_id
        Key id of the server's signing key (what clients pin).
    submissions_pending, submissions_accepted, submissions_refused
        Submissions by verdict state.
    releases
        Number of published releases.
    latest_release
        Version of the newest release; ``None`` exactly when there is none.
    """

    server_version: str
    server_key_id: str
    submissions_pending: int
    submissions_accepted: int
    submissions_refused: int
    releases: int
    latest_release: int | None = None

    def __post_init__(self) -> None:
        _check_text("server_version", self.server_version, MAX_VERSION_TEXT_CHARS)
        _check_hex("server_key_id", self.server_key_id, KEY_ID_HEX_CHARS)
        for name in ("submissions_pending", "submissions_accepted", "submissions_refused"):
            _check_int(name, getattr(self, name), 0, MAX_COUNT)
        _check_int("releases", self.releases, 0, MAX_COUNT)
        if self.latest_release is None:
            if self.releases:
                raise _fail("latest_release", f"is missing although {self.releases} exist")
        else:
            _check_int("latest_release", self.latest_release, 1, MAX_VERSION)
            if not self.releases:
                raise _fail("latest_release", "is set although no release exists")


SignedRecord = TypeVar("SignedRecord", SubmissionManifest, Receipt, ReleaseManifest)
"""The records that travel with a signature."""


@dataclass(frozen=True)
class Signed(Generic[SignedRecord]):
    """A record and an Ed25519 signature over its canonical bytes.

    The signature is not checked here: `free_common.security.verify` does that
    against a key the verifier trusts.

    Parameters
    ----------
    record
        The signed record.
    signature
        Signature bytes over ``free_common.security.canonical_bytes(record)``.
    """

    record: SignedRecord
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.record, SubmissionManifest | Receipt | ReleaseManifest):
            raise _fail("record", f"cannot be signed: {type(self.record).__name__}")
        if not isinstance(self.signature, bytes):
            raise _fail("signature", f"must be bytes, got {type(self.signature).__name__}")
