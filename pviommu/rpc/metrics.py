"""Prometheus metrics for every service.

Two sources, one registry per process:

* ``RpcMetricsInterceptor`` times every RPC (histogram by method and gRPC
  code), so hypercall latency needs no code in the handlers;
* a ``CounterCollector`` exports a service's own counters (the hypervisor's
  statistics, the device's descriptor/byte/IOTLB/walk/fault counters) at
  scrape time, from the objects that already keep them -- nothing is counted
  twice.

``serve_metrics(port)`` starts the HTTP endpoint (``/metrics``) on a thread.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pviommu.rpc.handlers import wrap_handler
from pviommu.rpc.status import ABORTED_WITH

_NAME = re.compile(r"[^a-zA-Z0-9_]")


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Observes the latency of every RPC (streams are timed to their end) by
    method and final status code."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.latency = Histogram(
            "pviommu_rpc_latency_seconds", "gRPC call latency by method and status code",
            ["service", "method", "code"], registry=registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
        )
        self.service = service

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        @contextmanager
        def timed(_ctx: Any) -> Iterator[None]:
            started = time.perf_counter()
            token = ABORTED_WITH.set(None)
            code = "OK"
            try:
                yield
            except BaseException:
                code = "ERROR"
                raise
            finally:
                aborted = ABORTED_WITH.get()
                if aborted is not None:
                    code = aborted.name
                ABORTED_WITH.reset(token)
                self.latency.labels(self.service, method, code).observe(time.perf_counter() - started)

        return wrap_handler(handler, timed)


class CounterCollector(Collector):
    """Exports ``source()`` -- a flat ``{name: value}`` or ``{name: {labels: value}}``
    mapping, where ``labels`` is one value or a tuple matching ``labels[name]`` --
    as counters named ``pviommu_<prefix>_<name>``; names in ``gauges`` become gauges."""

    def __init__(self, prefix: str, source: Callable[[], Mapping[str, Any]],
                 labels: Mapping[str, tuple[str, ...]] | None = None, gauges: frozenset[str] = frozenset()) -> None:
        self.prefix = prefix
        self.source = source
        self.labels = dict(labels or {})
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        for name, value in sorted(self.source().items()):
            metric = f"pviommu_{self.prefix}_{_NAME.sub('_', name)}"
            family_cls = GaugeMetricFamily if name in self.gauges else CounterMetricFamily
            if isinstance(value, Mapping):
                names = self.labels.get(name, ("key",))
                fam = family_cls(metric, f"{self.prefix} {name}", labels=list(names))
                for key, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    values = [str(k) for k in key] if isinstance(key, tuple) else [str(key)]
                    fam.add_metric(values, float(v))
                yield fam
            else:
                fam = family_cls(metric, f"{self.prefix} {name}")
                fam.add_metric([], float(value))
                yield fam


def serve_metrics(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> int:
    """Start ``/metrics`` on ``addr:port`` (0 picks a port); return the port."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)
