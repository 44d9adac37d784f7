"""Data access of one descriptor: ``DmaMemory`` plus the device's fault policy.

``DmaMemory`` already stops at the first faulting page and reports how many
bytes were done. What it does not know is what the DSA does next, which depends
on the descriptor and its work queue:

* Block-on-fault off (or not allowed by WQCFG.bof): stop, and the operation
  completes with PAGE_FAULT_NOBOF (0x03) and a partial ``bytes_completed``.
* Block-on-fault on: the device sends a page request (PCIe PRI) and waits for
  the answer. Here that is the ``page_request`` callable; a "resolved" answer
  retries the remaining part, "refused" (Invalid Request response) completes
  with PAGE_FAULT_IR (0x04), no answer (timeout, or no handler at all) gives up
  blocking and completes as if BOF were off (0x03), so a guest that never
  answers cannot wedge an engine.

Every translation fault is also reported to ``on_fault`` (resolved or not), so
the hypervisor can queue it for the owning guest.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from pviommu.addr import Iova
from pviommu.mem.dma import DmaFault, DmaMemory, DmaResult

#: How often one faulting address is retried after "resolved" answers before
#: the device gives up (a handler that says "resolved" without mapping the page
#: must not make the engine spin forever).
MAX_RETRIES_PER_ADDRESS = 4

#: Bytes a probe translates per step: the runs it holds stay bounded whatever
#: the length asked (a 2 GiB probe of 4 KiB pages would otherwise list 512 Ki runs).
PROBE_CHUNK = 4 << 20


class PageRequestOutcome(Enum):
    """What came back for one page request."""

    RESOLVED = "resolved"  # page made present: retry
    REFUSED = "refused"  # Invalid Request response: PAGE_FAULT_IR
    TIMEOUT = "timeout"  # no answer before the deadline (or no handler): PAGE_FAULT_NOBOF


PageRequester = Callable[[DmaFault], PageRequestOutcome]
FaultSink = Callable[[DmaFault], None]


class DeviceMemory:
    """Reads, writes and copies for one descriptor, with its BOF policy.

    After a call that returns a fault, ``refused`` tells whether the fault is
    final because the page request was refused (status 0x04) rather than not
    attempted or unanswered (status 0x03)."""

    def __init__(self, dma: DmaMemory, *, block_on_fault: bool, page_request: PageRequester | None,
                 on_fault: FaultSink) -> None:
        self.dma = dma
        self.block_on_fault = block_on_fault and page_request is not None
        self._page_request = page_request
        self._on_fault = on_fault
        self.refused = False
        self._tries: dict[tuple[int, bool], int] = {}

    def _should_retry(self, fault: DmaFault) -> bool:
        """Report ``fault``; with BOF ask for the page; True means try again."""
        self._on_fault(fault)
        if not self.block_on_fault or self._page_request is None:
            return False
        key = (int(fault.iova), fault.write)
        tries = self._tries.get(key, 0)
        if tries >= MAX_RETRIES_PER_ADDRESS:
            return False
        self._tries[key] = tries + 1
        outcome = self._page_request(fault)
        if outcome is PageRequestOutcome.REFUSED:
            self.refused = True
        return outcome is PageRequestOutcome.RESOLVED

    # -- moving bytes -------------------------------------------------------
    def read(self, iova: int, length: int) -> tuple[bytes, DmaFault | None]:
        parts: list[bytes] = []
        done = 0
        while True:
            data, fault = self.dma.read(Iova(iova + done), length - done)
            parts.append(data)
            done += len(data)
            if fault is None or not self._should_retry(fault):
                return b"".join(parts), fault

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> DmaResult:
        view = memoryview(data)
        done = 0
        while True:
            res = self.dma.write(Iova(iova + done), view[done:])
            done += res.done
            if res.fault is None or not self._should_retry(res.fault):
                return DmaResult(done, res.fault)

    def copy(self, src: int, dst: int, length: int) -> DmaResult:
        """Forward copy at memmove speed (``DmaMemory.copy``), resumed after
        each resolved page request."""
        done = 0
        while True:
            res = self.dma.copy(Iova(src + done), Iova(dst + done), length - done)
            done += res.done
            if res.fault is None or not self._should_retry(res.fault):
                return DmaResult(done, res.fault)

    def probe(self, iova: int, length: int, write: bool) -> DmaResult:
        """How much of ``[iova, +length)`` translates for this access, after
        page requests; moves no data. Used by operations that must know the
        common prefix of several buffers before writing any of them.
        Translates ``PROBE_CHUNK`` at a time, so it holds no more runs than that."""
        done = 0
        while done < length:
            tr = self.dma.translator.translate(Iova(iova + done), min(PROBE_CHUNK, length - done), write)
            done += tr.done
            if tr.fault is not None and not self._should_retry(tr.fault):
                return DmaResult(done, tr.fault)
        return DmaResult(done, None)

    def common_prefix(self, ranges: list[tuple[int, int, bool]]) -> DmaResult:
        """Shortest translatable prefix over ``(iova, length, write)`` ranges
        (all of the same length), and the fault that limits it."""
        best = DmaResult(ranges[0][1] if ranges else 0, None)
        for iova, _length, write in ranges:
            if best.done == 0:
                break
            res = self.probe(iova, best.done, write)
            if res.fault is not None:
                best = res
        return best

    # -- after probing: plain moves, no fault policy ------------------------
    def read_now(self, iova: int, length: int) -> tuple[bytes, DmaFault | None]:
        """Read a range already probed (a fault here means the mapping went
        away meanwhile; the caller reports it as usual)."""
        return self.dma.read(Iova(iova), length)

    def write_now(self, iova: int, data: bytes | bytearray | memoryview) -> DmaResult:
        return self.dma.write(Iova(iova), data)

    def copy_now(self, src: int, dst: int, length: int) -> DmaResult:
        return self.dma.copy(Iova(src), Iova(dst), length)
