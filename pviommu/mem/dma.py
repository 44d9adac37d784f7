"""Device DMA as a device sees it: IOVAs, translated into HPA runs.

The contract between the IOMMU unit (provider) and a device model (consumer):

* a ``DmaTranslator`` turns ``[iova, iova + length)`` into a list of host
  ``Run``s covering the longest translatable *prefix*, plus the ``DmaFault``
  that stopped it (``None`` when the whole range translated);
* ``DmaAccess`` is the one byte API a device uses (after rust-vmm's
  ``Bytes<A>``, over ``Iova``): every access stops at the faulting page --
  nothing at or beyond the fault is read or written, and the caller learns
  how many bytes were done (the DSA's partial-completion rule). An operation
  with several buffers translates each once (``translate``, or
  ``common_prefix``) and then moves bytes over those runs (``*_runs``), so
  nothing is translated twice;
* ``DmaMemory`` implements it over a translator and the banks at memmove
  speed (memoryview slices, a few runs per transfer, never a byte loop);
  ``BlockedDma`` is a device with no domain (every access faults); the DSA's
  block-on-fault policy (``dma_device.dsa.access``) wraps either.
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


Data = bytes | bytearray | memoryview


class DmaAccess(Protocol):
    """One device's byte access to its IOVA space (see the module doc)."""

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        """The runs of the longest translatable prefix for this access, and
        the fault that stopped it; moves no data."""
        ...

    def read(self, iova: Iova, length: int) -> tuple[bytes, DmaFault | None]:
        """The bytes readable from ``iova`` (a prefix on fault) and the fault."""
        ...

    def write(self, iova: Iova, data: Data) -> DmaResult:
        """Write ``data``; on a fault, only the translated prefix is written."""
        ...

    def copy(self, src: Iova, dst: Iova, length: int) -> DmaResult:
        """memmove from ``src`` to ``dst``, up to the first fault of either side."""
        ...

    def write_record(self, iova: Iova, data: Data) -> DmaResult:
        """All or nothing, byte 0 last (a record its reader polls by byte 0)."""
        ...

    def read_runs(self, runs: DmaRuns, length: int) -> bytes:
        """The first ``length`` bytes of translated ``runs`` (``length <= runs.done``)."""
        ...

    def write_runs(self, runs: DmaRuns, data: Data) -> None:
        """``data`` into the first ``len(data)`` bytes of translated ``runs``."""
        ...

    def copy_runs(self, src: DmaRuns, dst: DmaRuns, length: int) -> None:
        """memmove ``length`` bytes between translated runs."""
        ...


@dataclass(slots=True)
class Prefix:
    """What several equal-length ranges have in common: ``done`` bytes
    translate for every one (``runs[i]`` covers at least that much of range
    ``i``), ``fault`` is what stops the shortest (None: all of them)."""

    done: int
    fault: DmaFault | None
    runs: list[DmaRuns]


def common_prefix(mem: DmaAccess, ranges: list[tuple[Iova, int, bool]]) -> Prefix:
    """Shortest translatable prefix over ``(iova, length, write)`` ranges (all
    of the same length), each range translated once, in order, and each only
    as far as the ranges before it reached."""
    done = ranges[0][1] if ranges else 0
    fault: DmaFault | None = None
    runs: list[DmaRuns] = []
    for iova, _length, write in ranges:
        if done == 0:
            runs.append(DmaRuns())
            continue
        tr = mem.translate(iova, done, write)
        runs.append(tr)
        if tr.fault is not None:
            done, fault = tr.done, tr.fault
    return Prefix(done, fault, runs)


def _check_length(runs: DmaRuns, length: int) -> None:
    if not 0 <= length <= runs.done:
        raise ValueError(f"{length} bytes asked of runs covering {runs.done}")


class BlockedDma:
    """The DMA of a device attached to no domain: nothing translates, every
    access faults at its first byte, nothing is read or written."""

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        return DmaRuns([], DmaFault(iova, write, 0, "NO_DOMAIN", "device not attached"))

    def read(self, iova: Iova, length: int) -> tuple[bytes, DmaFault | None]:
        return b"", self.translate(iova, length, False).fault

    def write(self, iova: Iova, data: Data) -> DmaResult:
        return DmaResult(0, self.translate(iova, len(data), True).fault)

    def copy(self, src: Iova, dst: Iova, length: int) -> DmaResult:
        return DmaResult(0, self.translate(src, length, False).fault)

    def write_record(self, iova: Iova, data: Data) -> DmaResult:
        return self.write(iova, data)

    def read_runs(self, runs: DmaRuns, length: int) -> bytes:
        _check_length(runs, length)
        return b""

    def write_runs(self, runs: DmaRuns, data: Data) -> None:
        _check_length(runs, len(data))

    def copy_runs(self, src: DmaRuns, dst: DmaRuns, length: int) -> None:
        _check_length(src, length)
        _check_length(dst, length)


class DmaMemory:
    """``DmaAccess`` through a translator, over the host's banks."""

    def __init__(self, host: HostMemory, translator: DmaTranslator) -> None:
        self.host = host
        self.translator = translator

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        return self.translator.translate(iova, length, write)

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

    def write(self, iova: Iova, data: Data) -> DmaResult:
        """Write ``data``; on a fault, only the translated prefix is written."""
        tr = self.translator.translate(iova, len(data), True)
        src = memoryview(data)
        pos = 0
        for view in self._views(tr.runs):
            view[:] = src[pos : pos + len(view)]
            pos += len(view)
        return DmaResult(pos, tr.fault)

    def read_runs(self, runs: DmaRuns, length: int) -> bytes:
        _check_length(runs, length)
        return b"".join(bytes(v) for v in _clip(self._views(runs.runs), length))

    def write_runs(self, runs: DmaRuns, data: Data) -> None:
        _check_length(runs, len(data))
        _scatter([memoryview(data)], _clip(self._views(runs.runs), len(data)))

    def copy_runs(self, src: DmaRuns, dst: DmaRuns, length: int) -> None:
        _check_length(src, length)
        _check_length(dst, length)
        sviews = _clip(self._views(src.runs), length)
        dviews = _clip(self._views(dst.runs), length)
        if _overlaps(src.runs, dst.runs, length):
            data = b"".join(bytes(v) for v in sviews)  # memmove semantics
            sviews = [memoryview(data)]
        _scatter(sviews, dviews)

    def write_record(self, iova: Iova, data: Data) -> DmaResult:
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
        self.copy_runs(rs, rd, limit)
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
