"""Bearer-token identity for gRPC calls.

A caller sends ``authorization: Bearer <token>`` metadata. The server's
interceptor resolves the token to a ``Principal`` (admin, partition, device,
host) with a resolver supplied by the service and binds it in a context
variable for the handler's whole run (``pviommu.rpc.handlers.wrap_handler``:
in the handler's own thread or task), so nothing leaks between calls. The caller's partition
is always taken from here, never from a request field.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from pviommu.errors import AuthError
from pviommu.rpc.handlers import is_streaming, refusing_handler, wrap_handler

AUTH_HEADER = "authorization"
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("pviommu_principal", default=None)

#: Methods anyone may call (probes and tooling).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "admin" | "partition" | "device" | "host"
    id: int = 0
    name: str = ""
    #: for a partition's credential at a device: the ownership epoch it was
    #: accepted under (the device refuses it once the epoch moved)
    epoch: int = 0


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


ADMIN_TOKEN_ENV = "PVIOMMU_ADMIN_TOKEN"


def admin_token_from(token_file: str | None, who: str) -> str:
    """The admin credential from ``token_file`` or ``$PVIOMMU_ADMIN_TOKEN``;
    exits with a clear message when neither gives one (there is no default)."""
    import os

    from pviommu.exitcodes import read_secret, usage_exit

    token = read_secret(token_file, who, "admin token") if token_file else os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        usage_exit(f"{who}: set {ADMIN_TOKEN_ENV} or --admin-token-file (there is no default credential)")
    return token


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (raises AuthError if none)."""
    principal = _current.get()
    if principal is None:
        raise AuthError("no credential on this call")
    return principal


def require(*kinds: str) -> Principal:
    principal = current_principal()
    if principal.kind not in kinds:
        raise AuthError(f"a {principal.kind} credential may not call this (needs {'/'.join(kinds)})")
    return principal


def bearer_of(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


@contextmanager
def _bound(principal: Principal) -> Iterator[None]:
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)


class StreamQuota:
    """Streams one principal may hold open at once (RESOURCE_EXHAUSTED beyond):
    one partition's idle streams can never crowd out anybody else."""

    def __init__(self, per_principal: int) -> None:
        self.per_principal = per_principal
        self._open: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def reserve(self, principal: Principal) -> bool:
        key = (principal.kind, principal.id)
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_principal:
                return False
            self._open[key] = n + 1
            return True

    def release(self, principal: Principal) -> None:
        key = (principal.kind, principal.id)
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n <= 0:
                self._open.pop(key, None)
            else:
                self._open[key] = n

    def open_streams(self, principal: Principal) -> int:
        with self._lock:
            return self._open.get((principal.kind, principal.id), 0)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Resolve the bearer token; unauthenticated calls to non-public methods
    are refused with UNAUTHENTICATED before any handler runs. The principal
    is bound for the handler's whole run, in its own thread or task; streams
    count against ``quota`` while they are open."""

    def __init__(self, resolve: Callable[[str], Principal | None], quota: StreamQuota | None = None) -> None:
        self._resolve = resolve
        self.quota = quota

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        token = bearer_of(handler_call_details.invocation_metadata)
        principal = self._resolve(token) if token else None
        if principal is None:
            why = "missing credential" if not token else "unknown credential"
            return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                    f"{why}: send 'authorization: Bearer <token>'")
        quota = self.quota
        if quota is None or not is_streaming(handler):
            return wrap_handler(handler, lambda _ctx: _bound(principal))
        if not quota.reserve(principal):
            return refusing_handler(handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{principal.kind} {principal.id} already holds {quota.per_principal} open "
                                    f"streams on this service (the limit); close one first")

        @contextmanager
        def counted(_ctx: Any) -> Iterator[None]:
            try:
                with _bound(principal):
                    yield
            finally:
                quota.release(principal)

        return wrap_handler(handler, counted)


class BearerClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._md = (AUTH_HEADER, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        md = list(details.metadata or [])
        md.append(self._md)
        return _Details(details.method, details.timeout, md, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: Any, metadata: Any, credentials: Any,
                 wait_for_ready: Any, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
