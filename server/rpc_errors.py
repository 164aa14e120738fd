"""The one place where errors become gRPC statuses (Flower's ``rpc_error_translator``).

A `FreeError` ends as the status its class names (`free_common.errors`) with its
one-line message, which says what to fix. Errors whose status is ``INTERNAL``
(store failures) and unexpected exceptions are logged with their detail and
answered with a generic line, so no path or stack reaches a remote peer. The
error's class name travels in the trailing metadata (`ERROR_CLASS_METADATA`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from free_common.errors import ERROR_CLASS_METADATA, FreeError

__all__ = ["CallGone", "internal_message", "public_message", "rpc_error_translator", "status_code"]

log = logging.getLogger("free_server.rpc")


class CallGone(Exception):
    """The call ended (cancelled, deadline passed, peer gone) while its stream was read."""


def status_code(error: FreeError) -> grpc.StatusCode:
    """Return the gRPC status an error class names."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, error.grpc_status)
    return code


def internal_message(rpc_name: str) -> str:
    """Return the line a peer gets for a failure that is the server's, not the caller's."""
    return f"{rpc_name} failed inside the server; the aggregator's log has the details"


def public_message(error: FreeError, rpc_name: str) -> tuple[grpc.StatusCode, str]:
    """Return the status and the line a peer may see for `error`, logging it."""
    code = status_code(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", rpc_name, error.message)
        return code, internal_message(rpc_name)
    log.info("%s refused with %s: %s", rpc_name, code.name, error.message)
    return code, error.message


@asynccontextmanager
async def rpc_error_translator(
    context: grpc.aio.ServicerContext[Any, Any], rpc_name: str
) -> AsyncIterator[None]:
    """Run an RPC body; abort the call with the right status if it raises.

    Parameters
    ----------
    context
        The call's servicer context (the exchange runs on grpc's asyncio server).
    rpc_name
        The method name, for the log and the generic message.
    """
    try:
        yield
    except FreeError as error:
        # The class name lets a client retry a transient refusal (`StoreFull`) and not a
        # final one with the same status; a class name carries no path or detail.
        context.set_trailing_metadata(((ERROR_CLASS_METADATA, type(error).__name__),))
        await context.abort(*public_message(error, rpc_name))
    except (grpc.RpcError, CallGone):
        # Reading the request stream fails so when the client cancelled or vanished;
        # nobody is listening for a status any more.
        log.info("%s: the client cancelled the call or went away", rpc_name)
        await context.abort(grpc.StatusCode.CANCELLED, f"{rpc_name} was cancelled by the client")
    except grpc.aio.AbortError:
        raise  # an abort already under way (the auth interceptor's)
    except Exception:
        log.exception("%s failed unexpectedly", rpc_name)
        await context.abort(grpc.StatusCode.INTERNAL, internal_message(rpc_name))
