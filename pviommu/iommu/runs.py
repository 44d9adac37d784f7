"""The host runs of one translation, built as its pieces are found.

Both translation paths of the unit (requests without PASID, ``unit``, and
with one, ``pasid_unit``) find a request's translation piece by piece, in
IOVA order from its start: an extent or an entry of the IOTLB, or what a
walk on a miss inserted. ``RunBuilder`` is the one place that turns those
pieces into ``DmaRuns``: a piece that starts where the last run ends in host
memory extends it, any other piece starts a new run; no piece goes past the
request's end, and ``pos`` says where the next one must start. Runs carry no
permissions: every piece allowed the request's access when it was found.
"""

from __future__ import annotations

from pviommu.addr import Hpa
from pviommu.mem.dma import DmaFault, DmaRuns, Run


class RunBuilder:
    """The runs of ``[pos, end)`` so far; translate while ``pos < end``."""

    __slots__ = ("_hpa", "_length", "_runs", "end", "pos")

    def __init__(self, start: int, end: int) -> None:
        #: the IOVA the next piece translates (the request's start, at first)
        self.pos = start
        self.end = end
        self._runs: list[Run] = []
        self._hpa = self._length = 0  # the last run, not in _runs yet (length 0: none)

    def add(self, hpa: int, iova: int, size: int) -> None:
        """The ``size`` bytes from ``iova`` (which hold ``pos``) are at ``hpa``,
        contiguous: take those from ``pos`` on, up to ``end``."""
        pos = self.pos
        n = iova + size
        if n > self.end:
            n = self.end
        n -= pos
        hpa += pos - iova
        length = self._length
        if length and self._hpa + length == hpa:
            self._length = length + n
        else:
            if length:
                self._runs.append(Run(Hpa(self._hpa), length))
            self._hpa, self._length = hpa, n
        self.pos = pos + n

    def result(self, fault: DmaFault | None = None) -> DmaRuns:
        """The runs built (the last one included), then the fault that
        stopped the translation at ``pos`` (None: it reached ``end``)."""
        runs = self._runs
        if self._length:
            runs.append(Run(Hpa(self._hpa), self._length))
            self._length = 0
        return DmaRuns(runs, fault)


__all__ = ["RunBuilder"]
