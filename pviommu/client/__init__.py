"""The public Python client of pviommu: drive a virtual host from a script or a test.

    from pviommu.client import System

    with System.start_local(guests=2, devices=1) as system:
        g0, g1 = system.guests
        dev = g0.devices[0]
        src = dev.alloc_map(4096, "to-device", fill=0x5A)
        dst = dev.alloc_map(4096, "from-device")
        assert dev.memmove(dst, src).ok and dst.read() == src.read()

It only speaks gRPC to the services (``System.start_local`` starts them as
processes by command line); it imports no service package. Objects:
``System`` (``admin``, ``guests``), ``Admin`` (partitions, devices,
assignment, domains, stats, faults, dumps and explained walks),
``Hypervisor`` (a partition's typed and raw hypercalls), ``Guest`` (memory,
mappings, domains, flushes, faults, dmatest), ``Device`` (named DSA
operations returning decoded ``Completion`` records). Every error is a
``ClientError`` carrying the gRPC code and the HV or DSA status by name.
docs/api.md has the guide.
"""

from __future__ import annotations

from pviommu.abi.dsa import DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.abi.hv import DeviceDomainType, IommuCap
from pviommu.abi.hv_status import HvStatus
from pviommu.client.admin import Admin, Explanation, TableDump
from pviommu.client.device import Device
from pviommu.client.dsa import OPERATIONS, Completion, build
from pviommu.client.endpoints import Endpoints
from pviommu.client.errors import ClientError, DsaError, HvCallError, RpcError, StartError, Unreachable
from pviommu.client.guest import Guest
from pviommu.client.hypervisor import HvCallResult, Hypervisor
from pviommu.client.memory import Buffer, Mapping
from pviommu.client.system import System
from pviommu.client.types import (
    AdminDomain,
    Capabilities,
    DeviceInfo,
    Direction,
    DmatestResult,
    DomainInfo,
    Fault,
    GuestFault,
    HvResult,
    IommuInfo,
    NewPartition,
    PartitionInfo,
    UnmapResult,
)

__all__ = [
    "OPERATIONS",
    "Admin",
    "AdminDomain",
    "Buffer",
    "Capabilities",
    "ClientError",
    "Completion",
    "DescFlags",
    "Descriptor",
    "Device",
    "DeviceDomainType",
    "DeviceInfo",
    "Direction",
    "DmatestResult",
    "DomainInfo",
    "DsaError",
    "DsaStatus",
    "Endpoints",
    "Explanation",
    "Fault",
    "Guest",
    "GuestFault",
    "HvCallError",
    "HvCallResult",
    "HvResult",
    "HvStatus",
    "Hypervisor",
    "IommuCap",
    "IommuInfo",
    "Mapping",
    "NewPartition",
    "Opcode",
    "PartitionInfo",
    "RpcError",
    "StartError",
    "System",
    "TableDump",
    "UnmapResult",
    "Unreachable",
    "build",
]
