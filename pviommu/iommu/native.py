"""The optional compiled core of the IOMMU unit, behind the Python interfaces.

``native/pviommu_native`` (Rust, built by ``./dev.sh setup`` when cargo is
present) compiles the nested walk, the IOTLB and the DMA copy. Python stays the
reference and the fallback: ``nested.py``, ``iotlb.py``, ``unit.py`` and
``mem/dma.py`` define the behaviour, the tests compare the two on the same
inputs, and everything the compiled core does not handle goes to them.

* ``AVAILABLE``: the extension imported and ``PVIOMMU_NATIVE=0`` is not set
  (``UNAVAILABLE_REASON`` says why not). The classes below raise
  ``NativeUnavailable`` when constructed without it.
* ``NativeWalker(host)``: ``NestedWalker.walk`` with the same arguments and
  results (``WalkOk`` / ``WalkFault``: reasons, detail texts, ``reads``, A/D
  updates, fences). Calls with a trace, ``dry_run`` or a paging-structure cache,
  run the reference walker it holds (``.reference``); the owner bank (the
  slot's owner record, ``pviommu.iommu.owner``) is an argument, as for the
  reference, and a call without one is refused by both. A call that must read
  memory takes bank 0's and the owner bank's mmaps from ``HostMemory`` for
  that call only, so a bank ``HostMemory`` forgot is never reached or kept
  mapped.
* ``NativeIotlb(capacity)``: ``Iotlb``'s methods and semantics (entries as
  ``IotlbEntry``, ``stats`` as an ``IotlbStats`` snapshot). Entries and extents
  must be aligned to their size (the walker's always are; the reference would
  accept others), and ``lookup_span``/``lookup_extent`` refuse empty ranges.
* ``NativeWalker.translate(iotlb, ctx, iova, length, write, owner_bank,
  generation)``: the loop of ``IommuUnit.translate`` after the context lookup
  (IOTLB span, extents, runs, walk on a miss, inserts, extents built),
  compiled; every insert carries ``generation``, the IOTLB generation the
  unit read before it looked the context up; ``copy`` is
  ``DmaMemory.copy`` on top of it (memmove semantics, no GIL for long copies).
  Both leave fault records and unit counters to the caller.
* ``NativeWalker.memmove(iotlb, ctx, desc, limits, owner_bank, generation)``:
  one whole MEMMOVE descriptor as the DSA model runs it, when it is valid,
  cannot fault and finds every translation in the IOTLB (the warm case);
  otherwise None, having touched nothing, and the caller runs the model
  (``memmove_for(iotlb)`` is the same as one compiled call, for the unit's
  hot path).

``IommuUnit(native=None)`` (pviommu/iommu/unit.py) is where these run: it keeps
the contexts, owner epochs, generations, faults and counters.

Bump ``API_VERSION`` here and in native/pviommu_native/src/lib.rs together
whenever the compiled interface changes: a module left from an older build
then reads as unavailable instead of failing at a call.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, NamedTuple

from pviommu.addr import Iova
from pviommu.errors import HpaOutOfRange
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.iotlb import Extent, IotlbEntry, IotlbStats
from pviommu.iommu.nested import ExplainStep, NestedWalker, WalkFault, WalkOk
from pviommu.mem.bank import HostMemory
from pviommu.mem.dma import Run

if TYPE_CHECKING:
    from collections.abc import Callable

    from pviommu.iommu.pscache import PsCache

#: The interface of pviommu._native this module is written for (its API_VERSION).
API_VERSION = 3

try:
    from pviommu import _native as _ext

    _IMPORT_ERROR = ""
    if getattr(_ext, "API_VERSION", None) != API_VERSION:  # left from an older build of other sources
        _IMPORT_ERROR = f"stale build: API {getattr(_ext, 'API_VERSION', None)}, want {API_VERSION}"
        _ext = None  # type: ignore[assignment]
except ImportError as exc:  # not built: the Python implementation runs alone
    _ext = None  # type: ignore[assignment]
    _IMPORT_ERROR = str(exc)

#: Environment switch: ``PVIOMMU_NATIVE=0`` forces the Python implementation.
ENV_SWITCH = "PVIOMMU_NATIVE"
_DISABLED = os.environ.get(ENV_SWITCH, "").strip() == "0"

AVAILABLE = _ext is not None and not _DISABLED
UNAVAILABLE_REASON = (
    "" if AVAILABLE
    else f"{ENV_SWITCH}=0 is set" if _DISABLED
    else f"pviommu._native is not built ({_IMPORT_ERROR}); ./dev.sh setup builds it when cargo is present"
)  # fmt: skip


class NativeUnavailable(RuntimeError):
    """The compiled core is not built or is switched off."""


def _core() -> object:
    if not AVAILABLE or _ext is None:
        raise NativeUnavailable(UNAVAILABLE_REASON)
    return _ext


_REASONS = {int(r): r for r in FaultReason}


class NativeIotlb:
    """``iotlb.Iotlb`` compiled: same methods, same semantics, thread-safe
    (one lock inside, taken with the GIL held). The methods are the compiled
    ones themselves, bound per instance, so a lookup costs no Python frame."""

    lookup: Callable[..., IotlbEntry | None]
    lookup_run: Callable[..., list[IotlbEntry]]
    lookup_span: Callable[[int, int, int, bool], int | None]
    lookup_extent: Callable[[int, int, int, bool], tuple[int, int] | None]
    insert: Callable[[int, IotlbEntry, int], bool]
    insert_extent: Callable[[int, Extent, int], bool]
    bump_generation: Callable[[], None]
    invalidate_all: Callable[[], int]
    invalidate_domain: Callable[[int], int]
    invalidate_pages: Callable[[int, int, int], int]

    def __init__(self, capacity: int = 8192) -> None:
        _core()
        assert _ext is not None
        core = _ext.Iotlb(capacity, entry_cls=IotlbEntry, stats_cls=IotlbStats)
        self.core = core
        self.lookup = core.lookup
        self.lookup_run = core.lookup_run
        self.lookup_span = core.lookup_span
        self.lookup_extent = core.lookup_extent
        self.insert = core.insert
        self.insert_extent = core.insert_extent
        self.bump_generation = core.bump_generation
        self.invalidate_all = core.invalidate_all
        self.invalidate_domain = core.invalidate_domain
        self.invalidate_pages = core.invalidate_pages

    @property
    def capacity(self) -> int:
        return self.core.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self.core.capacity = value

    @property
    def generation(self) -> int:
        """Read before a walk; pass to ``insert``."""
        return self.core.generation

    @property
    def stats(self) -> IotlbStats:
        """A snapshot of the counters (the reference's are live; read them again)."""
        stats: IotlbStats = self.core.stats
        return stats

    def __len__(self) -> int:
        return len(self.core)


class NativeTranslation(NamedTuple):
    """What ``NativeWalker.translate`` did: runs of the translated prefix, the
    walk fault that stopped it at ``fault_iova`` (None: all translated), and
    the walks and entry reads it took (for the unit's counters). A named tuple:
    made once per DMA request, it must cost next to nothing."""

    runs: list[Run]
    fault: WalkFault | None
    fault_iova: Iova
    walks: int
    reads: int

    @property
    def done(self) -> int:
        return sum(r.length for r in self.runs)


class NativeCopy(NamedTuple):
    """What ``NativeWalker.copy`` did: ``done`` bytes copied, after translating
    the source (read) and then the destination (write), in that order. The
    DMA result's fault is ``src.fault`` when ``src.done <= dst.done``, else
    ``dst.fault`` (``DmaMemory.copy``), and only when ``done < length``."""

    done: int
    src: NativeTranslation
    dst: NativeTranslation

    @property
    def stopped_by(self) -> NativeTranslation | None:
        """The side whose fault stopped the copy (None: it completed)."""
        if self.src.fault is None and self.dst.fault is None:
            return None
        return self.src if self.src.done <= self.dst.done else self.dst


class MoveLimits(NamedTuple):
    """What a work queue allows a MEMMOVE (the device's ``checks.Limits``,
    reduced to what the fast path checks): the flags it accepts
    (``checks.allowed_flags(MEMMOVE, ...)``), the transfer limit, whether
    overlapping copies are allowed (GENCAP), shared WQ, WQ privilege, and the
    number of interrupt handles. Use it only on a device whose OPCAP has
    MEMMOVE, for descriptors outside a batch (the model's BAD_OPCODE and batch
    rules are not checked here)."""

    allowed_flags: int
    max_xfer: int
    overlap_copy: bool
    shared: bool
    wq_priv: bool
    num_int_handles: int


class NativeMemmove(NamedTuple):
    """What ``NativeWalker.memmove`` did: the unit translations it made (for
    the unit's counters; 2, or 3 with the completion record), walks and entry
    reads (0 on this warm path), whether it wrote the success record, and
    whether the record is still due (the caller writes it, status byte last:
    after a copy that ran without the GIL, whatever happened meanwhile -- a
    flush, an owner change -- is then seen by that write's own translation)."""

    translations: int
    walks: int
    reads: int
    record_written: bool
    record_due: bool


class NativeWalker:
    """``NestedWalker`` compiled for the common case, the reference for the rest."""

    def __init__(self, host: HostMemory, *, fs_mgaw_lg2: int = 48) -> None:
        _core()
        assert _ext is not None
        self.host = host
        self.reference = NestedWalker(host, fs_mgaw_lg2=fs_mgaw_lg2)
        self.core = _ext.Walker(fs_mgaw_lg2, walk_ok=WalkOk, walk_fault=WalkFault, run=Run,
                                translation=NativeTranslation, memmove_result=NativeMemmove,
                                missing=(HpaOutOfRange, ValueError),
                                reasons=_REASONS)
        #: walks handed to the reference (trace, dry run, cache, no owner bank)
        self.fallbacks = 0

    def walk(
        self,
        ctx: ContextEntry,
        iova: Iova,
        write: bool,
        trace: list[ExplainStep] | None = None,
        *,
        owner_bank: int,
        dry_run: bool = False,
        cache: PsCache | None = None,
        generation: int | None = None,
    ) -> WalkOk | WalkFault:
        """``NestedWalker.walk``: compiled without trace, dry run or cache."""
        if trace is None and not dry_run and cache is None and owner_bank > 0:
            result = self.core.walk(self.host, ctx, iova, write, owner_bank)
            if result is not None:
                out: WalkOk | WalkFault = result
                return out
        self.fallbacks += 1
        return self.reference.walk(ctx, iova, write, trace, owner_bank=owner_bank, dry_run=dry_run, cache=cache,
                                   generation=generation)

    def translate(self, iotlb: NativeIotlb, ctx: ContextEntry, iova: Iova, length: int, write: bool,
                  owner_bank: int, generation: int) -> NativeTranslation | None:
        """``IommuUnit.translate`` from its IOTLB lookups on, for a valid,
        present ``ctx`` (``length > 0``, ``iova + length <= 2**64``); None
        when this context is left to the reference."""
        if owner_bank <= 0:
            return None
        result: NativeTranslation | None = self.core.translate(self.host, iotlb.core, ctx, ctx.did, iova, length,
                                                               write, owner_bank, generation)
        return result

    def copy(self, iotlb: NativeIotlb, ctx: ContextEntry, src: Iova, dst: Iova, length: int, owner_bank: int,
             generation: int) -> NativeCopy | None:
        """``DmaMemory.copy(src, dst, length)`` through ``translate``; None
        when this context is left to the reference."""
        if owner_bank <= 0:
            return None
        raw = self.core.copy(self.host, iotlb.core, ctx, ctx.did, src, dst, length, owner_bank, generation)
        return None if raw is None else NativeCopy(*raw)

    def memmove(self, iotlb: NativeIotlb, ctx: ContextEntry, desc: bytes | bytearray | memoryview,
                limits: MoveLimits, owner_bank: int, generation: int) -> NativeMemmove | None:
        """Run one 64-byte MEMMOVE descriptor of ``ctx``'s domain the way the
        device model would (validation, copy, success record written status
        byte last) when it is valid, completes without a fault and all its
        translations are in ``iotlb``; None, having touched nothing, in every
        other case (the caller runs the model). The device's own counters
        (descriptors, completions, bytes, interrupts) stay with the caller."""
        if owner_bank <= 0:
            return None
        result: NativeMemmove | None = self.core.memmove(self.host, iotlb.core, ctx, ctx.did, bytes(desc), limits,
                                                         owner_bank, generation)
        return result

    def memmove_for(self, iotlb: NativeIotlb) -> Callable[[ContextEntry, int, bytes, MoveLimits, int, int],
                                                          NativeMemmove | None]:
        """``memmove`` on ``iotlb`` as the compiled call itself, without a
        Python frame (the device's hot path): ``(ctx, ctx.did, desc as bytes,
        limits, owner_bank, generation)``; None for an owner bank of 0 too."""
        bound: Callable[[ContextEntry, int, bytes, MoveLimits, int, int], NativeMemmove | None] = functools.partial(
            self.core.memmove, self.host, iotlb.core)
        return bound


__all__ = [
    "AVAILABLE", "ENV_SWITCH", "UNAVAILABLE_REASON", "MoveLimits", "NativeCopy", "NativeIotlb", "NativeMemmove",
    "NativeTranslation", "NativeUnavailable", "NativeWalker",
]
