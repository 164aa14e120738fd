"""The auth interceptor: every exchange call must be signed by a key on the allow-list.

Like Flower's ``NodeAuthServerInterceptor`` and the gRPC auth example: it reads
the call's metadata (`free_common.security.call_auth`), looks the key up in the
store on every call (so ``clients add`` / ``revoke`` take effect at once while
the server runs), checks signature and time window, and answers a refused call
with a handler that aborts with the error's status. Health checks are not
intercepted: monitors need no key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import grpc

from free_common.errors import FreeError
from free_common.security.call_auth import (
    KEY_ID_HEADER,
    now_ms,
    read_call_metadata,
    verify_call,
)
from free_common.security.keys import public_key_from_pem
from free_server.rpc_errors import internal_message, public_message
from free_server.store import Store

__all__ = ["EXCHANGE_METHOD_PREFIX", "CallAuthInterceptor", "authenticate_call", "caller_key_id"]

EXCHANGE_METHOD_PREFIX = "/free.v1.Exchange/"

log = logging.getLogger("free_server.auth")

if TYPE_CHECKING:
    # grpc-stubs makes these generic; the runtime classes are not subscriptable.
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


def authenticate_call(
    store: Store,
    method: str,
    metadata: Any,
    *,
    now: int,
    window_ms: int,
) -> str:
    """Check one call's credentials; return the caller's key id.

    Raises
    ------
    SignatureError, StaleRequest
        Missing or bad credentials, or a timestamp outside the window.
    UnknownClient, RevokedClient
        The key is not (or no longer) on the allow-list.
    """
    credentials = read_call_metadata(metadata or ())
    client = store.active_client(credentials.key_id)
    public_key = public_key_from_pem(client.public_key_pem.encode("ascii"), "allow-list entry")
    verify_call(public_key, method, credentials, now=now, window_ms=window_ms)
    return credentials.key_id


def caller_key_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Return the key id of an authenticated call (the interceptor let it through)."""
    for key, value in context.invocation_metadata() or ():
        if key == KEY_ID_HEADER and isinstance(value, str):
            return value
    raise RuntimeError("exchange call without credentials passed the auth interceptor")


def _aborting_handler(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """Build a handler of the same shape as `handler` that refuses the call."""

    async def abort(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort, **kwargs)


class CallAuthInterceptor(_Interceptor):
    """Refuse exchange calls whose credentials do not check out.

    The check reads the store and verifies a signature: it runs on `executor`'s
    threads, so the event loop keeps moving other calls' bytes meanwhile.

    Parameters
    ----------
    store
        Where the allow-list is read, on every call.
    window_s
        How far a call's timestamp may be from the server's clock.
    executor
        Threads for the check (None: the event loop's default pool).
    clock
        Unix milliseconds now (tests pass a fixed one).
    """

    def __init__(
        self,
        store: Store,
        window_s: float,
        executor: Executor | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._window_ms = int(window_s * 1000)
        self._executor = executor
        self._clock = clock

    async def intercept_service(  # type: ignore[override]  # None: no such method
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Let an authenticated exchange call (or any other service's call) through."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(EXCHANGE_METHOD_PREFIX):
            return handler
        name = method.removeprefix(EXCHANGE_METHOD_PREFIX)
        metadata = handler_call_details.invocation_metadata
        check = functools.partial(
            authenticate_call,
            self._store,
            method,
            metadata,
            now=self._clock(),
            window_ms=self._window_ms,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, check)
        except FreeError as error:
            return _aborting_handler(handler, *public_message(error, name))
        except Exception:
            log.exception("authenticating a %s call failed unexpectedly", name)
            return _aborting_handler(handler, grpc.StatusCode.INTERNAL, internal_message(name))
        return handler
