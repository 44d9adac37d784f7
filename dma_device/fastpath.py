"""The device's warm MEMMOVE fast path (``DsaDevice.fast_memmove``): a plain
MEMMOVE whose every translation is already in the IOTLB runs in one compiled
call through the IOMMU unit (``IommuUnit.memmove_warm``: the unit's context
cache, ownership epoch, generation and counters, then
``NativeWalker.memmove``), instead of the model's validation, two
translations, copy and record write in Python.

It only ever answers for descriptors the model would complete with SUCCESS
without a walk, a fault or a page request, on memory bound to that unit;
everything else (cold, faulting, invalid, another PASID's memory, a unit
without the compiled core) is None, with nothing touched, and the model runs.
"""

from __future__ import annotations

from collections.abc import Callable

from dma_device.dsa.checks import Limits, allowed_flags
from pviommu.abi.dsa import CompletionRecord, Descriptor, DsaStatus, Opcode, opcap_has
from pviommu.iommu.native import MoveLimits
from pviommu.iommu.unit import BoundTranslator, IommuUnit
from pviommu.mem.dma import DmaAccess, DmaMemory

#: The hook's type (``DsaDevice.fast_memmove``).
FastMemmove = Callable[[Descriptor, Limits, DmaAccess], tuple[CompletionRecord, bool] | None]

_SUCCESS = CompletionRecord(status=int(DsaStatus.SUCCESS))  # immutable: every fast completion shares it


def move_limits(lim: Limits) -> MoveLimits | None:
    """What the compiled path checks of a work queue's ``Limits`` (None: OPCAP
    lacks MEMMOVE, the model answers BAD_OPCODE)."""
    if not opcap_has(lim.opcap, Opcode.MEMMOVE):
        return None
    gc = lim.gencap
    allowed = allowed_flags(Opcode.MEMMOVE, lim.wq_bof and gc.block_on_fault, gc.cache_control_mem,
                            gc.cache_control_cache, gc.dest_readback, gc.drain_readback)
    return MoveLimits(allowed, lim.max_xfer, gc.overlap_copy, lim.shared, lim.wq_priv, lim.num_int_handles)


def memmove_hook(unit: IommuUnit) -> FastMemmove | None:
    """The hook for a device whose DMA goes through ``unit`` (None when the
    unit runs without the compiled core: the model is the only path)."""
    if unit.native is None:
        return None
    last: list[tuple[Limits, MoveLimits | None]] = []  # the WQ's limits are one object per WQCFG

    def fast(d: Descriptor, lim: Limits, dma: DmaAccess) -> tuple[CompletionRecord, bool] | None:
        if type(dma) is not DmaMemory:
            return None
        tr = dma.translator
        if type(tr) is not BoundTranslator or tr.unit is not unit or tr.pasid:  # PASID >= 1: the model
            return None
        if last and last[0][0] is lim:
            ml = last[0][1]
        else:
            ml = move_limits(lim)
            last[:] = [(lim, ml)]
        if ml is None:
            return None
        done = unit.memmove_warm(tr.slot, d.pack(), ml)
        if done is None:
            return None
        return _SUCCESS, done.record_written

    return fast


__all__ = ["FastMemmove", "memmove_hook", "move_limits"]
