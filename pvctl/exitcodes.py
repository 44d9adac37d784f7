"""Exit codes of the command line: the shared table (``pviommu.exitcodes``)
plus the gRPC mapping, which needs grpc."""

from __future__ import annotations

import grpc

from pviommu.exitcodes import (
    CANNOT_BIND,
    CONNECT,
    FAILED,
    HEALTH_RPC_FAILED,
    NO_IOMMU,
    OK,
    RPC_BASE,
    SIGNAL_BASE,
    UNHEALTHY,
    USAGE,
    for_signal,
)

__all__ = ["CANNOT_BIND", "CONNECT", "FAILED", "HEALTH_RPC_FAILED", "NO_IOMMU", "OK", "RPC_BASE", "SIGNAL_BASE",
           "UNHEALTHY", "USAGE", "for_rpc", "for_signal"]


def for_rpc(code: grpc.StatusCode | None) -> int:
    """grpcurl's convention: 64 + the numeric gRPC code (UNAVAILABLE -> 78)."""
    if code is None:
        return FAILED
    value: int = code.value[0]
    return RPC_BASE + value
