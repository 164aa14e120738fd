"""The one exception tree of FREE-Fed, and its map to exit codes and gRPC statuses.

Every error a user can cause is a `FreeError`. Each class says, in one place,
which process exit code a CLI returns for it and which gRPC status the server
answers with, so the CLIs and the servicer never invent their own mapping::

    FreeError
    ├── ConfigError            bad option, file or setting given by the user
    ├── DataError              data sets and font packages
    │   ├── FontPackageMissing
    │   ├── FontUnreadable
    │   ├── DatasetLayoutError
    │   ├── IdxFormatError
    │   └── SplitError
    ├── SecurityError          keys, signatures, manifests
    │   ├── KeyFormatError
    │   └── SignatureError
    ├── WireError              a protobuf message that does not make a valid record
    ├── IntakeError            an untrusted model refused (subclasses in `models.intake`)
    └── EngineError            a meta round that cannot go on

`grpc_status` holds the *name* of a `grpc.StatusCode` member, so this module (and
every algorithm layer that raises these errors) stays free of grpc; the server
resolves the name with `getattr(grpc.StatusCode, name)`.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "DataError",
    "DatasetLayoutError",
    "EngineError",
    "FontPackageMissing",
    "FontUnreadable",
    "FreeError",
    "IdxFormatError",
    "IntakeError",
    "KeyFormatError",
    "SecurityError",
    "SignatureError",
    "SplitError",
    "WireError",
]


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


class WireError(FreeError):
    """A protobuf message does not convert to a valid record."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class IntakeError(FreeError):
    """An untrusted model was refused by intake; `reason` says why, for the owner."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class EngineError(FreeError):
    """A meta round cannot start or go on."""

    exit_code = 5
    grpc_status = "FAILED_PRECONDITION"
