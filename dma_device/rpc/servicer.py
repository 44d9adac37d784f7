"""The ``pviommu.v1.DsaDevice`` service: MMIO, portals and interrupts of one
DSA over gRPC, plus the host-side endpoints of its IOMMU unit.

Glue only: the device model (``dma_device.dsa.device.DsaDevice``) knows no
streams and the IOMMU unit (``pviommu.iommu.unit.IommuUnit``) knows no
gRPC. Who may call what:

* the owning partition (its token's SHA-256 is in the slot's owner record in
  bank 0, written by the hypervisor) may read capabilities, configure WQs,
  send commands, submit descriptors and receive interrupts -- every
  submission is checked against the record, so a session opened under a
  previous owner ends at its next call (``dma_device.ownership``);
* the host (the admin token) may do all that too. Invalidations, ownership
  fences and page responses come through the invalidation queue, not here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from dma_device.counters import device_counters, flat
from dma_device.dsa.device import DsaConfigError, DsaDevice
from dma_device.ownership import Ownership
from pviommu.abi.dsa import DESC_SIZE, Cmd, WqCfg, opcap_words
from pviommu.errors import AuthError, PviommuError
from pviommu.iommu.unit import IommuUnit
from pviommu.log import get_logger
from pviommu.rpc.auth import Principal, require
from pviommu.rpc.feeds import AsyncFeed
from pviommu.rpc.status import grpc_errors, grpc_stream_errors
from pviommu.v1 import common_pb2, dsa_pb2, dsa_pb2_grpc

log = get_logger("dma_device.rpc")


@dataclass
class DeviceInfo:
    """Who this device is (set once it registered with the hypervisor)."""

    name: str
    slot: int = -1
    logical_device_id: int = 0
    #: where guests open shared-memory portals and interrupt pages ("" until serving)
    session_socket: str = ""


def group_of(device: DsaDevice, wq_id: int) -> int:
    """WQ ``w`` is in group ``w % groups``; engine ``e`` in group ``e % groups``."""
    return wq_id % device.config.num_groups


def configure_groups(device: DsaDevice) -> None:
    """The fixed group layout, written once while the device is disabled."""
    cfg = device.config
    for g in range(cfg.num_groups):
        device.configure_group(g, [w for w in range(cfg.num_wqs) if w % cfg.num_groups == g],
                               [e for e in range(cfg.num_engines) if e % cfg.num_groups == g])


def _wq_message(wq_id: int, cfg: WqCfg, enabled: bool, group: int) -> dsa_pb2.WqConfig:
    return dsa_pb2.WqConfig(
        wq_id=wq_id, dedicated=cfg.dedicated, size=cfg.wq_size, threshold=cfg.wq_thresh, priority=cfg.priority,
        bof=cfg.bof, max_xfer_shift=cfg.max_xfer_shift, max_batch_shift=cfg.max_batch_shift, group_id=group,
        enabled=enabled)


class DsaDeviceServicer(dsa_pb2_grpc.DsaDeviceServicer):
    def __init__(self, device: DsaDevice, unit: IommuUnit, info: DeviceInfo, own: Ownership) -> None:
        self.device = device
        self.unit = unit
        self.info = info
        self.own = own

    def _caller(self) -> tuple[Principal, int]:
        """The caller and the epoch its call runs under (refused once ended)."""
        principal = require("partition", "host")
        return principal, self.own.check(principal)

    # -- MMIO view -------------------------------------------------------------
    @grpc_errors
    def GetCapabilities(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> dsa_pb2.DsaCapabilities:
        self._caller()
        d, cfg = self.device, self.device.config
        words = opcap_words(d.opcap)
        opcap = b"".join(w.to_bytes(8, "little") for w in words)
        return dsa_pb2.DsaCapabilities(
            version=d.version, gencap=d.gencap, wqcap=d.wqcap, grpcap=d.grpcap, engcap=d.engcap, opcap=opcap,
            max_transfer_size=1 << cfg.gencap.max_xfer_shift, max_batch_size=1 << cfg.gencap.max_batch_shift,
            num_wqs=cfg.num_wqs, num_engines=cfg.num_engines, num_groups=cfg.num_groups,
            total_wq_size=cfg.total_wq_size, logical_device_id=self.info.logical_device_id, name=self.info.name,
            session_socket=self.info.session_socket)

    @grpc_errors
    def ListWqs(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> dsa_pb2.WqList:
        self._caller()
        out = []
        for wq_id in range(self.device.config.num_wqs):
            cfg = self.device.wqcfg(wq_id)
            out.append(_wq_message(wq_id, cfg, int(cfg.wq_state) == 1, group_of(self.device, wq_id)))
        return dsa_pb2.WqList(wqs=out)

    @grpc_errors
    def ConfigureWq(self, request: dsa_pb2.WqConfig, context: grpc.ServicerContext) -> dsa_pb2.CommandStatus:
        """Write WQCFG, as a driver does while the WQ is disabled. The group
        layout is fixed at start-up (``group_of``); ``group_id`` is ignored."""
        require("partition", "host")
        cfg = WqCfg(wq_size=request.size, wq_thresh=request.threshold, dedicated=request.dedicated,
                    bof=request.bof, priority=request.priority,
                    max_xfer_shift=request.max_xfer_shift or 21, max_batch_shift=request.max_batch_shift or 5)
        try:
            self.device.configure_wq(request.wq_id, cfg)
        except (DsaConfigError, ValueError) as exc:
            return dsa_pb2.CommandStatus(error=int(getattr(exc, "cmd_err", 1)), message=str(exc))
        return dsa_pb2.CommandStatus()

    @grpc_errors
    def Command(self, request: dsa_pb2.DeviceCommand, context: grpc.ServicerContext) -> dsa_pb2.CommandStatus:
        self._caller()
        try:
            cmd = Cmd(request.command)
        except ValueError:
            return dsa_pb2.CommandStatus(error=1, message=f"unknown command {request.command}")
        status = self.device.command(cmd, request.operand)
        err = status & 0xFF
        return dsa_pb2.CommandStatus(cmdsts=status, error=err, message="" if not err else f"CMDSTS error {err:#x}")

    # -- portals ------------------------------------------------------------------
    def _submit(self, sub: dsa_pb2.Submission, epoch: int) -> dsa_pb2.SubmissionAck:
        if len(sub.descriptor) != DESC_SIZE:
            return dsa_pb2.SubmissionAck(tag=sub.tag, accepted=False,
                                         error=f"a descriptor is {DESC_SIZE} bytes, got {len(sub.descriptor)}")
        if not 0 <= sub.wq_id < self.device.config.num_wqs:
            return dsa_pb2.SubmissionAck(tag=sub.tag, accepted=False, error=f"no WQ {sub.wq_id}")
        try:
            accepted = self.device.submit(sub.wq_id, bytes(sub.descriptor), epoch=epoch)
        except (PviommuError, ValueError) as exc:
            return dsa_pb2.SubmissionAck(tag=sub.tag, accepted=False, error=str(exc))
        return dsa_pb2.SubmissionAck(tag=sub.tag, accepted=accepted)

    async def Portal(self, request_iterator: AsyncIterator[dsa_pb2.Submission],
                     context: grpc.aio.ServicerContext[dsa_pb2.Submission, dsa_pb2.SubmissionAck],
                     ) -> AsyncIterator[dsa_pb2.SubmissionAck]:
        """Descriptors in; an ack out for each one not marked ``posted``. Each
        submission is checked against the owner record: the stream ends
        (PERMISSION_DENIED) at the first one after its owner lost the device.
        (The data path is the shared-memory portal; this stays for scripts.)"""
        try:
            principal, _ = self._caller()
        except PviommuError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        async for sub in request_iterator:
            try:
                epoch = self.own.check(principal)
            except AuthError as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            ack = self._submit(sub, epoch)
            if not sub.posted:
                yield ack
            elif ack.error or not ack.accepted:
                # A posted write has no ack to carry the refusal: end the stream.
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"posted submission {sub.tag} to WQ {sub.wq_id} refused: "
                                    f"{ack.error or 'the WQ is shared and did not accept it (post to a dedicated WQ)'}")

    @grpc_errors
    def Submit(self, request: dsa_pb2.SubmitBatch, context: grpc.ServicerContext) -> dsa_pb2.SubmitBatchReply:
        _, epoch = self._caller()
        return dsa_pb2.SubmitBatchReply(acks=[self._submit(s, epoch) for s in request.submissions])

    @grpc_stream_errors
    async def StreamInterrupts(self, request: common_pb2.Empty,
                               context: grpc.aio.ServicerContext[common_pb2.Empty, dsa_pb2.Interrupt],
                               ) -> AsyncIterator[dsa_pb2.Interrupt]:
        """The completion interrupts of this epoch's descriptors; ends when the
        device changes owner. Waiting holds no thread."""
        _, epoch = self._caller()
        feed: AsyncFeed[int] = AsyncFeed()
        self.own.subscribe(epoch, feed)
        try:
            async for handle in feed:
                yield dsa_pb2.Interrupt(int_handle=handle, sequence=self.own.next_sequence())
        finally:
            self.own.unsubscribe(feed)

    @grpc_errors
    def GetCounters(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> dsa_pb2.DeviceCounters:
        self._caller()
        return dsa_pb2.DeviceCounters(counters=flat(device_counters(self.device, self.unit)))


__all__ = ["DeviceInfo", "DsaDeviceServicer", "common_pb2"]
