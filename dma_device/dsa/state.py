"""The DSA model's records and the state every part of the device shares.

``DsaCore`` holds the configuration, counters, hooks, work queues, groups and
the condition the engines and the portals synchronise on; the parts built on
it (``queues``, ``engine``, ``registers``) only add behaviour, so
``DsaDevice`` is one object with one lock, as before the split.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import structlog

from dma_device.dsa.checks import Limits
from dma_device.dsa.ops import OPS
from pviommu.abi.dsa import (
    STATUS_MASK,
    VERSION_1_0,
    CmdErr,
    CompletionRecord,
    DescFlags,
    Descriptor,
    DeviceState,
    DsaStatus,
    GenCap,
    Opcode,
    WqCfg,
    WqState,
    opcap_encode,
)
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
    enabled): raised so a driver bug is loud instead of silently lost.
    ``cmd_err`` is the CMDSTS code a command would answer for the same problem."""

    cmd_err: CmdErr = CmdErr.INVAL_CMD

    def __init__(self, message: str, cmd_err: CmdErr | None = None) -> None:
        super().__init__(message)
        if cmd_err is not None:
            self.cmd_err = cmd_err


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

    def snapshot(self) -> dict[str, int | dict[str, int]]:
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


class DsaCore:
    """What every part of ``DsaDevice`` shares (its docstring lists the hooks)."""

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

    @property
    def opcap(self) -> int:
        return _opcap_of(self.config.opcodes)

    def _wq(self, wq_id: int) -> _WorkQueue:
        if not 0 <= wq_id < len(self._wqs):
            raise DsaConfigError(f"no WQ {wq_id} (device has {len(self._wqs)})")
        return self._wqs[wq_id]

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

    # ---- faults and errors -----------------------------------------------------------
    def _report_fault(self, fault: DmaFault, epoch: int) -> None:
        self.counters.add("faults")
        log.debug("dsa.fault", iova=hex(fault.iova), write=fault.write, reason=fault.reason_name)
        if self.on_fault is not None:
            self.on_fault(replace(fault, epoch=epoch))

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
