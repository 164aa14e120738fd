"""The gRPC servicer of the exchange service: decode, call `ExchangeService`, encode.

Thin on purpose: each method converts messages with `free_common.wire`, calls the
plain-record service, and lets `rpc_error_translator` turn any error into the
status its class names. The only server module (with the server builder's
registration call) that touches generated code.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from free_common import wire
from free_common.proto import exchange_pb2 as pb
from free_common.proto import exchange_pb2_grpc as pb_grpc
from free_server.auth import caller_key_id
from free_server.exchange import ExchangeService
from free_server.rpc_errors import rpc_error_translator

__all__ = ["ExchangeServicer", "add_to_server", "full_service_name"]


class ExchangeServicer(pb_grpc.ExchangeServicer):
    """Serve `free.v1.Exchange` from an `ExchangeService`."""

    def __init__(self, service: ExchangeService) -> None:
        self._service = service

    def Submit(
        self, request_iterator: Iterator[pb.SubmitRequest], context: grpc.ServicerContext
    ) -> pb.SignedReceipt:
        """Receive one upload and answer with the signed receipt."""
        with rpc_error_translator(context, "Submit"):
            signed, chunks = wire.read_submit_stream(request_iterator)
            receipt = self._service.submit(signed, chunks, caller_key_id(context))
            return wire.signed_receipt_to_proto(receipt)

    def GetVerdict(
        self, request: pb.GetVerdictRequest, context: grpc.ServicerContext
    ) -> pb.Verdict:
        """Answer with the intake verdict on one of the caller's submissions."""
        with rpc_error_translator(context, "GetVerdict"):
            submission_id = wire.verdict_request_from_proto(request)
            return wire.verdict_to_proto(
                self._service.verdict(submission_id, caller_key_id(context))
            )

    def FetchRelease(
        self, request: pb.FetchReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchReleaseResponse]:
        """Stream a release: its signed manifest, then its weights."""
        with rpc_error_translator(context, "FetchRelease"):
            download = self._service.release(wire.release_request_from_proto(request))
            yield from wire.release_responses(download.signed, download.chunks)

    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.ServerStatus:
        """Answer with the server's version and counters."""
        with rpc_error_translator(context, "GetStatus"):
            return wire.server_status_to_proto(self._service.status())


def add_to_server(service: ExchangeService, server: grpc.Server) -> None:
    """Register the exchange servicer on a gRPC server."""
    pb_grpc.add_ExchangeServicer_to_server(ExchangeServicer(service), server)


def full_service_name() -> str:
    """Return the exchange's full service name (``free.v1.Exchange``), for health checks."""
    name: str = pb.DESCRIPTOR.services_by_name["Exchange"].full_name
    return name
