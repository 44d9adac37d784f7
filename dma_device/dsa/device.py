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

import collections
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import structlog

from dma_device.dsa.access import BlockOnFault, PageRequestOutcome
from dma_device.dsa.checks import Limits, fail
from dma_device.dsa.ops import OPS, OpContext, execute
from pviommu.abi.dsa import (
    COMP_ALIGN,
    STATUS_MASK,
    VERSION_1_0,
    Cmd,
    CmdErr,
    CompletionRecord,
    DescFlags,
    Descriptor,
    DeviceState,
    DsaStatus,
    GenCap,
    Opcode,
    WqCap,
    WqCfg,
    WqState,
    cmdsts_encode,
    engcap_encode,
    grpcap_encode,
    grpcfg_pack,
    opcap_encode,
    opcap_words,
)
from pviommu.addr import Iova
from pviommu.errors import PviommuError
from pviommu.mem.dma import BlockedDma, DmaAccess, DmaFault

log = structlog.get_logger("dma_device.dsa")

#: Given the PASID a descriptor runs under (None: no PASID), the memory it
#: sees, or None when that address space does not exist (all accesses fault).
MemoryProvider = Callable[[int | None], DmaAccess | None]

#: Every opcode this model implements (TRANSL_FETCH and DIX_GEN are DSA 2.0).
SUPPORTED_OPCODES: frozenset[int] = frozenset(int(op) for op in OPS)

#: Opcodes that move ``xfer_size`` bytes (for the byte counter).
_DATA_OPS = frozenset(SUPPORTED_OPCODES - {Opcode.NOOP, Opcode.BATCH, Opcode.DRAIN})
#: How long an idle engine polls the portal rings before it sleeps (seconds).
POLL_S = 0.002
#: Descriptor flags as plain ints (IntFlag arithmetic costs microseconds per test).
_CRAV, _RCR, _RCI, _BOF = int(DescFlags.CRAV), int(DescFlags.RCR), int(DescFlags.RCI), int(DescFlags.BOF)
_SUCCESS, _PAGE_FAULT_NOBOF, _PAGE_FAULT_IR = (int(DsaStatus.SUCCESS), int(DsaStatus.PAGE_FAULT_NOBOF),
                                               int(DsaStatus.PAGE_FAULT_IR))


class DsaConfigError(PviommuError):
    """A configuration write the device ignores (wrong id, or the WQ/device is
    enabled): raised so a driver bug is loud instead of silently lost."""


class Portal(Enum):
    """The two portals of a WQ (BAR2: +0 unlimited, +0x1000 limited)."""

    UNLIMITED = 0
    LIMITED = 1


@dataclass(frozen=True, slots=True)
class DsaDeviceConfig:
    """The device's fixed capabilities."""

    version: int = VERSION_1_0
    gencap: GenCap = field(default_factory=GenCap)
    num_wqs: int = 8
    total_wq_size: int = 128
    num_groups: int = 4
    num_engines: int = 4
    shared_mode: bool = True
    dedicated_mode: bool = True
    opcodes: frozenset[int] = SUPPORTED_OPCODES
    #: Valid completion interrupt handles: MSI-X vector 0 is misc, 1.. per WQ.
    num_int_handles: int = 9
    #: How long an engine blocks on one page request before giving up.
    page_request_timeout: float = 1.0
    total_rdbufs: int = 96


@dataclass(frozen=True, slots=True)
class SwError:
    """One software-error (SWERR) entry: an error with nowhere else to go."""

    status: int
    wq_id: int
    opcode: int
    pasid: int | None
    fault_addr: int = 0
    invalid_flags: int = 0
    reason: str = ""


