"""The one exception tree of FREE-Fed, and its map to exit codes and gRPC statuses.

Every error a user can cause is a `FreeError`. Each class says, in one place,
which process exit code a CLI returns for it and which gRPC status the server
answers with, so the CLIs and the servicer never invent their own mapping::

    FreeError
    ├── ConfigError            bad option, file or setting given by the user
    │   └── HomeError          a server home that is missing, incomplete or already there
    ├── DataError              data sets and font packages
    │   ├── FontPackageMissing
    │   ├── FontUnreadable
    │   ├── DatasetLayoutError
    │   ├── IdxFormatError
    │   └── SplitError
    ├── SecurityError          keys, signatures, manifests
    │   ├── KeyFormatError
    │   ├── SignatureError
    │   ├── CanonicalFormError bytes that are not the canonical form of a signed record
    │   ├── UnknownClient      a key that is not on the allow-list
    │   ├── RevokedClient      a key whose owner was revoked
    │   ├── ReplayError        a nonce already used, with other bytes
    │   ├── StaleRequest       a manifest or call signed outside the server's time window
    │   ├── TlsError           a TLS handshake that failed (certificate not trusted)
    │   │   └── HandshakeDropped  a server closed the handshake (mutual TLS wanted, or overloaded)
    │   ├── AppBundleRefused   a Flower run that ships another app than the installed round app
    │   └── NodeNotAdmitted    a SuperNode whose node key the SuperLink does not accept
    ├── WireError              a protobuf message that does not make a valid record
    ├── RecordError            a manifest, receipt, verdict or release field out of its rules
    ├── UploadError            streamed bytes that cannot be accepted
    │   ├── PayloadTooLarge    more bytes than the server's cap
    │   ├── PayloadMismatch    size or sha256 differ from the signed manifest
    │   └── UploadStalled      an upload sent nothing for too long (ABORTED)
    ├── StoreError             the server's store cannot be read or written
    │   ├── StoreVersionError  a store made by a newer free-server
    │   ├── RecordNotFound     no client, submission or release by that name
    │   ├── DuplicateRecord    a client name or key that is already registered
    │   ├── DamagedRecord      a stored release or blob that no longer matches its signature
    │   │   └── AuditLogBroken an audit entry changed, removed, reordered or not the server's
    │   └── StoreFull          the disk under the store is full (transient for the owner)
    ├── IntakeError            an untrusted model refused by `models` intake
    │   ├── NotOnnxError       not a parseable ONNX model (other bytes, truncated, other proto)
    │   ├── ModelTooLarge      file, node count or metadata over the caps
    │   ├── ExternalDataError  a tensor that points to data outside the file
    │   ├── CustomOperatorError  a non-standard operator domain or model-local function
    │   ├── OpsetError         IR version or opset out of the supported range
    │   ├── UnsupportedOperatorError  an operator or attribute form not on the allow-list
    │   ├── SubgraphError      graph-valued attributes (If, training graphs)
    │   ├── LoopError          Loop or Scan
    │   ├── TensorLimitError   gigantic declared tensors, shapes or parameter counts
    │   ├── NonFiniteWeights   NaN or Inf in weights
    │   ├── InputShapeError    input missing, several, or not the declared image shape
    │   ├── OutputShapeError   output that does not give one logit per declared class
    │   ├── MetadataError      task metadata missing, malformed or inconsistent
    │   ├── InvalidModelError  fails onnx's checker or shape inference
    │   ├── RuntimeProbeError  onnxruntime cannot load or run it
    │   ├── ParityError        torch conversion and onnxruntime disagree
    │   ├── IntakeResourceError  the intake worker ran out of memory
    │   └── IntakeTimeout      the intake worker ran past its time limit
    ├── EngineError            a meta round that cannot go on
    │   ├── MemoryBankError    a task the memory cannot form, or a folder it cannot read
    │   ├── ArchitectureMismatch  models that must share one architecture do not
    │   ├── TooFewTeachers     a round with fewer usable teachers than its minimum
    │   ├── NonFiniteLoss      a NaN or infinite loss stopped the round (last good checkpoint kept)
    │   └── CheckpointError    an engine checkpoint that is damaged or belongs to another round
    ├── ExchangeError          the client's view of the exchange service
    │   ├── ServerUnavailable  no connection or no answer in time (worth retrying)
    │   ├── ServerRefused      the server answered with an error status
    │   │   └── ServerBusy     a refusal for now (call limit, full disk): worth retrying
    │   └── VerdictTimeout     no verdict arrived within the wait
    ├── FlowerError            the Flower control plane: a SuperLink, SuperNode or run failed
    └── DemoError              a step of `make demo` failed (a command, or a wait that ran out)

`grpc_status` holds the *name* of a `grpc.StatusCode` member, so this module (and
every algorithm layer that raises these errors) stays free of grpc; the server
resolves the name with `getattr(grpc.StatusCode, name)`. The server also names
the error's class in the trailing metadata key `ERROR_CLASS_METADATA`, so a
client can tell a transient refusal (`StoreFull`) from a final one that shares
its status (`PayloadTooLarge`, also ``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

from typing import ClassVar, Final

__all__ = [
    "ERROR_CLASS_METADATA",
    "AppBundleRefused",
    "ArchitectureMismatch",
    "AuditLogBroken",
    "CanonicalFormError",
    "CheckpointError",
    "ConfigError",
    "CustomOperatorError",
    "DamagedRecord",
    "DataError",
    "DatasetLayoutError",
    "DemoError",
    "DuplicateRecord",
    "EngineError",
    "ExchangeError",
    "ExternalDataError",
    "FlowerError",
    "FontPackageMissing",
    "FontUnreadable",
    "FreeError",
    "HandshakeDropped",
    "HomeError",
    "IdxFormatError",
    "InputShapeError",
    "IntakeError",
    "IntakeResourceError",
    "IntakeTimeout",
    "InvalidModelError",
    "KeyFormatError",
    "LoopError",
    "MemoryBankError",
    "MetadataError",
    "ModelTooLarge",
    "NodeNotAdmitted",
    "NonFiniteLoss",
    "NonFiniteWeights",
    "NotOnnxError",
    "OpsetError",
    "OutputShapeError",
    "ParityError",
    "PayloadMismatch",
    "PayloadTooLarge",
    "RecordError",
    "RecordNotFound",
    "ReplayError",
    "RevokedClient",
    "RuntimeProbeError",
    "SecurityError",
    "ServerBusy",
    "ServerRefused",
    "ServerUnavailable",
    "SignatureError",
    "SplitError",
    "StaleRequest",
    "StateConflict",
    "StoreError",
    "StoreFull",
    "StoreVersionError",
    "SubgraphError",
    "TensorLimitError",
    "TlsError",
    "TooFewTeachers",
    "UnknownClient",
    "UnsupportedOperatorError",
    "UploadError",
    "UploadStalled",
    "VerdictTimeout",
    "WireError",
]

ERROR_CLASS_METADATA: Final = "free-error-class"
"""Trailing-metadata key in which the server names the `FreeError` class it refused with."""


class FreeError(Exception):
    """Base of every error a user of FREE-Fed can cause.

    The message is one line: what was wrong and what to do about it.
    """

    exit_code: ClassVar[int] = 1
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(FreeError):
    """An option, file or setting given by the user is invalid."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class HomeError(ConfigError):
    """A server home folder is missing, incomplete, or already exists when it should not."""


