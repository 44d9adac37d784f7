"""The hypervisor's side of the wire to each device's IOMMU unit.

Invalidations are synchronous RPCs with a deadline: the flush hypercall
returns only after every unit that may cache the domain acknowledged. A unit
whose process is gone (UNAVAILABLE) caches nothing and is dropped; a unit
that does not answer in time makes the flush fail with HV_STATUS_TIME_OUT.
"""

from __future__ import annotations

import threading

import grpc

from hypervisor_svc.core.model import Device
from pviommu.errors import DeviceUnavailable
from pviommu.iommu import invq
from pviommu.iommu.invq import QueueHost
from pviommu.rpc.auth import token_digest
from pviommu.rpc.client import connect
from pviommu.v1 import dsa_pb2, dsa_pb2_grpc

SCOPES = {
    "global": dsa_pb2.IommuInvalidation.GLOBAL,
    "domain": dsa_pb2.IommuInvalidation.DOMAIN,
    "pages": dsa_pb2.IommuInvalidation.PAGES,
    "context": dsa_pb2.IommuInvalidation.CONTEXT,
}


class DeviceLost(Exception):
    """The device's process is gone (its unit holds no translations)."""


class GrpcInvalidator:
    """Invalidations go through the unit's queue in shared memory when the
    unit serves one (``pviommu.iommu.invq``: descriptors, a doorbell and an
    invalidation-wait status write, like VT-d queued invalidation), else
    through the device's ``Invalidate`` RPC. Assignment and page responses
    are always RPCs."""

    def __init__(self, admin_token: str, timeout_s: float) -> None:
        self._token = admin_token
        self._timeout = timeout_s
        self.queues: QueueHost | None = None
        self._stubs: dict[tuple[str, int], dsa_pb2_grpc.DsaDeviceStub] = {}
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, device: Device) -> dsa_pb2_grpc.DsaDeviceStub:
        key = (device.control_address, device.slot)
        with self._lock:
            stub = self._stubs.get(key)
            if stub is None:
                channel = connect(device.control_address, self._token, ready_timeout=None)
                self._channels[key] = channel
                stub = self._stubs[key] = dsa_pb2_grpc.DsaDeviceStub(channel)
            return stub

    def _call(self, device: Device, what: str, fn: object, request: object) -> None:
        try:
            reply = fn(request, timeout=self._timeout)  # type: ignore[operator]
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeviceUnavailable(
                    f"device {device.name} ({device.logical_device_id:#x}) did not acknowledge {what} "
                    f"within {self._timeout}s") from exc
            raise DeviceLost(f"device {device.name}: {code.name}: {exc.details()}") from exc  # type: ignore[attr-defined]
        if reply.error:
            raise DeviceLost(f"device {device.name} refused {what}: {reply.message}")

    def use_queues(self, queues: QueueHost) -> None:
        self.queues = queues

    def invalidate(self, device: Device, scope: str, tag: int = 0, address: int = 0, mask: int = 0) -> None:
        writer = self.queues.writer(device.slot) if self.queues is not None else None
        if writer is not None:
            if scope == "global":
                desc = invq.iotlb_desc(invq.G_GLOBAL)
            elif scope == "domain":
                desc = invq.iotlb_desc(invq.G_DOMAIN, tag)
            elif scope == "pages":
                desc = invq.iotlb_desc(invq.G_PAGE, tag, address, mask)
            else:
                desc = invq.context_desc(device.slot)
            try:
                writer.submit([desc], self._timeout)
            except invq.QueueUnavailable as exc:
                raise DeviceLost(str(exc)) from exc
            return
        req = dsa_pb2.IommuInvalidation(scope=SCOPES[scope], tag=tag, address=address, address_mask=mask,
                                        slot=device.slot)
        self._call(device, f"{scope} invalidation", self._stub(device).Invalidate, req)

    def assign(self, device: Device, partition_id: int, token: str | None) -> None:
        req = dsa_pb2.AssignRequest(partition_id=partition_id, slot=device.slot,
                                    token_sha256=token_digest(token) if token else b"")
        self._call(device, "assignment", self._stub(device).Assign, req)

    def resolve_page_request(self, device: Device, request_id: int, success: bool) -> None:
        req = dsa_pb2.PageResponse(request_id=request_id, success=success)
        self._call(device, "page response", self._stub(device).ResolvePageRequest, req)

    def close(self) -> None:
        if self.queues is not None:
            self.queues.close()
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()
