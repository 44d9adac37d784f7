"""``create_server``: one way every service is served.

Every service runs on ``grpc.aio`` in an event loop of its own (a thread):
streaming methods are async generators, so an open stream holds no thread
and no client can pin the server by opening streams (a per-principal
``StreamQuota`` bounds them too); unary methods are plain functions run in a
thread pool, since they may wait for an IOMMU unit. Each service gets the
standard gRPC health service (so probes and ``grpc_health_probe``-style
clients work), server reflection (so ``pviommu grpc`` and grpcurl can
discover it), the bearer-token interceptor, and graceful shutdown on
SIGTERM/SIGINT (health goes NOT_SERVING first).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pviommu.rpc.auth import Principal, StreamQuota, TokenAuthInterceptor

MAX_MESSAGE = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]
#: streams one principal may hold open on one service
STREAMS_PER_PRINCIPAL = 32

T = TypeVar("T")


@dataclass
class Service:
    """A servicer, its generated ``add_*_to_server`` function and full name."""

    servicer: Any
    add: Callable[[Any, Any], None]
    name: str  # e.g. "pviommu.v1.Hypervisor"


class EventLoopThread:
    """An asyncio loop running in a daemon thread; sync code submits to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Health:
    """The health service, driven from plain (non-async) code."""

    def __init__(self, servicer: health_async.HealthServicer, loop: EventLoopThread) -> None:
        self._servicer = servicer
        self._loop = loop

    def set(self, service: str, status: Any) -> None:
        self._loop.call(self._servicer.set(service, status), 10)

    def enter_graceful_shutdown(self) -> None:
        if self._loop.loop.is_running():
            self._loop.call(self._servicer.enter_graceful_shutdown(), 10)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Health
    names: list[str]
    loop: EventLoopThread
    quota: StreamQuota | None = None
    _stopped: bool = False

    def write_port_file(self, path: str | None) -> None:
        """Publish the bound port (atomically: a reader never sees half a number)."""
        if path:
            tmp = Path(path + ".tmp")
            tmp.write_text(str(self.port))
            tmp.rename(path)

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.health.enter_graceful_shutdown()
            self.loop.call(self.server.stop(grace), grace + 10)
        finally:
            self.loop.stop()

    def wait_for_signal(self, grace: float = 2.0, on_stop: Callable[[], None] | None = None) -> None:
        """Block until SIGTERM/SIGINT, then shut down gracefully."""
        stop = threading.Event()

        def handler(signum: int, frame: Any) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        stop.wait()
        if on_stop is not None:
            on_stop()
        self.stop(grace)


def create_server(
    address: str,
    services: Iterable[Service],
    *,
    resolve: Callable[[str], Principal | None] | None = None,
    max_workers: int = 16,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    streams_per_principal: int = STREAMS_PER_PRINCIPAL,
) -> RunningServer:
    """Bind ``address`` (``host:0`` picks a free port), add the services,
    health and reflection, start, and return the server and its port."""
    services = list(services)
    names = [svc.name for svc in services]
    loop = EventLoopThread(f"grpc-{names[0] if names else 'server'}")
    quota = StreamQuota(streams_per_principal) if resolve is not None else None
    chain: list[grpc.aio.ServerInterceptor] = []
    if resolve is not None:
        chain.append(TokenAuthInterceptor(resolve, quota))
    chain.extend(interceptors)

    async def start() -> tuple[grpc.aio.Server, int, health_async.HealthServicer]:
        server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                                 interceptors=chain, options=SERVER_OPTIONS)
        for svc in services:
            svc.add(svc.servicer, server)
        health_servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        await server.start()
        return server, port, health_servicer

    try:
        server, port, health_servicer = loop.call(start(), 30)
    except BaseException:
        loop.stop()
        raise
    return RunningServer(server, port, Health(health_servicer, loop), names, loop, quota)
