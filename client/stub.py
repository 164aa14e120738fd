"""The client's only user of generated code: a channel to the exchange and its four calls.

`ExchangeClient` speaks plain records (`free_common.types`) on both sides, signs
every call with the owner's key (`free_common.security.call_auth`), sets the
message caps on purpose, and turns every gRPC failure into one `FreeError`:

- a TLS handshake that fails for a certificate reason (wrong ``--ca``, a server
  certificate that names another host) is a `TlsError`; retrying cannot help;
- a TLS handshake the server closed before the channel was ever READY, with no
  certificate reason, is a `HandshakeDropped` (a `TlsError`): a server that
  requires a client certificate does this, and so does one too loaded to finish
  handshakes, so the uploader retries it a few times before reporting it;
- no connection, or no answer in time, is `ServerUnavailable` (worth a retry);
- a refusal for now is `ServerBusy` (worth a retry): gRPC's own concurrent-call
  limit, or the server's `StoreFull` (its disk is full);
- any other status the server answers with is `ServerRefused`, carrying the
  server's one-line reason and the status name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from free_common import wire
from free_common.errors import (
    ERROR_CLASS_METADATA,
    ConfigError,
    FreeError,
    HandshakeDropped,
    ServerBusy,
    ServerRefused,
    ServerUnavailable,
    StoreFull,
    TlsError,
)
from free_common.proto import exchange_pb2 as pb
from free_common.proto import exchange_pb2_grpc as pb_grpc
from free_common.security.call_auth import sign_call
from free_common.types import (
    Receipt,
    ReleaseManifest,
    ServerStatus,
    Signed,
    SubmissionManifest,
    Verdict,
)

__all__ = ["CHANNEL_OPTIONS", "Connection", "ExchangeClient", "channel_credentials", "method_path"]

_T = TypeVar("_T")
_SERVICE = pb.DESCRIPTOR.services_by_name["Exchange"].full_name
# A handshake that failed for a reason in the certificates reads "Tls handshake failed
# (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...CERTIFICATE_VERIFY_FAILED" (or names the
# peer certificate); retrying cannot help. A handshake the server merely dropped reads
# "Handshake read failed (Socket closed)", "Connection reset by peer", "handshaker
# shutdown": an overloaded server, or one that wants a client certificate.
_CERTIFICATE_MARKERS = ("certificate", "ssl_error_ssl", "tsi_protocol_failure")
_DROPPED_MARKERS = ("handshake", "socket closed", "connection reset", "broken pipe")
# What grpcio's server answers, before any FREE-Fed code runs, to a call beyond its
# maximum_concurrent_rpcs (grpc/_server.py). The server's own RESOURCE_EXHAUSTED
# refusals (`PayloadTooLarge`, `StoreFull`) always carry ERROR_CLASS_METADATA, so this
# exact line without it can only come from the call limit.
_CALL_LIMIT_DETAILS = "Concurrent RPC limit exceeded!"
# After a failed connection a channel refuses calls until its own reconnect backoff
# ends (up to 120 s by default); keep it shorter than the uploader's retry delays,
# so a retry after a server restart reaches the server. gRPC core reads
# `min_reconnect_backoff_ms` as the least time a connection attempt (TCP and TLS
# handshake) is given, not as a backoff: at 200 ms it abandoned the handshakes a
# loaded server was slow to finish, so keep gRPC's own 20 s there.
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 20_000),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
CHANNEL_OPTIONS = (*wire.GRPC_MESSAGE_OPTIONS, *_RECONNECT_OPTIONS)
"""The options of an owner's channel to the exchange service."""