class DataError(FreeError):
    """A data set, font or data folder cannot be used."""

    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class FontPackageMissing(DataError):
    """A Debian font package the glyph builder needs is not installed."""


class FontUnreadable(DataError):
    """A font file exists but cannot be opened or rendered."""


class DatasetLayoutError(DataError):
    """A data set folder does not have the layout its loader expects."""


class IdxFormatError(DataError):
    """An IDX file (MNIST format) is corrupt, truncated or of the wrong kind."""


class SplitError(DataError):
    """An episode or split cannot be formed (too few classes or instances)."""


class SecurityError(FreeError):
    """A key, signature or signed manifest cannot be trusted."""

    exit_code = 4
    grpc_status = "UNAUTHENTICATED"


class KeyFormatError(SecurityError):
    """A key file is missing, unreadable or not the expected kind of key."""


class SignatureError(SecurityError):
    """A signature does not verify for the given bytes and key."""


class UnknownClient(SecurityError):
    """A request is signed with a key that is not on the server's allow-list."""


class RevokedClient(SecurityError):
    """A request is signed with the key of an owner the aggregator revoked."""

    grpc_status = "PERMISSION_DENIED"


class ReplayError(SecurityError):
    """A manifest reuses a nonce its client already used for other bytes."""

    grpc_status = "ALREADY_EXISTS"


