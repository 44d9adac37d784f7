"""Test rig for the DSA model: a fake IOMMU over one real HostMemory bank.

IOVA = offset in the bank (identity to HPA = bank base + offset), with some
pages unmapped and some read-only, so operations can be tested without the
real IOMMU unit. The CPU view (``rig.bank``) is used to set up and check data.
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

from dma_device.dsa import DsaDevice, DsaDeviceConfig
from pviommu.abi.dsa import (
    COMP_SIZE,
    CompletionRecord,
    DescFlags,
    Descriptor,
    WqCfg,
)
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE, Hpa, Iova
from pviommu.mem.bank import Bank, HostMemory
from pviommu.mem.dma import DmaFault, DmaMemory, DmaRuns, Run

BANK_SIZE = 16 << 20
REASON_NOT_PRESENT = 1
REASON_WRITE_DENIED = 2
SHARED_WQ = 0
DEDICATED_WQ = 1


class FakeIommu:
    """Identity translator with holes (unmapped) and read-only pages."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank
        self.unmapped: set[int] = set()
        self.readonly: set[int] = set()
        self.calls = 0

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        self.calls += 1
        if length <= 0:
            return DmaRuns([], None)
        start, end = int(iova), int(iova) + length
        bad = sorted(self.unmapped | (self.readonly if write else set()))
        first, last = start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        i = bisect.bisect_left(bad, first)
        stop_page = bad[i] if i < len(bad) and bad[i] <= last else None
        limit_end = min(end, self.bank.size)
        fault = None
        if stop_page is not None and (stop_page << PAGE_SHIFT) < limit_end:
            limit_end = max(start, stop_page << PAGE_SHIFT)
            reason = REASON_NOT_PRESENT if stop_page in self.unmapped else REASON_WRITE_DENIED
            fault = DmaFault(Iova(limit_end), write, reason,
                             "NOT_PRESENT" if reason == REASON_NOT_PRESENT else "WRITE_DENIED")
        elif limit_end < end:
            limit_end = max(start, limit_end)
            fault = DmaFault(Iova(limit_end), write, REASON_NOT_PRESENT, "OUT_OF_RANGE")
        runs = [Run(Hpa(self.bank.base + start), limit_end - start)] if limit_end > start else []
        return DmaRuns(runs, fault)


def default_wqs(device: DsaDevice, *, shared_size: int = 16, engines: tuple[int, ...] = (0, 1, 2, 3)
                ) -> None:
    """accel-config 2g2q_user_1: wq0 shared (size 16, threshold 15, priority 10,
    bof), wq1 dedicated (size 16, bof); engines split between two groups."""
    half = max(1, len(engines) // 2)
    device.configure_wq(SHARED_WQ, WqCfg(wq_size=shared_size, wq_thresh=shared_size - 1,
                                         dedicated=False, bof=True, priority=10))
    device.configure_wq(DEDICATED_WQ, WqCfg(wq_size=16, dedicated=True, bof=True, priority=10))
    device.configure_group(0, [SHARED_WQ], engines[:half])
    device.configure_group(1, [DEDICATED_WQ], engines[half:] or engines[:half])


class Rig:
    """One bank, one fake IOMMU, one DSA device configured like accel-config."""

    def __init__(self, tmp: Path, config: DsaDeviceConfig | None = None, *, enable: bool = True) -> None:
        self.host = HostMemory(tmp)
        self.bank = self.host.create_bank(1, BANK_SIZE)
        self.iommu = FakeIommu(self.bank)
        self.dma = DmaMemory(self.host, self.iommu)
        self.interrupts: list[int] = []
        self.faults: list[DmaFault] = []
        self.device = DsaDevice(self.dma, config, on_interrupt=lambda handle, epoch: self.interrupts.append(handle),
                                on_fault=self.faults.append)
        self._next = PAGE_SIZE  # keep IOVA 0 unused
        if enable:
            default_wqs(self.device)
            assert self.device.enable_device() == 0
            assert self.device.enable_wq(SHARED_WQ) == 0
            assert self.device.enable_wq(DEDICATED_WQ) == 0

    def close(self) -> None:
        self.device.close()
        self.host.close()

    # -- memory ---------------------------------------------------------------
    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        addr = (self._next + align - 1) // align * align
        self._next = addr + max(size, 1)
        assert self._next <= BANK_SIZE, "rig bank exhausted"
        return addr

    def comp(self) -> int:
        return self.alloc(COMP_SIZE, 32)

    def write(self, iova: int, data: bytes) -> None:
        self.bank.write(iova, data)

    def read(self, iova: int, n: int) -> bytes:
        return self.bank.read(iova, n)

    def snapshot(self) -> bytes:
        return self.bank.read(0, BANK_SIZE)

    def record(self, addr: int) -> CompletionRecord:
        return CompletionRecord.unpack(self.bank.read(addr, COMP_SIZE))

    # -- submission -------------------------------------------------------------
    def wait(self, comp: int, timeout: float = 10.0) -> CompletionRecord:
        deadline = time.monotonic() + timeout
        while self.bank.read(comp, 1)[0] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion at {comp:#x}")
            time.sleep(0.0002)
        return self.record(comp)

    def run(self, desc: Descriptor, wq: int = DEDICATED_WQ, flags: int | None = None) -> CompletionRecord:
        """Submit with CRAV|RCR and a fresh record, wait, return the record."""
        comp = self.comp()
        extra = DescFlags.CRAV | DescFlags.RCR
        d = desc.with_(completion_addr=comp, flags=(desc.flags if flags is None else flags) | extra)
        while not self.device.submit(wq, d):
            time.sleep(0.001)
        return self.wait(comp)

    def settle(self) -> None:
        """Wait until every queued descriptor completed."""
        for wq in (SHARED_WQ, DEDICATED_WQ):
            self.device.drain_wq(wq)
