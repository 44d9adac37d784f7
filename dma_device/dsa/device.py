"""``DsaDevice``: registers, groups, engines, work queues, commands, portals.

Model (reference/dsa-dmatest.md section 4):

* Capability registers (VERSION, GENCAP, WQCAP, GRPCAP, ENGCAP, OPCAP) come
  from a ``DsaDeviceConfig``; configuration (WQCFG per WQ, GRPCFG per group) is
  written by the driver while the device (groups) or the WQ (WQCFG) is
  disabled, then ENABLE_DEVICE / ENABLE_WQ commands check it and answer in
  CMDSTS with ``enum idxd_cmdsts_err`` codes.
* ``submit(wq_id, desc)`` is the portal. Dedicated WQ = MOVDIR64B: a posted
  write with no feedback, always "accepted"; the submitter must keep at most
  ``wq_size`` descriptors queued. A descriptor arriving at a full or disabled
  dedicated WQ is dropped as real hardware drops it: counted
  (``dropped_full`` / ``dropped_disabled``) and logged as a software error
  (SWERR), and nothing is written to memory. Shared WQ = ENQCMD(S):
  non-posted; False (ZF=1) when the WQ is disabled or full (occupancy >=
  size on the unlimited portal, >= threshold on the limited one): retry.
* One thread per engine of an enabled group pulls from that group's enabled
  WQs, the highest WQ priority first and the oldest descriptor among equals.
  Several engines share a group's WQs, so completions may be out of order
  (DMA_COMPLETION_NO_ORDER); DRAIN restores order.
* Completion: the record (32-byte aligned, else CRA_ALIGN reported in SWERR
  since no record can be written) is written through the device's DmaAccess,
  bytes 1..31 first and the status byte last, so a poller that sees a nonzero
  status sees the whole record. A record write that faults is CRA_XLAT:
  counted (``cr_faults``), reported to ``on_fault`` and SWERR, no interrupt.
  With RCI the interrupt (``on_interrupt(int_handle, epoch)``) follows the record.
* Ownership epochs: every submission carries the epoch of the owner it
  came from (``submit(..., epoch=)``); with a ``current_epoch`` hook, an
  engine throws away (counted as ``aborted_epoch``, no record) a descriptor
  whose epoch is no longer current, and ``end_epochs_except`` drops the
  queued ones of other epochs and waits for the running ones, so nothing of
  a previous owner runs once the device confirmed the change. Faults, page
  requests and interrupts carry the epoch of their descriptor.
* Memory: the device is bound to a ``DmaAccess`` or a provider of one per
  PASID. An unbound device (not attached to any IOMMU domain) sees every
  address as blocked: each access faults, including the completion record
  write, so descriptors complete nowhere and every fault is reported to
  ``on_fault`` -- what a device behind an IOMMU with no domain does.
"""

from __future__ import annotations

from dma_device.dsa.registers import Registers
from dma_device.dsa.state import (
    POLL_S,
    SUPPORTED_OPCODES,
    Counters,
    DsaConfigError,
    DsaDeviceConfig,
    MemoryProvider,
    Portal,
    SwError,
    _opcap_of,
)


class DsaDevice(Registers):
    """An Intel DSA device model.

    Hooks (assign at construction or later; all run on engine threads):

    * ``on_interrupt(int_handle, epoch)`` after a record requested with RCI is written;
    * ``on_fault(DmaFault)`` for every translation fault (data, descriptor list,
      completion record; ``DmaFault.epoch`` is the descriptor's), so the
      hypervisor can queue it for the guest;
    * ``on_page_request(DmaFault) -> bool | None`` when a descriptor with BOF
      (on a WQ with WQCFG.bof) faults: True = page is now present, retry;
      False = refused (completes with PAGE_FAULT_IR 0x04); None, an
      exception-free timeout past ``page_request_timeout``, or no hook = no
      answer (completes with PAGE_FAULT_NOBOF 0x03 and partial completion);
      an exception counts as refused;
    * ``on_error(SwError)`` for software errors (SWERR).

    Built in layers over one shared state (``DsaCore``, dma_device/dsa/state.py): the
    portals and the engines' pick (queues.py), the engines (engine.py), and the registers
    and commands (registers.py).
    """


__all__ = ["POLL_S", "SUPPORTED_OPCODES", "Counters", "DsaConfigError", "DsaDevice", "DsaDeviceConfig",
           "MemoryProvider", "Portal", "SwError", "_opcap_of"]
