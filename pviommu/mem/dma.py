"""Device DMA as a device sees it: IOVAs, translated into HPA runs.

The contract between the IOMMU unit (provider) and a device model (consumer):

* a ``DmaTranslator`` turns ``[iova, iova + length)`` into a list of host
  ``Run``s covering the longest translatable *prefix*, plus the ``DmaFault``
  that stopped it (``None`` when the whole range translated);
* ``DmaMemory`` moves bytes with those runs at memmove speed (memoryview
  slices of the banks, a few runs per transfer, never a byte loop) and stops
  at the faulting page: nothing at or beyond the fault is read or written,
  and the caller learns how many bytes were done. That is exactly the DSA's
  partial-completion rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pviommu.addr import Hpa, Iova
from pviommu.mem.bank import HostMemory


@dataclass(frozen=True, slots=True)
class Run:
    """``length`` bytes of host memory from ``hpa`` (one bank, contiguous)."""

    hpa: Hpa
    length: int


@dataclass(frozen=True, slots=True)
class DmaFault:
    """Why a DMA stopped: the IOVA of the first byte that could not be
    translated, the access, and the IOMMU's reason code and name."""

    iova: Iova
    write: bool
    reason: int
    reason_name: str
    detail: str = ""
    #: the ownership epoch of the descriptor that faulted (set by the device)
    epoch: int = 0
    #: the request's PASID (SVA proposal, not in the series); None = a request without PASID
    pasid: int | None = None


@dataclass(slots=True)
class DmaRuns:
    """Runs covering ``done`` bytes from the start of the request, then the
    fault that stopped the translation (``None``: the whole range is covered)."""

    runs: list[Run] = field(default_factory=list)
    fault: DmaFault | None = None

    @property
    def done(self) -> int:
        return sum(r.length for r in self.runs)


class DmaTranslator(Protocol):
    """What a device needs from its IOMMU unit (bound to one device)."""

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns: ...


@dataclass(slots=True)
class DmaResult:
    """Bytes moved before stopping, and the fault that stopped it, if any."""

    done: int
    fault: DmaFault | None = None


class DmaMemory:
    """Byte movement for a device through its translator."""

    def __init__(self, host: HostMemory, translator: DmaTranslator) -> None:
        self.host = host
        self.translator = translator

    def _views(self, runs: list[Run]) -> list[memoryview]:
        views = []
        for run in runs:
            bank, offset = self.host.resolve(run.hpa, run.length)
            views.append(bank.view[offset : offset + run.length])
        return views

    def read(self, iova: Iova, length: int) -> tuple[bytes, DmaFault | None]:
        """The bytes readable from ``iova`` (a prefix on fault) and the fault."""
        tr = self.translator.translate(iova, length, False)
        return b"".join(bytes(v) for v in self._views(tr.runs)), tr.fault

    def write(self, iova: Iova, data: bytes | bytearray | memoryview) -> DmaResult:
        """Write ``data``; on a fault, only the translated prefix is written."""
        tr = self.translator.translate(iova, len(data), True)
        src = memoryview(data)
        pos = 0
        for view in self._views(tr.runs):
            view[:] = src[pos : pos + len(view)]
            pos += len(view)
        return DmaResult(pos, tr.fault)

    def write_record(self, iova: Iova, data: bytes | bytearray | memoryview) -> DmaResult:
        """Write a record its reader polls by its first byte: one translation,
        bytes ``1..`` first and byte 0 last, so a reader that sees byte 0 sees
        the whole record. All or nothing: on a fault (a record lies in one
        page, so the fault is at ``iova``) nothing is written."""
        tr = self.translator.translate(iova, len(data), True)
        if tr.fault is not None:
            return DmaResult(0, tr.fault)
        runs = tr.runs
        if len(runs) == 1:
            bank, offset = self.host.resolve(runs[0].hpa, len(data))
            view = bank.view
            view[offset + 1 : offset + len(data)] = data[1:]
            view[offset] = data[0]
            return DmaResult(len(data))
        views = self._views(runs)  # a record across pages (not a DSA record: those are aligned)
        _scatter([memoryview(data)[1:]], [v for v in _clip_front(views, 1)])
        views[0][0] = data[0]
        return DmaResult(len(data))

    def copy(self, src: Iova, dst: Iova, length: int) -> DmaResult:
        """memmove ``length`` bytes from ``src`` to ``dst`` (both IOVAs).

        Both ranges are translated first; the copy stops at whichever fault
        comes first, so no byte at or after a faulting page of either side is
        touched. Overlapping ranges copy as memmove does (the DSA checks its
        own overlap rules before calling this)."""
        rs = self.translator.translate(src, length, False)
        rd = self.translator.translate(dst, length, True)
        if rs.fault is None and rd.fault is None and len(rs.runs) == 1 and len(rd.runs) == 1:
            # One host run on each side (a warm buffer on large or contiguous pages).
            # memoryview slice assignment is a C memmove (overlap-safe).
            sbank, soff = self.host.resolve(rs.runs[0].hpa, length)
            dbank, doff = self.host.resolve(rd.runs[0].hpa, length)
            dbank.view[doff : doff + length] = sbank.view[soff : soff + length]
            return DmaResult(length)
        limit = min(rs.done, rd.done)
        fault = None
        if limit < length:
            fault = rs.fault if rs.done <= rd.done else rd.fault
        sviews = _clip(self._views(rs.runs), limit)
        dviews = _clip(self._views(rd.runs), limit)
        if _overlaps(rs.runs, rd.runs, limit):
            data = b"".join(bytes(v) for v in sviews)  # memmove semantics
            sviews = [memoryview(data)]
        _scatter(sviews, dviews)
        return DmaResult(limit, fault)


def _clip(views: list[memoryview], limit: int) -> list[memoryview]:
    out: list[memoryview] = []
    left = limit
    for v in views:
        if left <= 0:
            break
        out.append(v[:left])
        left -= len(out[-1])
    return out


def _clip_front(views: list[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes."""
    out: list[memoryview] = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        out.append(v[skip:])
        skip = 0
    return out


def _overlaps(a: list[Run], b: list[Run], limit: int) -> bool:
    def spans(runs: list[Run]) -> list[tuple[int, int]]:
        left, out = limit, []
        for r in runs:
            n = min(r.length, left)
            if n <= 0:
                break
            out.append((int(r.hpa), int(r.hpa) + n))
            left -= n
        return out

    sa, sb = spans(a), spans(b)
    return any(x0 < y1 and y0 < x1 for x0, x1 in sa for y0, y1 in sb)


def _scatter(src: list[memoryview], dst: list[memoryview]) -> None:
    """Copy the concatenation of ``src`` into the concatenation of ``dst``."""
    si = di = so = do = 0
    while si < len(src) and di < len(dst):
        s, d = src[si], dst[di]
        n = min(len(s) - so, len(d) - do)
        d[do : do + n] = s[so : so + n]
        so += n
        do += n
        if so == len(s):
            si, so = si + 1, 0
        if do == len(d):
            di, do = di + 1, 0
