"""The gRPC servicer of the exchange service: decode, call `ExchangeService`, encode.

Thin on purpose: each method converts messages with `free_common.wire`, calls the
plain-record service, and lets `rpc_error_translator` turn any error into the
status its class names. The only server module (with the server builder's
registration call) that touches generated code.

The methods run on grpc's asyncio server (`free_server.grpc_server`), but the
service is plain blocking code (SQLite, files, fsync, the static check workers):
each call's work runs on a thread of a bounded pool. An upload waits for a free
upload thread *without reading its stream*, so HTTP/2 flow control holds the
owner's bytes on its side (one 64 KiB stream window at most in the server)
until the upload is served: calls queue instead of being refused, and memory
does not grow with the number waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from free_common import wire
from free_common.errors import UploadStalled, WireError
from free_common.proto import exchange_pb2 as pb
from free_server.auth import caller_key_id
from free_server.exchange import ExchangeService
from free_server.rpc_errors import CallGone, rpc_error_translator

__all__ = ["ExchangeServicer", "add_to_server", "full_service_name"]

Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)
_END = object()

READ_IDLE_S = 60.0
"""An upload being stored whose next message takes longer than this is dropped.

It holds an upload thread; an owner that stops sending must not keep it forever.
"""


def _decode(message_type: type[_M], data: bytes) -> _M:
    """Decode a request here, so bytes that are no such message get a clear refusal."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        name = message_type.DESCRIPTOR.full_name
        raise WireError(
            f"the request does not decode as {name}: send what free-client sends"
        ) from None


def _blocking_reader(
    requests: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop
) -> Iterator[pb.SubmitRequest]:
    """Read and decode an asyncio request stream from a worker thread, one message at a time.

    Each message is read by the event loop when the thread asks for it, so an
    upload's bytes move only as fast as its thread stores them (flow control).
    """
    while True:
        future = asyncio.run_coroutine_threadsafe(anext(requests, _END), loop)
        try:
            message = future.result(READ_IDLE_S)
        except TimeoutError:
            future.cancel()
            raise UploadStalled(
                f"the upload sent nothing for {READ_IDLE_S:g} s and was dropped: submit again"
            ) from None
        # Whatever ends the read (call cancelled, deadline passed, loop stopping) ends
        # the upload: nothing will read a reply.
        except Exception as exc:  # noqa: BLE001
            raise CallGone(f"the request stream ended: {type(exc).__name__}") from None
        if message is _END:
            return
        assert isinstance(message, bytes)
        yield _decode(pb.SubmitRequest, message)


class ExchangeServicer:
    """Serve `free.v1.Exchange` from an `ExchangeService`.

    Requests arrive as bytes and are decoded here (`add_to_server` registers no
    deserializer): grpc's own failure to decode would answer with a Python class
    name instead of a line that says what to fix.

    Parameters
    ----------
    service
        What the calls do.
    uploads
        Threads that serve uploads (`Submit`); calls beyond them wait their turn.
    calls
        Threads for the short calls (verdicts, status, releases), so they never
        wait behind uploads.
    """

    def __init__(self, service: ExchangeService, uploads: Executor, calls: Executor) -> None:
        self._service = service
        self._uploads = uploads
        self._calls = calls

    async def Submit(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.SignedReceipt:
        """Receive one upload and answer with the signed receipt."""
        async with rpc_error_translator(context, "Submit"):
            caller = caller_key_id(context)
            loop = asyncio.get_running_loop()

            def receive() -> pb.SignedReceipt:
                signed, chunks = wire.read_submit_stream(_blocking_reader(request_iterator, loop))
                return wire.signed_receipt_to_proto(self._service.submit(signed, chunks, caller))

            reply = await loop.run_in_executor(self._uploads, receive)
        return reply

    async def GetVerdict(self, request: bytes, context: Context) -> pb.Verdict:
        """Answer with the intake verdict on one of the caller's submissions."""
        async with rpc_error_translator(context, "GetVerdict"):
            submission_id = wire.verdict_request_from_proto(_decode(pb.GetVerdictRequest, request))
            caller = caller_key_id(context)
            verdict = await self._run(lambda: self._service.verdict(submission_id, caller))
        return wire.verdict_to_proto(verdict)

    async def FetchRelease(
        self, request: bytes, context: Context
    ) -> AsyncIterator[pb.FetchReleaseResponse]:
        """Stream a release: its signed manifest, then its weights."""
        async with rpc_error_translator(context, "FetchRelease"):
            version = wire.release_request_from_proto(_decode(pb.FetchReleaseRequest, request))
            download = await self._run(lambda: self._service.release(version))
            responses = wire.release_responses(download.signed, download.chunks)
            # Each piece is read from disk (and the blob's hash checked at its end) on a
            # thread; a slow reader holds no thread while its window is full.
            while (response := await self._run(lambda: next(responses, _END))) is not _END:
                assert isinstance(response, pb.FetchReleaseResponse)
                yield response

    async def GetStatus(self, request: bytes, context: Context) -> pb.ServerStatus:
        """Answer with the server's version and counters."""
        async with rpc_error_translator(context, "GetStatus"):
            _decode(pb.GetStatusRequest, request)
            status = await self._run(self._service.status)
        return wire.server_status_to_proto(status)

    async def _run(self, work: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._calls, work)


def add_to_server(
    service: ExchangeService, server: grpc.aio.Server, uploads: Executor, calls: Executor
) -> None:
    """Register the exchange servicer on a gRPC asyncio server (requests stay bytes)."""
    servicer = ExchangeServicer(service, uploads, calls)
    handlers = {
        "Submit": grpc.stream_unary_rpc_method_handler(
            servicer.Submit, response_serializer=pb.SignedReceipt.SerializeToString
        ),
        "GetVerdict": grpc.unary_unary_rpc_method_handler(
            servicer.GetVerdict, response_serializer=pb.Verdict.SerializeToString
        ),
        "FetchRelease": grpc.unary_stream_rpc_method_handler(
            servicer.FetchRelease, response_serializer=pb.FetchReleaseResponse.SerializeToString
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus, response_serializer=pb.ServerStatus.SerializeToString
        ),
    }
    generic = grpc.method_handlers_generic_handler(full_service_name(), handlers)
    server.add_generic_rpc_handlers((generic,))


def full_service_name() -> str:
    """Return the exchange's full service name (``free.v1.Exchange``), for health checks."""
    name: str = pb.DESCRIPTOR.services_by_name["Exchange"].full_name
    return name