@dataclass(frozen=True)
class Connection:
    """Where the exchange is and how to reach it.

    Attributes
    ----------
    server
        ``HOST:PORT`` of the exchange service.
    ca
        The aggregator's CA certificate (``ca.pem``); required unless `insecure`.
    insecure
        Plaintext, for a server started with ``--insecure``.
    tls_cert, tls_key
        Client certificate and key, for a server that requires mutual TLS.
    """

    server: str
    ca: Path | None = None
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--server {self.server!r} is not HOST:PORT, e.g. localhost:9091")
        if self.insecure and (self.ca or self.tls_cert):
            raise ConfigError("--insecure is plaintext: drop --ca and --tls-cert with it")
        if not self.insecure and self.ca is None:
            raise ConfigError(
                "give --ca CA.pem (the aggregator's ca.pem), or --insecure for a plaintext"
                " test server"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mutual TLS needs both --tls-cert and --tls-key")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def channel_credentials(connection: Connection) -> grpc.ChannelCredentials:
    """TLS credentials that trust only the given CA (and present a client certificate)."""
    assert connection.ca is not None  # Connection checks this unless insecure
    root = _read(connection.ca, "CA certificate")
    if b"-----BEGIN CERTIFICATE-----" not in root:
        raise ConfigError(f"{connection.ca} is not a PEM certificate: give the aggregator's ca.pem")
    if connection.tls_cert is None or connection.tls_key is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=_read(connection.tls_key, "TLS client key"),
        certificate_chain=_read(connection.tls_cert, "TLS client certificate"),
    )


def method_path(name: str) -> str:
    """Return the full gRPC path of an exchange method (what `sign_call` signs)."""
    return f"/{_SERVICE}/{name}"