class CanonicalFormError(SecurityError):
    """Bytes are not the canonical encoding of the expected kind of signed record."""


class WireError(FreeError):
    """A protobuf message does not convert to a valid record."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class RecordError(FreeError):
    """A manifest, receipt, verdict or release has a field outside its rules."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class UploadError(FreeError):
    """Streamed bytes cannot be accepted as the payload the manifest announced."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class PayloadTooLarge(UploadError):
    """An upload is larger than the server's byte cap."""

    grpc_status = "RESOURCE_EXHAUSTED"


class PayloadMismatch(UploadError):
    """The streamed bytes differ in size or sha256 from the signed manifest."""


class UploadStalled(UploadError):
    """An upload being stored sent nothing for too long and was dropped."""

    grpc_status = "ABORTED"


class StoreError(FreeError):
    """The server's store (database or blob files) cannot be read or written."""

    exit_code = 6
    grpc_status = "INTERNAL"


class StoreVersionError(StoreError):
    """The store was written by a newer free-server with a schema this one does not know."""

    grpc_status = "FAILED_PRECONDITION"


class RecordNotFound(StoreError):
    """No client, submission, round or release matches what was asked for."""

    exit_code = 2
    grpc_status = "NOT_FOUND"


class DuplicateRecord(StoreError):
    """A client name or key is already registered."""

    exit_code = 2
    grpc_status = "ALREADY_EXISTS"


class StateConflict(StoreError):
    """A record is not in the state the action needs (e.g. releasing one that is not held)."""

    exit_code = 2
    grpc_status = "FAILED_PRECONDITION"


class IntakeError(FreeError):
    """An untrusted model was refused by intake; `reason` says why, for the owner."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class NotOnnxError(IntakeError):
    """The bytes are not a parseable ONNX model: other data, truncated, or another protobuf type."""


class ModelTooLarge(IntakeError):
    """The file, its node count or its metadata is over the intake caps."""


class ExternalDataError(IntakeError):
    """A tensor refers to data outside the model file (any external-data reference)."""


class CustomOperatorError(IntakeError):
    """The model uses a non-standard operator domain or model-local functions."""


class OpsetError(IntakeError):
    """The model's IR version or opset is outside the range intake supports."""


class UnsupportedOperatorError(IntakeError):
    """An operator, or a form of one, is not on the intake allow-list."""


class SubgraphError(IntakeError):
    """The model holds graph-valued attributes (If branches, training graphs)."""


class LoopError(IntakeError):
    """The model holds a Loop or Scan, which could run without bound."""


class TensorLimitError(IntakeError):
    """A tensor, shape or the parameter count declared by the model is over the caps."""


class NonFiniteWeights(IntakeError):
    """A weight of the model is NaN or infinite."""


class InputShapeError(IntakeError):
    """The model's input is missing, not single, or not the declared image shape."""


class OutputShapeError(IntakeError):
    """The model's output does not give one logit per declared class."""