class Counters:
    """Device statistics; engines update them concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.descriptors: collections.Counter[int] = collections.Counter()  # by opcode
        self.completions: collections.Counter[int] = collections.Counter()  # by status code
        self.page_request_outcomes: collections.Counter[str] = collections.Counter()
        self.bytes = 0
        self.faults = 0  # every translation fault reported to on_fault
        self.cr_faults = 0  # completion record writes that faulted (CRA_XLAT)
        self.page_requests = 0
        self.interrupts = 0
        self.submitted = 0
        self.retries = 0  # shared WQ refused the descriptor (ENQCMD ZF=1)
        self.dropped_full = 0  # dedicated WQ overflow (MOVDIR64B dropped)
        self.dropped_disabled = 0  # dedicated WQ (or device) not enabled
        self.aborted = 0  # queued descriptors thrown away by an abort/reset
        self.aborted_epoch = 0  # descriptors of a previous owner thrown away (no record)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def count(self, which: str, key: int | str) -> None:
        with self._lock:
            counter: collections.Counter[Any] = getattr(self, which)
            counter[key] += 1

    def completed(self, code: int, nbytes: int) -> None:
        """One completion with ``code`` that moved ``nbytes`` (one lock round-trip)."""
        with self._lock:
            self.completions[code] += 1
            self.bytes += nbytes

    def snapshot(self) -> dict[str, Any]:
        """A plain-dict copy, for RPC answers and metrics."""
        with self._lock:
            return {
                "descriptors": {Opcode(k).name if k in Opcode._value2member_map_ else hex(k): v
                                for k, v in self.descriptors.items()},
                "completions": {DsaStatus(k).name if k in DsaStatus._value2member_map_ else hex(k): v
                                for k, v in self.completions.items()},
                "page_request_outcomes": dict(self.page_request_outcomes),
                **{k: getattr(self, k) for k in (
                    "bytes", "faults", "cr_faults", "page_requests", "interrupts", "submitted",
                    "retries", "dropped_full", "dropped_disabled", "aborted", "aborted_epoch")},
            }


_BLOCKED = BlockedDma()  # an unbound device: every access faults


@dataclass(slots=True)
class _WorkQueue:
    wq_id: int
    cfg: WqCfg = field(default_factory=WqCfg)
    state: WqState = WqState.DISABLED
    queue: collections.deque[tuple[int, Descriptor, int]] = field(default_factory=collections.deque)
    #: seq -> epoch of the descriptors an engine is running
    running: dict[int, int] = field(default_factory=dict)
    limits: tuple[WqCfg, Limits] | None = None  # (the WQCFG they were built from, Limits)


@dataclass(slots=True)
class _Group:
    wqs: set[int] = field(default_factory=set)
    engines: set[int] = field(default_factory=set)


class DsaDevice:
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
    """

    def __init__(self, memory: DmaAccess | MemoryProvider | None = None,
                 config: DsaDeviceConfig | None = None, *,
                 on_interrupt: Callable[[int, int], None] | None = None,
                 on_fault: Callable[[DmaFault], None] | None = None,
                 on_page_request: Callable[[DmaFault], bool | None] | None = None,
                 on_error: Callable[[SwError], None] | None = None) -> None:
        self.config = config or DsaDeviceConfig()
        self.on_interrupt = on_interrupt
        self.on_fault = on_fault
        self.on_page_request = on_page_request
        self.on_error = on_error
        #: the owner's current epoch (None: epochs are not checked)
        self.current_epoch: Callable[[], int] | None = None
        #: portal rings (``dma_device.portals``): ``work_source()`` moves what is posted into the WQs
        #: (called with the device's condition held) and returns how many; ``work_pending()`` is a
        #: lock-free look; ``on_idle(sleeping)`` tells the rings whether producers must ring
        self.work_source: Callable[[], int] | None = None
        self.work_pending: Callable[[], bool] | None = None
        self.on_idle: Callable[[bool], None] | None = None
        self._polling = False
        #: optional fast path for a MEMMOVE outside a batch (set by the device service):
        #: ``(desc, limits, dma) -> (record, record_written)`` once it ran the descriptor to
        #: SUCCESS exactly as the model would (``record_written``: the completion record is in
        #: memory; else the device writes it, if asked for), None to run the model. It counts
        #: nothing of the device's: the device does, as for the model.
        self.fast_memmove: Callable[[Descriptor, Limits, DmaAccess], tuple[CompletionRecord, bool] | None] | None = None
        self.counters = Counters()
        self.swerr: collections.deque[SwError] = collections.deque(maxlen=64)
        self._provider: MemoryProvider | None = None
        self.bind(memory)
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._state = DeviceState.DISABLED
        self._cmdsts = 0
        self._wqs = [_WorkQueue(i) for i in range(self.config.num_wqs)]
        self._groups = [_Group() for _ in range(self.config.num_groups)]
        self._engine_group: dict[int, int] = {}
        self._threads: list[threading.Thread] = []
        self._stop = False

    # ---- binding -------------------------------------------------------------
    def bind(self, memory: DmaAccess | MemoryProvider | None) -> None:
        """Attach the device to its IOMMU view (None: detach, all DMA blocked)."""
        if memory is None:
            self._provider = None
        elif callable(memory):
            self._provider = memory
        else:
            self._provider = lambda _pasid, m=memory: m

    def _memory_for(self, pasid: int | None) -> DmaAccess:
        mem = self._provider(pasid) if self._provider is not None else None
        return mem if mem is not None else _BLOCKED

    # ---- capability registers ----------------------------------------------------
    @property
    def version(self) -> int:
        return self.config.version

    @property
    def gencap(self) -> int:
        return self.config.gencap.encode()

    @property
    def wqcap(self) -> int:
        c = self.config
        return WqCap(c.total_wq_size, c.num_wqs, 0, c.shared_mode, c.dedicated_mode).encode()

    @property
    def grpcap(self) -> int:
        return grpcap_encode(self.config.num_groups, self.config.total_rdbufs)

    @property
    def engcap(self) -> int:
        return engcap_encode(self.config.num_engines)

    @property
    def opcap(self) -> int:
        return _opcap_of(self.config.opcodes)

    def opcap_words(self) -> tuple[int, int, int, int]:
        return opcap_words(self.opcap)

    @property
    def gensts(self) -> DeviceState:
        return self._state

    @property
    def cmdsts(self) -> int:
        return self._cmdsts

    # ---- configuration -------------------------------------------------------------
    def _wq(self, wq_id: int) -> _WorkQueue:
        if not 0 <= wq_id < len(self._wqs):
            raise DsaConfigError(f"no WQ {wq_id} (device has {len(self._wqs)})")
        return self._wqs[wq_id]

    def wqcfg(self, wq_id: int) -> WqCfg:
        """WQCFG as the driver reads it back (with live state and occupancy)."""
        wq = self._wq(wq_id)
        with self._cv:
            return WqCfg(**{**_asdict(wq.cfg), "wq_state": wq.state, "occupancy": len(wq.queue)})

    def configure_wq(self, wq_id: int, cfg: WqCfg) -> None:
        """Write WQCFG (allowed while the WQ is disabled)."""
        wq = self._wq(wq_id)
        with self._cv:
            if wq.state != WqState.DISABLED:
                raise DsaConfigError(f"WQ {wq_id} is enabled: WQCFG is read-only")
            wq.cfg = WqCfg(**{**_asdict(cfg), "wq_state": WqState.DISABLED, "occupancy": 0})

    def configure_group(self, group_id: int, wqs: Iterable[int], engines: Iterable[int]) -> None:
        """Write GRPCFG (allowed while the device is disabled)."""
        if not 0 <= group_id < len(self._groups):
            raise DsaConfigError(f"no group {group_id}")
        wq_set, eng_set = set(wqs), set(engines)
        if any(not 0 <= w < self.config.num_wqs for w in wq_set) or any(
                not 0 <= e < self.config.num_engines for e in eng_set):
            raise DsaConfigError("GRPCFG names a WQ or engine the device does not have")
        with self._cv:
            if self._state != DeviceState.DISABLED:
                raise DsaConfigError("device is enabled: GRPCFG is read-only")
            self._groups[group_id] = _Group(wq_set, eng_set)

    def grpcfg(self, group_id: int) -> bytes:
        g = self._groups[group_id]
        return grpcfg_pack(sum(1 << w for w in g.wqs), sum(1 << e for e in g.engines))

    def wq_occupancy(self, wq_id: int) -> int:
        with self._cv:
            return len(self._wq(wq_id).queue)

    # ---- commands ------------------------------------------------------------------
    def command(self, cmd: Cmd, operand: int = 0) -> int:
        """Write CMD and return CMDSTS (the model completes commands synchronously)."""
        handlers: dict[Cmd, Callable[[int], CmdErr | tuple[CmdErr, int]]] = {
            Cmd.ENABLE_DEVICE: lambda _: self.enable_device(),
            Cmd.DISABLE_DEVICE: lambda _: self.disable_device(),
            Cmd.DRAIN_ALL: lambda _: self.drain_all(),
            Cmd.ABORT_ALL: lambda _: self.abort_all(),
            Cmd.RESET_DEVICE: lambda _: self.reset_device(),
            Cmd.ENABLE_WQ: self.enable_wq,
            Cmd.DISABLE_WQ: self.disable_wq,
            Cmd.DRAIN_WQ: self.drain_wq,
            Cmd.ABORT_WQ: self.abort_wq,
            Cmd.RESET_WQ: self.reset_wq,
            Cmd.REQUEST_INT_HANDLE: self.request_int_handle,
            Cmd.RELEASE_INT_HANDLE: lambda _: CmdErr.SUCCESS,
        }
        handler = handlers.get(cmd)
        out = handler(operand) if handler is not None else CmdErr.INVAL_CMD
        err, result = out if isinstance(out, tuple) else (out, 0)
        self._cmdsts = cmdsts_encode(err, result)
        log.info("dsa.command", cmd=Cmd(cmd).name, operand=operand, err=CmdErr(err).name)
        return self._cmdsts

    def enable_device(self) -> CmdErr:
        with self._cv:
            if self._state != DeviceState.DISABLED:
                return CmdErr.DEV_ENABLED
            owner: dict[int, int] = {}
            engine_group: dict[int, int] = {}
            for gid, g in enumerate(self._groups):
                for w in g.wqs:
                    if w in owner:
                        return CmdErr.GRP_CONFIG  # a WQ in two groups
                    owner[w] = gid
                for e in g.engines:
                    if e in engine_group:
                        return CmdErr.GRP_CONFIG2  # an engine in two groups
                    engine_group[e] = gid
            if sum(wq.cfg.wq_size for wq in self._wqs) > self.config.total_wq_size:
                return CmdErr.WQ_SIZE_ERANGE
            self._engine_group = engine_group
            self._state = DeviceState.ENABLED
            self._stop = False
            self._threads = [threading.Thread(target=self._engine_loop, args=(e,),
                                              name=f"dsa-engine-{e}", daemon=True)
                             for e in sorted(engine_group)]
        for t in self._threads:
            t.start()
        return CmdErr.SUCCESS

    def disable_device(self) -> CmdErr:
        """Drain and disable every WQ, then stop the engines."""
        with self._cv:
            if self._state == DeviceState.DISABLED:
                return CmdErr.DIS_DEV_EN
            for wq in self._wqs:
                if wq.state == WqState.ENABLED:
                    wq.state = WqState.BUSY  # no new descriptors while draining
            self._cv.wait_for(lambda: all(not wq.queue and not wq.running for wq in self._wqs))
            for wq in self._wqs:
                wq.state = WqState.DISABLED
            self._stop = True
            self._state = DeviceState.DISABLED
            self._cv.notify_all()
            threads, self._threads = self._threads, []
        for t in threads:
            t.join()
        return CmdErr.SUCCESS

    def drain_all(self) -> CmdErr:
        with self._cv:
            self._cv.wait_for(lambda: all(not wq.queue and not wq.running for wq in self._wqs))
        return CmdErr.SUCCESS

    def abort_all(self) -> CmdErr:
        for wq in self._wqs:
            self._abort(wq)
        return CmdErr.SUCCESS

    def reset_device(self) -> CmdErr:
        """Abort everything, disable, and clear all configuration."""
        self.abort_all()
        if self._state != DeviceState.DISABLED:
            self.disable_device()
        with self._cv:
            for wq in self._wqs:
                wq.cfg = WqCfg()
            self._groups = [_Group() for _ in range(self.config.num_groups)]
        return CmdErr.SUCCESS

    def enable_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        gc = self.config.gencap
        with self._cv:
            wq = self._wqs[wq_id]
            cfg = wq.cfg
            if self._state != DeviceState.ENABLED:
                return CmdErr.DEV_NOTEN
            if wq.state != WqState.DISABLED:
                return CmdErr.WQ_ENABLED
            if cfg.wq_size == 0 or cfg.wq_thresh > cfg.wq_size:
                return CmdErr.WQ_SIZE
            if (cfg.dedicated and not self.config.dedicated_mode) or (
                    not cfg.dedicated and not self.config.shared_mode):
                return CmdErr.WQ_MODE
            if cfg.bof and not gc.block_on_fault:
                return CmdErr.BOF_EN
            if cfg.max_xfer_shift > gc.max_xfer_shift:
                return CmdErr.MAX_XFER_SIZE
            if cfg.max_batch_shift > gc.max_batch_shift:
                return CmdErr.MAX_BATCH_SIZE
            gid = next((g for g, grp in enumerate(self._groups) if wq_id in grp.wqs), None)
            if gid is None or not self._groups[gid].engines:
                return CmdErr.GRP_CONFIG  # a WQ no engine serves would never complete
            wq.state = WqState.ENABLED
        return CmdErr.SUCCESS

    def disable_wq(self, wq_id: int) -> CmdErr:
        """Stop accepting, let queued descriptors complete, then disable."""
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        with self._cv:
            wq = self._wqs[wq_id]
            if wq.state == WqState.DISABLED:
                return CmdErr.WQ_NOT_EN
            wq.state = WqState.BUSY
            self._cv.wait_for(lambda: not wq.queue and not wq.running)
            wq.state = WqState.DISABLED
        return CmdErr.SUCCESS

    def drain_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        wq = self._wqs[wq_id]
        with self._cv:
            self._cv.wait_for(lambda: not wq.queue and not wq.running)
        return CmdErr.SUCCESS

    def abort_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        self._abort(self._wqs[wq_id])
        return CmdErr.SUCCESS

    def reset_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        wq = self._wqs[wq_id]
        self._abort(wq)
        with self._cv:
            wq.state = WqState.DISABLED
            wq.cfg = WqCfg()
        return CmdErr.SUCCESS

    def request_int_handle(self, index: int) -> tuple[CmdErr, int]:
        """Interrupt handles are the MSI-X vector indices themselves."""
        if not 0 <= index < self.config.num_int_handles:
            return CmdErr.INVAL_INT_IDX, 0
        return CmdErr.SUCCESS, index

    def _abort(self, wq: _WorkQueue) -> None:
        """Throw away queued descriptors (no record: the driver marks them
        aborted) and wait for the running ones."""
        with self._cv:
            dropped = len(wq.queue)
            wq.queue.clear()
            self._cv.wait_for(lambda: not wq.running)
            self._cv.notify_all()
        self.counters.add("aborted", dropped)

    def close(self) -> None:
        """Stop the engines (tests and service shutdown)."""
        if self._state != DeviceState.DISABLED:
            self.abort_all()
            self.disable_device()

    # ---- portal --------------------------------------------------------------------
    def submit(self, wq_id: int, desc: bytes | bytearray | memoryview | Descriptor,
               portal: Portal = Portal.UNLIMITED, *, epoch: int = 0) -> bool:
        """Write one 64-byte descriptor to WQ ``wq_id``'s portal.

        Returns False only for a shared WQ that did not accept it (ENQCMD
        ZF=1: disabled or full; retry later). A dedicated WQ always returns
        True (MOVDIR64B is posted); overflow and disabled-WQ drops are counted."""
        d = desc if isinstance(desc, Descriptor) else Descriptor.unpack(desc)
        wq = self._wq(wq_id)
        with self._cv:
            enabled = wq.state == WqState.ENABLED and self._state == DeviceState.ENABLED
            limit = wq.cfg.wq_thresh if portal is Portal.LIMITED else wq.cfg.wq_size
            full = len(wq.queue) >= limit
            if enabled and not full:
                wq.queue.append((next(self._seq), d, epoch))
                self._cv.notify_all()
                accepted = True
            else:
                accepted = False
        if accepted:
            self.counters.add("submitted")
            return True
        if not wq.cfg.dedicated:
            self.counters.add("retries")
            return False
        reason = "dropped_full" if enabled else "dropped_disabled"
        self.counters.add(reason)
        self._sw_error(SwError(int(DsaStatus.NONE), wq_id, d.opcode, None, reason=reason))
        return True

    def execute_now(self, wq_id: int, desc: bytes | bytearray | memoryview | Descriptor,
                    epoch: int = 0) -> CompletionRecord:
        """Run one descriptor of WQ ``wq_id`` on the caller's thread, as an
        engine would (same checks, ops, record write), without queueing it:
        the engine's own cost without the thread hand-off (benchmarks)."""
        d = desc if isinstance(desc, Descriptor) else Descriptor.unpack(desc)
        wq = self._wq(wq_id)
        pasid = (wq.cfg.pasid if wq.cfg.pasid_en else None) if wq.cfg.dedicated else d.pasid
        return self._run(d, wq, self._memory_for(pasid), next(self._seq), pasid, epoch, in_batch=False)

    def end_epochs_except(self, epoch: int, timeout: float = 10.0) -> int:
        """An owner change: drop every queued descriptor of another epoch (no
        record: its owner is gone) and wait up to ``timeout`` for the running
        ones of other epochs to finish (their translations fault from now
        on). Returns the number dropped."""
        with self._cv:
            dropped = 0
            for wq in self._wqs:
                keep = [item for item in wq.queue if item[2] == epoch]
                dropped += len(wq.queue) - len(keep)
                wq.queue = collections.deque(keep)
            self._cv.notify_all()
            done = self._cv.wait_for(lambda: all(e == epoch for wq in self._wqs for e in wq.running.values()),
                                     timeout)
        if dropped:
            self.counters.add("aborted_epoch", dropped)
        if not done:
            log.warning("dsa.fence_running_left", epoch=epoch)
        return dropped

    # ---- engines -------------------------------------------------------------------
    def _pick(self, engine: int) -> tuple[_WorkQueue, int, Descriptor, int] | None:
        gid = self._engine_group.get(engine)
        if gid is None:
            return None
        best: _WorkQueue | None = None
        for w in self._groups[gid].wqs:
            wq = self._wqs[w]
            if not wq.queue or wq.state == WqState.DISABLED:
                continue
            if best is None or (wq.cfg.priority, -wq.queue[0][0]) > (best.cfg.priority,
                                                                    -best.queue[0][0]):
                best = wq
        if best is None:
            return None
        seq, d, epoch = best.queue.popleft()
        best.running[seq] = epoch
        return best, seq, d, epoch

    def kick(self) -> None:
        """Work arrived from outside (a portal doorbell while every engine
        slept): pull it into the WQs and wake the engines."""
        with self._cv:
            if self.work_source is not None and self.work_source():
                self._cv.notify_all()

    def _next(self, engine: int, poll: bool) -> tuple[_WorkQueue, int, Descriptor, int] | None:
        """The next descriptor for ``engine`` (None: stop). Portal rings are
        pulled here, by the engines themselves: an engine that just ran one
        and finds nothing polls them (one engine at a time) for ``POLL_S``
        before it sleeps, so a descriptor posted meanwhile runs without any
        hand-off between threads; a sleeping device tells the rings
        (``on_idle``), whose producers then ring its doorbell."""
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return None
                    item = self._pick(engine)
                    if item is None and self.work_source is not None and self.work_source():
                        item = self._pick(engine)
                    if item is not None:
                        return item
                    if poll and self.work_pending is not None and not self._polling:
                        self._polling = True
                        poll = False
                        break
                    if self.on_idle is not None and not self._polling:
                        self.on_idle(True)
                        if self.work_source is not None and self.work_source():  # posted before it saw us sleep
                            continue
                    self._cv.wait(0.5)
                    if self.on_idle is not None and not self._polling:
                        self.on_idle(False)
            try:
                pending = self.work_pending
                end = time.monotonic() + POLL_S
                while pending is not None and not pending() and time.monotonic() < end and not self._stop:
                    os.sched_yield()  # time.sleep(0) would cost the timer slack (50-100 us)
            finally:
                with self._cv:
                    self._polling = False

    def _engine_loop(self, engine: int) -> None:
        ran = False
        while True:
            item = self._next(engine, poll=ran)
            if item is None:
                return
            ran = True
            wq, seq, d, epoch = item
            try:
                current = self.current_epoch
                if current is not None and current() != epoch:  # its owner is gone: no record, no DMA
                    self.counters.add("aborted_epoch")
                    continue
                pasid = (wq.cfg.pasid if wq.cfg.pasid_en else None) if wq.cfg.dedicated else d.pasid
                self._run(d, wq, self._memory_for(pasid), seq, pasid, epoch, in_batch=False)
            except Exception:  # a model bug must not kill the engine
                log.exception("dsa.engine_error", engine=engine, wq=wq.wq_id)
            finally:
                with self._cv:
                    wq.running.pop(seq, None)
                    self._cv.notify_all()

    def _limits(self, wq: _WorkQueue) -> Limits:
        """What ``wq`` allows a descriptor; built once per WQCFG (a new WQCFG
        is a new object: ``configure_wq`` and ``reset_wq`` replace it)."""
        cached = wq.limits
        if cached is not None and cached[0] is wq.cfg:
            return cached[1]
        gc = self.config.gencap
        limits = Limits(
            gencap=gc,
            max_xfer=min(1 << wq.cfg.max_xfer_shift, gc.max_xfer_size),
            max_batch=min(1 << wq.cfg.max_batch_shift, gc.max_batch_size),
            wq_bof=wq.cfg.bof,
            shared=not wq.cfg.dedicated,
            wq_priv=wq.cfg.priv,
            num_int_handles=self.config.num_int_handles,
            opcap=self.opcap,
        )
        wq.limits = (wq.cfg, limits)
        return limits

    def _wait_drain(self, wq: _WorkQueue, seq: int) -> None:
        """DRAIN: every descriptor submitted to this WQ before ``seq`` is done.
        (Earlier ones were dequeued first, so they are running or finished.)"""
        with self._cv:
            self._cv.wait_for(lambda: not any(s < seq for s in wq.running))

    def _run(self, d: Descriptor, wq: _WorkQueue, dma: DmaAccess, seq: int, pasid: int | None, epoch: int,
             *, in_batch: bool) -> CompletionRecord:
        """Execute one descriptor (or batch entry) and complete it."""
        fast = self.fast_memmove
        if fast is not None and not in_batch and d.opcode == Opcode.MEMMOVE:
            done = fast(d, self._limits(wq), dma)
            if done is not None:  # completed as the model completes it: its counters and interrupt
                rec, written = done
                if not written:
                    self.counters.count("descriptors", d.opcode)
                    self._complete(d, rec, dma, wq, pasid, epoch)  # writes the record if one is asked for
                    return rec
                c, rci = self.counters, d.flags & _RCI
                with c._lock:  # what count() and _complete() count, in one round trip
                    c.descriptors[d.opcode] += 1
                    c.completions[rec.status & STATUS_MASK] += 1
                    c.bytes += d.xfer_size
                    if rci:
                        c.interrupts += 1
                if rci and self.on_interrupt is not None:
                    self.on_interrupt(d.int_handle, epoch)
                return rec
        self.counters.count("descriptors", d.opcode)
        if d.flags & _CRAV and d.completion_addr % COMP_ALIGN:
            # idxd.h: DSA_COMP_CRA_ALIGN -- no record can be written: SWERR only.
            rec = fail(DsaStatus.CRA_ALIGN)
            self.counters.count("completions", rec.code)
            self._sw_error(SwError(rec.code, wq.wq_id, d.opcode, pasid, d.completion_addr))
            return rec
        def report(fault: DmaFault) -> None:
            self._report_fault(fault, epoch)

        mem = BlockOnFault(dma, block_on_fault=bool(d.flags & _BOF) and wq.cfg.bof,
                           page_request=lambda fault: self._page_request(replace(fault, epoch=epoch)),
                           on_fault=report)
        ctx = OpContext(
            mem=mem,
            limits=self._limits(wq),
            run_batch_entry=lambda sub: self._run(sub, wq, dma, seq, pasid, epoch, in_batch=True),
            drain=(lambda: None) if in_batch else (lambda: self._wait_drain(wq, seq)),
        )
        try:
            rec = execute(d, ctx, in_batch=in_batch)
        except Exception:
            log.exception("dsa.op_error", opcode=d.opcode)
            rec = fail(DsaStatus.HW_ERR1)
        self._complete(d, rec, dma, wq, pasid, epoch)
        return rec

    def _complete(self, d: Descriptor, rec: CompletionRecord, dma: DmaAccess, wq: _WorkQueue,
                  pasid: int | None, epoch: int) -> None:
        code = rec.status & STATUS_MASK
        if code == _SUCCESS:
            self.counters.completed(code, d.xfer_size if d.opcode in _DATA_OPS else 0)
        elif code == _PAGE_FAULT_NOBOF or code == _PAGE_FAULT_IR:
            self.counters.completed(code, rec.bytes_completed)
        else:
            self.counters.completed(code, 0)
        if not d.flags & _CRAV:
            if code != _SUCCESS:
                self._sw_error(SwError(code, wq.wq_id, d.opcode, pasid, rec.fault_addr,
                                       rec.invalid_flags if code == DsaStatus.INVALID_FLAGS else 0))
        elif d.flags & _RCR or code != _SUCCESS:
            res = dma.write_record(Iova(d.completion_addr), rec.pack())  # status byte last
            if res.fault is not None:
                self.counters.add("cr_faults")
                self._report_fault(res.fault, epoch)
                self._sw_error(SwError(int(DsaStatus.CRA_XLAT), wq.wq_id, d.opcode, pasid,
                                       int(res.fault.iova)))
                return
        if d.flags & _RCI and code != DsaStatus.INT_HANDLE_INVAL:
            self.counters.add("interrupts")
            if self.on_interrupt is not None:
                self.on_interrupt(d.int_handle, epoch)

    # ---- faults and errors -----------------------------------------------------------
    def _report_fault(self, fault: DmaFault, epoch: int) -> None:
        self.counters.add("faults")
        log.debug("dsa.fault", iova=hex(fault.iova), write=fault.write, reason=fault.reason_name)
        if self.on_fault is not None:
            self.on_fault(replace(fault, epoch=epoch))

    def _page_request(self, fault: DmaFault) -> PageRequestOutcome:
        """Send a page request and wait up to ``page_request_timeout``."""
        self.counters.add("page_requests")
        hook = self.on_page_request
        outcome = PageRequestOutcome.TIMEOUT
        if hook is not None:
            box: list[bool | None] = []
            answered = threading.Event()

            def call() -> None:
                try:
                    box.append(hook(fault))
                except Exception:
                    log.exception("dsa.page_request_hook_error")
                    box.append(False)
                finally:
                    answered.set()

            threading.Thread(target=call, name="dsa-prq", daemon=True).start()
            if answered.wait(self.config.page_request_timeout) and box:
                if box[0] is True:
                    outcome = PageRequestOutcome.RESOLVED
                elif box[0] is False:
                    outcome = PageRequestOutcome.REFUSED
        self.counters.count("page_request_outcomes", outcome.value)
        return outcome

    def _sw_error(self, err: SwError) -> None:
        self.swerr.append(err)
        log.info("dsa.swerr", status=hex(err.status & STATUS_MASK), wq=err.wq_id, reason=err.reason)
        if self.on_error is not None:
            self.on_error(err)


@functools.lru_cache(maxsize=8)
def _opcap_of(opcodes: frozenset[int]) -> int:
    """OPCAP of a (frozen) opcode set, encoded once: it is read per descriptor."""
    return opcap_encode(opcodes)


def _asdict(cfg: WqCfg) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in WqCfg.__slots__}
