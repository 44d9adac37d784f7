"""Data access of one descriptor: the device's fault policy as a wrapper of
``pviommu.mem.dma.DmaAccess``.

Every ``DmaAccess`` already stops at the first faulting page and reports how
many bytes were done. What it does not know is what the DSA does next, which
depends on the descriptor and its work queue:

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
from pviommu.mem.dma import Data, DmaAccess, DmaFault, DmaResult, DmaRuns, Run

#: How often one faulting address is retried after "resolved" answers before
#: the device gives up (a handler that says "resolved" without mapping the page
#: must not make the engine spin forever).
MAX_RETRIES_PER_ADDRESS = 4


class PageRequestOutcome(Enum):
    """What came back for one page request."""

    RESOLVED = "resolved"  # page made present: retry
    REFUSED = "refused"  # Invalid Request response: PAGE_FAULT_IR
    TIMEOUT = "timeout"  # no answer before the deadline (or no handler): PAGE_FAULT_NOBOF


PageRequester = Callable[[DmaFault], PageRequestOutcome]
FaultSink = Callable[[DmaFault], None]


class BlockOnFault:
    """``DmaAccess`` for one descriptor, with its BOF policy around ``inner``.

    Each access that faults reports the fault and, with BOF, asks for the page
    and resumes after the part already done. Moves over translated runs cannot
    fault and pass straight through. After an access that returned a fault,
    ``refused`` tells whether it is final because the page request was refused
    (status 0x04) rather than not attempted or unanswered (status 0x03)."""

    def __init__(self, inner: DmaAccess, *, block_on_fault: bool, page_request: PageRequester | None,
                 on_fault: FaultSink) -> None:
        self.inner = inner
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

    # -- accesses that may fault ------------------------------------------------
    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        """The runs of ``[iova, +length)`` for this access, after page
        requests; moves no data (operations that must know the common prefix
        of several buffers before writing any of them, then move over these)."""
        runs: list[Run] = []
        done = 0
        while True:
            tr = self.inner.translate(Iova(iova + done), length - done, write)
            runs += tr.runs
            done += tr.done
            if tr.fault is None or not self._should_retry(tr.fault):
                return DmaRuns(runs, tr.fault)

    def read(self, iova: Iova, length: int) -> tuple[bytes, DmaFault | None]:
        parts: list[bytes] = []
        done = 0
        while True:
            data, fault = self.inner.read(Iova(iova + done), length - done)
            parts.append(data)
            done += len(data)
            if fault is None or not self._should_retry(fault):
                return b"".join(parts), fault

    def write(self, iova: Iova, data: Data) -> DmaResult:
        view = memoryview(data)
        done = 0
        while True:
            res = self.inner.write(Iova(iova + done), view[done:])
            done += res.done
            if res.fault is None or not self._should_retry(res.fault):
                return DmaResult(done, res.fault)

    def copy(self, src: Iova, dst: Iova, length: int) -> DmaResult:
        """Forward copy at memmove speed, resumed after each resolved page request."""
        done = 0
        while True:
            res = self.inner.copy(Iova(src + done), Iova(dst + done), length - done)
            done += res.done
            if res.fault is None or not self._should_retry(res.fault):
                return DmaResult(done, res.fault)

    def write_record(self, iova: Iova, data: Data) -> DmaResult:
        """A record is never retried (the device writes it after the operation)."""
        res = self.inner.write_record(iova, data)
        if res.fault is not None:
            self._on_fault(res.fault)
        return res

    # -- moves over translated runs: no fault, no policy ------------------------------
    def read_runs(self, runs: DmaRuns, length: int) -> bytes:
        return self.inner.read_runs(runs, length)

    def write_runs(self, runs: DmaRuns, data: Data) -> None:
        self.inner.write_runs(runs, data)

    def copy_runs(self, src: DmaRuns, dst: DmaRuns, length: int) -> None:
        self.inner.copy_runs(src, dst, length)