class MetadataError(IntakeError):
    """The model's task metadata is missing, malformed or inconsistent."""


class InvalidModelError(IntakeError):
    """The model fails onnx's checker or shape inference."""


class RuntimeProbeError(IntakeError):
    """onnxruntime cannot load or run the model."""


class ParityError(IntakeError):
    """The torch conversion and onnxruntime disagree on the model's outputs."""


class IntakeResourceError(IntakeError):
    """The intake worker ran out of memory on the model."""


class IntakeTimeout(IntakeError):
    """The intake worker ran past its time limit on the model."""


class EngineError(FreeError):
    """A meta round cannot start or go on."""

    exit_code = 5
    grpc_status = "FAILED_PRECONDITION"


class MemoryBankError(EngineError):
    """The memory bank cannot form the requested task, or its folder is not one it can read."""


class ArchitectureMismatch(EngineError):
    """Models that must share one architecture (weight averaging) do not."""


class TooFewTeachers(EngineError):
    """A meta round has fewer usable accepted teachers than its configured minimum."""


class NonFiniteLoss(EngineError):
    """A loss or weight became NaN or infinite; the round stopped at its last good checkpoint."""

    grpc_status = "ABORTED"


class CheckpointError(EngineError):
    """An engine checkpoint is damaged, or was written by another round or configuration."""

    grpc_status = "DATA_LOSS"


class StaleRequest(SecurityError):
    """A manifest or call was signed too long ago, or in the future, for the server's window."""


class TlsError(SecurityError):
    """A TLS handshake failed: the peer's certificate is not trusted, or ours was refused."""


class DamagedRecord(StoreError):
    """A stored release or blob no longer matches its signed manifest."""

    grpc_status = "DATA_LOSS"


class AuditLogBroken(DamagedRecord):
    """An audit log entry was changed, removed, reordered or not signed by the server."""


class ExchangeError(FreeError):
    """The exchange service, seen from the client: unreachable, refusing, or not done in time."""

    exit_code = 7
    grpc_status = "UNAVAILABLE"


class ServerUnavailable(ExchangeError):
    """The server cannot be reached or did not answer in time; retrying may help."""


class ServerRefused(ExchangeError):
    """The server answered a request with an error status; `status` names it.

    Parameters
    ----------
    message
        The one line to show (the server's reason, with context).
    status
        Name of the `grpc.StatusCode` the server answered with.
    """

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class VerdictTimeout(ExchangeError):
    """No intake verdict arrived within the time the client was asked to wait."""


class AppBundleRefused(SecurityError):
    """A Flower run ships another app bundle than the installed FREE-Fed round app."""

    grpc_status = "PERMISSION_DENIED"


class NodeNotAdmitted(SecurityError):
    """The SuperLink does not accept this SuperNode's node key (not registered, or revoked)."""

    grpc_status = "PERMISSION_DENIED"


class FlowerError(FreeError):
    """The Flower control plane failed: a SuperLink or SuperNode process, or a run."""

    exit_code = 7
    grpc_status = "UNAVAILABLE"


class DemoError(FreeError):
    """A step of the demo failed: a command exited nonzero, or a wait ran out of time."""

    exit_code = 8


class StoreFull(StoreError):
    """The disk under the server's store is full; the write was undone and may be retried.

    Answered ``RESOURCE_EXHAUSTED`` with a line that names no path: for the owner it
    is transient (the client retries it with backoff), for the operator it means
    freeing disk space in the server home.
    """

    grpc_status = "RESOURCE_EXHAUSTED"


class HandshakeDropped(TlsError):
    """The server closed a TLS handshake before it finished, without a certificate reason.

    A server that requires a client certificate does this, and so does one too
    loaded to finish handshakes; the uploader retries it a few times before
    reporting it.
    """


class ServerBusy(ServerRefused):
    """A refusal for now: the server's call limit is reached, or its disk is full.

    The uploader retries it with backoff, like `ServerUnavailable`.
    """
