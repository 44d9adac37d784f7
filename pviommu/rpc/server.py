"""``create_server``: one way every service is served.

Each service gets the standard gRPC health service (so probes and
``grpc_health_probe``-style clients work), server reflection (so
``pviommu grpc`` and grpcurl can discover it), the bearer-token interceptor,
and graceful shutdown on SIGTERM/SIGINT (health goes NOT_SERVING first).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pviommu.rpc.auth import Principal, TokenAuthInterceptor

MAX_MESSAGE = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]


@dataclass
class Service:
    """A servicer, its generated ``add_*_to_server`` function and full name."""

    servicer: Any
    add: Callable[[Any, grpc.Server], None]
    name: str  # e.g. "pviommu.v1.Hypervisor"


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    names: list[str]

    def write_port_file(self, path: str | None) -> None:
        """Publish the bound port (atomically: a reader never sees half a number)."""
        if path:
            tmp = Path(path + ".tmp")
            tmp.write_text(str(self.port))
            tmp.rename(path)

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()

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
    interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> RunningServer:
    """Bind ``address`` (``host:0`` picks a free port), add the services,
    health and reflection, start, and return the server and its port."""
    chain: list[grpc.ServerInterceptor] = []
    if resolve is not None:
        chain.append(TokenAuthInterceptor(resolve))
    chain.extend(interceptors)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=chain,
        options=SERVER_OPTIONS,
    )
    services = list(services)
    for svc in services:
        svc.add(svc.servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [svc.name for svc in services]
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    server.start()
    return RunningServer(server, port, health_servicer, names)