def _error_class(error: grpc.RpcError) -> str:
    """Return the `FreeError` class the server named in the trailing metadata, or ""."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == ERROR_CLASS_METADATA:
            return str(value)
    return ""


class ExchangeClient:
    """A connection to the exchange service, signing every call with the owner's key.

    Parameters
    ----------
    connection
        Server address and transport security.
    signing_key
        The owner's Ed25519 key (``client.key``).
    timeout_s
        Deadline of the short calls (verdict, status).
    """

    def __init__(
        self, connection: Connection, signing_key: Ed25519PrivateKey, *, timeout_s: float = 30.0
    ) -> None:
        self.connection = connection
        self._key = signing_key
        self._timeout_s = timeout_s
        options = list(CHANNEL_OPTIONS)
        if connection.insecure:
            self._channel = grpc.insecure_channel(connection.server, options=options)
        else:
            self._channel = grpc.secure_channel(
                connection.server, channel_credentials(connection), options=options
            )
        self._stub = pb_grpc.ExchangeStub(self._channel)
        # A server that requires a client certificate closes the socket before the channel
        # is ever READY; a server that dies mid-upload closes it after. Only the first is TLS.
        self._ever_ready = False
        self._channel.subscribe(self._on_connectivity)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY and not self._ever_ready:
            self._ever_ready = True
            # Once READY was seen there is nothing more to learn; a subscribed channel
            # keeps a thread that wakes five times a second (grpc's _poll_connectivity).
            self._channel.unsubscribe(self._on_connectivity)

    def close(self) -> None:
        """Close the channel."""
        self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()

    def __enter__(self) -> ExchangeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _error(self, error: grpc.RpcError, what: str) -> FreeError:
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        where = self.connection.server
        if code is grpc.StatusCode.UNAVAILABLE:
            if not self.connection.insecure:
                tls = self._tls_error(details.lower())
                if tls is not None:
                    return tls
            return ServerUnavailable(
                f"cannot reach the exchange service at {where} ({details or 'unavailable'}):"
                " check --server and that `free-server start` runs there"
            )
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            refused_as = _error_class(error)
            if not refused_as and details == _CALL_LIMIT_DETAILS:
                return ServerBusy(
                    f"{where} is serving as many calls as it allows ({details}); try again later",
                    code.name,
                )
            if refused_as == StoreFull.__name__:
                return ServerBusy(f"the server refused {what}: {details} ({code.name})", code.name)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnavailable(f"{where} did not finish {what} in time; try again later")
        if code is grpc.StatusCode.CANCELLED:
            return ServerUnavailable(f"{what} was cancelled before it finished ({details})")
        return ServerRefused(f"the server refused {what}: {details} ({code.name})", code.name)

    def _tls_error(self, details: str) -> TlsError | None:
        """Return the TLS failure that UNAVAILABLE `details` (lower-case) mean, if any."""
        where = self.connection.server
        if any(m in details for m in _CERTIFICATE_MARKERS):
            return TlsError(
                f"the TLS handshake with {where} failed: the server's certificate does not"
                f" verify against --ca {self.connection.ca} (or the server wants a client"
                " certificate); check that you were given this server's ca.pem"
            )
        # A server that dies mid-upload also closes the socket, but after the channel was
        # READY: that is an outage, retried as one.
        if self._ever_ready or not any(m in details for m in _DROPPED_MARKERS):
            return None
        if self.connection.tls_cert is None:
            return HandshakeDropped(
                f"{where} closed the TLS handshake: it probably requires mutual TLS (give"
                " --tls-cert and --tls-key issued by the aggregator), or it is overloaded"
                " (try again later)"
            )
        return HandshakeDropped(
            f"{where} closed the TLS handshake: it is overloaded (try again later), or it"
            f" does not accept --tls-cert {self.connection.tls_cert} (ask the aggregator)"
        )

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except grpc.RpcError as error:
            raise self._error(error, what) from None

    def _metadata(self, name: str) -> tuple[tuple[str, str | bytes], ...]:
        return sign_call(self._key, method_path(name))

    def submit(
        self,
        signed: Signed[SubmissionManifest],
        chunks: Iterable[bytes],
        *,
        timeout_s: float,
    ) -> Signed[Receipt]:
        """Stream one upload and return the server's signed receipt (not yet verified).

        Raises
        ------
        FreeError
            A transport failure or the server's refusal (see the module docstring), or
            whatever reading `chunks` raised.
        """
        failure: list[BaseException] = []

        def requests() -> Iterator[pb.SubmitRequest]:
            # gRPC reports an exception in the request stream only as a cancelled call;
            # keep it, so the caller sees the real cause.
            try:
                yield from wire.submit_requests(signed, chunks)
            except BaseException as exc:
                failure.append(exc)
                raise

        try:
            reply = self._stub.Submit(
                requests(), timeout=timeout_s, metadata=self._metadata("Submit")
            )
        except grpc.RpcError as error:
            if failure:
                raise failure[0] from None
            raise self._error(error, "the upload") from None
        return wire.signed_receipt_from_proto(reply)

    def verdict(self, submission_id: str) -> Verdict:
        """Return the intake verdict on one of this owner's submissions."""
        request = wire.verdict_request_to_proto(submission_id)
        reply = self._call(
            "the verdict request",
            lambda: self._stub.GetVerdict(
                request, timeout=self._timeout_s, metadata=self._metadata("GetVerdict")
            ),
        )
        return wire.verdict_from_proto(reply)

    def status(self) -> ServerStatus:
        """Return the server's version, key id and counters."""
        reply = self._call(
            "the status request",
            lambda: self._stub.GetStatus(
                pb.GetStatusRequest(),
                timeout=self._timeout_s,
                metadata=self._metadata("GetStatus"),
            ),
        )
        return wire.server_status_from_proto(reply)

    def fetch_release(
        self, version: int | None = None, *, timeout_s: float = 600.0
    ) -> tuple[Signed[ReleaseManifest], Iterator[bytes]]:
        """Start downloading a release (the latest when `version` is None).

        Returns
        -------
        tuple
            The signed release manifest (not yet verified) and an iterator over the
            weights' chunks; both raise `FreeError` on transport or server failure.
        """
        request = wire.release_request_to_proto(version)
        responses = self._stub.FetchRelease(
            request, timeout=timeout_s, metadata=self._metadata("FetchRelease")
        )
        guarded: Iterator[pb.FetchReleaseResponse] = self._guarded(
            responses, "the release download"
        )
        return wire.read_release_stream(guarded)

    def _guarded(self, stream: Iterable[_T], what: str) -> Iterator[_T]:
        try:
            yield from stream
        except grpc.RpcError as error:
            raise self._error(error, what) from None
