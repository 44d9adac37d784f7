"""The one table from pviommu errors to gRPC statuses.

Servicers never build gRPC errors themselves: they let a ``PviommuError``
escape and the ``grpc_errors`` decorator aborts the call with the code from
``HV_TO_GRPC`` plus rich details (google.rpc.ErrorInfo with the HV status and,
for device errors, the DSA completion status), so scripts get a clear,
specific, machine-readable refusal. Unexpected exceptions become INTERNAL
with the exception text, never a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import AbortError
from grpc_status import rpc_status

from pviommu.abi.hv_status import HvStatus
from pviommu.errors import AuthError, DsaError, PviommuError, ServiceUnavailable

DOMAIN = "pviommu.dev"

HV_TO_GRPC: dict[HvStatus, grpc.StatusCode] = {
    HvStatus.SUCCESS: grpc.StatusCode.OK,
    HvStatus.INVALID_HYPERCALL_CODE: grpc.StatusCode.UNIMPLEMENTED,
    HvStatus.INVALID_HYPERCALL_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    HvStatus.INVALID_ALIGNMENT: grpc.StatusCode.INVALID_ARGUMENT,
    HvStatus.INVALID_PARAMETER: grpc.StatusCode.INVALID_ARGUMENT,
    HvStatus.ACCESS_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    HvStatus.INVALID_PARTITION_STATE: grpc.StatusCode.FAILED_PRECONDITION,
    HvStatus.OPERATION_DENIED: grpc.StatusCode.FAILED_PRECONDITION,
    HvStatus.UNKNOWN_PROPERTY: grpc.StatusCode.INVALID_ARGUMENT,
    HvStatus.PROPERTY_VALUE_OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    HvStatus.INSUFFICIENT_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HvStatus.INVALID_PARTITION_ID: grpc.StatusCode.NOT_FOUND,
    HvStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HvStatus.INSUFFICIENT_BUFFERS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HvStatus.NO_RESOURCES: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HvStatus.FEATURE_UNAVAILABLE: grpc.StatusCode.UNIMPLEMENTED,
    HvStatus.INSUFFICIENT_DEVICE_DOMAINS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HvStatus.INVALID_DEVICE_ID: grpc.StatusCode.NOT_FOUND,
    HvStatus.INVALID_DEVICE_STATE: grpc.StatusCode.FAILED_PRECONDITION,
    HvStatus.PENDING_PAGE_REQUESTS: grpc.StatusCode.FAILED_PRECONDITION,
    HvStatus.DEVICE_ALREADY_IN_DOMAIN: grpc.StatusCode.ALREADY_EXISTS,
    HvStatus.OPERATION_FAILED: grpc.StatusCode.ABORTED,
    HvStatus.INSUFFICIENT_CONTIGUOUS_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HvStatus.TIME_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code_of(error: PviommuError) -> grpc.StatusCode:
    if isinstance(error, AuthError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, DsaError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, ServiceUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return HV_TO_GRPC.get(error.hv_status, grpc.StatusCode.UNKNOWN)


def to_status(error: PviommuError) -> grpc.Status:
    """A rich gRPC status: code, message and ErrorInfo(reason, metadata)."""
    metadata = {
        "hv_status": f"{int(error.hv_status):#x}",
        "hv_status_name": HvStatus.name_of(error.hv_status),
    }
    reason = HvStatus.name_of(error.hv_status)
    if isinstance(error, DsaError):
        metadata["dsa_status"] = f"{error.dsa_status:#x}"
        reason = f"DSA_COMP_STATUS_{error.dsa_status:#04x}"
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = grpc_code_of(error)
    st = status_pb2.Status(code=code.value[0], message=f"{reason}: {error}", details=[detail])
    status: grpc.Status = rpc_status.to_status(st)
    return status


def error_info(err: grpc.RpcError) -> dict[str, str]:
    """Client side: the ErrorInfo metadata of a failed call ({} if none)."""
    st = rpc_status.from_call(err)  # type: ignore[arg-type,unused-ignore]
    if st is None:
        return {}
    for detail in st.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return dict(info.metadata)
    return {}


F = TypeVar("F", bound=Callable[..., Any])

#: the code the current call was aborted with (read by the metrics interceptor)
ABORTED_WITH: contextvars.ContextVar[grpc.StatusCode | None] = contextvars.ContextVar("pviommu_aborted_with",
                                                                                    default=None)


def _status_of(exc: Exception) -> grpc.Status:
    if isinstance(exc, PviommuError):
        return to_status(exc)
    # a bug: say so clearly instead of dropping the call
    st = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=f"{type(exc).__name__}: {exc}")
    status: grpc.Status = rpc_status.to_status(st)
    return status


def abort_sync(context: Any, exc: Exception) -> None:
    """Abort a call served in the thread pool with the rich status of ``exc``."""
    st = _status_of(exc)
    ABORTED_WITH.set(st.code)
    context.set_trailing_metadata(st.trailing_metadata)
    context.abort(st.code, st.details)


async def abort_async(context: Any, exc: Exception) -> None:
    """Abort a call served on the event loop with the rich status of ``exc``."""
    st = _status_of(exc)
    ABORTED_WITH.set(st.code)
    await context.abort(st.code, st.details, st.trailing_metadata)


def grpc_errors(fn: F) -> F:
    """Decorate a unary servicer method: map PviommuError to a rich status.
    Works for plain methods (run in the server's thread pool) and coroutines."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                return await fn(self, request, context)
            except (grpc.RpcError, asyncio.CancelledError, AbortError):
                raise
            except Exception as exc:
                await abort_async(context, exc)
        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return fn(self, request, context)
        except (grpc.RpcError, AbortError):
            raise
        except Exception as exc:
            abort_sync(context, exc)

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(fn: F) -> F:
    """Like ``grpc_errors`` for streaming methods (async generators: an open
    stream holds no thread of the server)."""
    if not inspect.isasyncgenfunction(fn):
        raise TypeError(f"{fn.__qualname__}: streaming methods are async generators (grpc.aio)")

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            async for item in fn(self, request, context):
                yield item
        except (grpc.RpcError, asyncio.CancelledError, AbortError):
            raise
        except Exception as exc:
            await abort_async(context, exc)

    return wrapper  # type: ignore[return-value]
