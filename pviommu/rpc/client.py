"""Client channels: wait for the server, attach the bearer token."""

from __future__ import annotations

import grpc

from pviommu.rpc.auth import BearerClientInterceptor
from pviommu.rpc.server import SERVER_OPTIONS


def connect(address: str, token: str | None = None, *, ready_timeout: float | None = 10.0) -> grpc.Channel:
    """An insecure channel to ``address`` carrying ``token`` on every call.

    With ``ready_timeout`` it waits until the server answers, so a service
    started a moment ago is not reported as down; the wait raises
    ``grpc.FutureTimeoutError`` with the address when it never comes up."""
    channel = grpc.insecure_channel(address, options=SERVER_OPTIONS)
    if ready_timeout is not None:
        try:
            grpc.channel_ready_future(channel).result(timeout=ready_timeout)
        except grpc.FutureTimeoutError as exc:
            channel.close()
            raise ConnectionError(f"no gRPC server answered at {address} within {ready_timeout}s") from exc
    if token:
        return grpc.intercept_channel(channel, BearerClientInterceptor(token))
    return channel
