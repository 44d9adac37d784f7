"""Wrapping gRPC method handlers, whatever their kind, for the aio server.

Servers run on ``grpc.aio``: streaming handlers are async (an open stream
holds no thread), unary handlers are plain functions the server runs in its
thread pool (they may wait for an IOMMU unit). Interceptors that need to run
code *around* a handler (binding the caller's identity, timing, counting
streams) wrap it with ``wrap_handler``, which keeps the kind and the sync or
async nature of the original and runs ``around(context)`` -- a context
manager -- in the same thread or task as the handler itself.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc

Around = Callable[[Any], AbstractContextManager[Any]]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


def _unary(inner: Callable[..., Any], around: Around) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(inner):
        async def call_async(request: Any, context: Any) -> Any:
            with around(context):
                return await inner(request, context)
        return call_async

    def call(request: Any, context: Any) -> Any:
        with around(context):
            return inner(request, context)
    return call


def _streaming(inner: Callable[..., Any], around: Around) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):
        async def gen_async(request: Any, context: Any) -> AsyncIterator[Any]:
            with around(context):
                async for item in inner(request, context):
                    yield item
        return gen_async
    if inspect.iscoroutinefunction(inner):  # a handler that writes with context.write
        async def call_async(request: Any, context: Any) -> Any:
            with around(context):
                return await inner(request, context)
        return call_async

    def gen(request: Any, context: Any) -> Iterator[Any]:
        with around(context):
            yield from inner(request, context)
    return gen


def _behaviour(fn: Callable[..., Any] | None) -> Callable[..., Any]:
    if fn is None:
        raise ValueError("a method handler without its behaviour")
    return fn


def wrap_handler(handler: Handler, around: Around) -> Handler:
    """``handler`` with ``around(context)`` entered for the whole call."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_streaming(_behaviour(handler.stream_stream), around), des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_unary(_behaviour(handler.stream_unary), around), des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(_behaviour(handler.unary_stream), around), des, ser)
    return grpc.unary_unary_rpc_method_handler(_unary(_behaviour(handler.unary_unary), around), des, ser)


def refusing_handler(handler: Handler, code: grpc.StatusCode, details: str) -> Handler:
    """A handler of ``handler``'s kind that only aborts the call with ``code``."""
    async def abort(request: Any, context: Any) -> Any:
        await context.abort(code, details)

    async def abort_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(code, details)
        yield  # pragma: no cover  (never reached: abort raises)

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(abort, des, ser)


def is_streaming(handler: Handler) -> bool:
    return bool(handler.request_streaming or handler.response_streaming)
