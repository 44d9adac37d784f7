"""One connection to one service, with the client's error handling.

``Endpoint`` opens its channel on first use (waiting for the server, as
``pviommu.rpc.client.connect`` does), gives every call a deadline, and turns
``grpc.RpcError`` into the ``ClientError`` family, so no gRPC exception
reaches a user's script.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from pviommu.client.errors import Unreachable, from_rpc_error
from pviommu.rpc.client import connect

S = TypeVar("S")

DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0


class Endpoint:
    """``address`` + credential; ``stub(cls)`` gives a generated stub on the channel."""

    def __init__(self, address: str, token: str | None, *, what: str, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.address = address
        self.token = token
        self.what = what
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._channel: grpc.Channel | None = None
        self._stubs: dict[type, Any] = {}
        self._lock = threading.Lock()

    @property
    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                try:
                    self._channel = connect(self.address, self.token, ready_timeout=self.connect_timeout,
                                            what=self.what)
                except ConnectionError as exc:
                    raise Unreachable(f"{self.what}: {exc}") from None
            return self._channel

    def stub(self, cls: Callable[[grpc.Channel], S]) -> S:
        key = cls if isinstance(cls, type) else type(cls)
        stub = self._stubs.get(key)
        if stub is None:
            stub = cls(self.channel)
            self._stubs[key] = stub
        return stub

    def call(self, method: Callable[..., Any], request: Any, what: str, timeout: float | None = None) -> Any:
        """One unary call; a failure raises ``ClientError`` naming ``what``."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self.what}: {what}") from None

    def stream(self, method: Callable[..., Any], request: Any, what: str,
               timeout: float | None = None) -> Iterator[Any]:
        """A server stream; a failure while reading raises ``ClientError``."""
        try:
            yield from method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self.what}: {what}") from None

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._stubs.clear()
