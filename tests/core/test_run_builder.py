"""``RunBuilder`` (pviommu/iommu/runs.py), the one place where every
translation path turns the pieces it found into host runs: contiguous pieces
merge, any other piece starts a run, pieces are taken from ``pos`` and
clipped at the request's end; checked directly, against a byte-by-byte
model, and through both translation paths of the unit (Python and compiled)
where pieces of different permissions meet."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pviommu.addr import SZ_4K, Gpa, Hpa, Iova
from pviommu.iommu import native
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.runs import RunBuilder
from pviommu.mem.dma import DmaFault, Run
from pviommu.pt.common import RW, Perm
from tests.kit.core_env import DATA, SLOT, build_system

PAGE = 0x1000


def test_pieces_contiguous_in_host_memory_merge_into_one_run() -> None:
    runs = RunBuilder(0x1000, 0x4000)
    runs.add(0x50_000, 0x1000, PAGE)
    runs.add(0x51_000, 0x2000, PAGE)
    runs.add(0x52_000, 0x3000, PAGE)
    assert runs.pos == runs.end == 0x4000
    assert runs.result().runs == [Run(Hpa(0x50_000), 3 * PAGE)]


def test_a_piece_anywhere_else_in_host_memory_starts_a_new_run() -> None:
    runs = RunBuilder(0x1000, 0x5000)
    runs.add(0x50_000, 0x1000, PAGE)
    runs.add(0x60_000, 0x2000, PAGE)  # a gap
    runs.add(0x5F_000, 0x3000, PAGE)  # adjacent, but below the last run: no merge backwards
    runs.add(0x50_000, 0x4000, PAGE)  # the first page again (aliased IOVAs)
    assert runs.result().runs == [Run(Hpa(0x50_000), PAGE), Run(Hpa(0x60_000), PAGE),
                                  Run(Hpa(0x5F_000), PAGE), Run(Hpa(0x50_000), PAGE)]


def test_a_piece_is_taken_from_pos_and_clipped_at_the_end() -> None:
    runs = RunBuilder(0x1800, 0x2100)
    runs.add(0x50_000, 0x1000, PAGE)  # holds pos 0x1800: only its upper half is taken
    assert runs.pos == 0x2000
    runs.add(0x51_000, 0x2000, 2 * PAGE)  # contiguous, but the request ends 0x100 into it
    assert runs.pos == 0x2100
    got = runs.result()
    assert got.runs == [Run(Hpa(0x50_800), 0x900)] and got.done == 0x2100 - 0x1800


def test_an_extent_hit_already_at_pos_is_taken_whole_up_to_the_end() -> None:
    """``Iotlb.lookup_extent`` answers (HPA at pos, bytes): a piece starting at pos."""
    runs = RunBuilder(0x1234, 0x9000)
    runs.add(0x77_234, 0x1234, 0x2000)
    runs.add(0x79_234, 0x3234, 0x1_0000)  # extends the run, clipped at 0x9000
    assert runs.result().runs == [Run(Hpa(0x77_234), 0x9000 - 0x1234)]


def test_the_result_keeps_the_runs_before_a_fault_and_says_none_without_pieces() -> None:
    fault = DmaFault(Iova(0x3000), True, 0x85, "NO_WRITE")
    runs = RunBuilder(0x1000, 0x4000)
    runs.add(0x50_000, 0x1000, PAGE)
    runs.add(0x70_000, 0x2000, PAGE)
    got = runs.result(fault)
    assert got.runs == [Run(Hpa(0x50_000), PAGE), Run(Hpa(0x70_000), PAGE)] and got.fault is fault
    assert got.done == 0x3000 - 0x1000
    empty = RunBuilder(0x1000, 0x2000).result(fault)
    assert empty.runs == [] and empty.done == 0 and empty.fault is fault


# A piece: (page it maps to, how far before pos it starts, its size), all in 16-byte units.
_pieces = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3), st.integers(1, 6)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 64), length=st.integers(1, 200), pieces=_pieces)
def test_the_runs_are_the_maximal_contiguous_spans_of_a_byte_by_byte_model(
        start: int, length: int, pieces: list[tuple[int, int, int]]) -> None:
    """Whatever pieces come (each holding pos), the runs are exactly the host
    bytes of [start, end) in order, cut wherever the next byte is not the one
    after: no run past the end, none empty, no two that could have merged."""
    unit = 16
    end = start + length
    runs = RunBuilder(start, end)
    model: list[int] = []  # the host address of every byte translated, in IOVA order
    for page, before, size in pieces:
        if runs.pos >= end:
            break
        iova = runs.pos - min(before * unit, runs.pos)
        size = max(size * unit, runs.pos - iova + 1)
        hpa = 0x10_000 + page * 0x40
        take = min(end, iova + size) - runs.pos
        model.extend(hpa + (runs.pos - iova) + i for i in range(take))
        runs.add(hpa, iova, size)
        assert runs.pos == start + len(model)
    expected: list[Run] = []
    for addr in model:
        if expected and expected[-1].hpa + expected[-1].length == addr:
            expected[-1] = Run(expected[-1].hpa, expected[-1].length + 1)
        else:
            expected.append(Run(Hpa(addr), 1))
    assert runs.result().runs == expected


# -- through the unit: pieces of different permissions ----------------------------------------
UNITS = [pytest.param({"native": False, "pscache": True}, id="python"),
         pytest.param({"native": False, "pscache": False}, id="python-nopscache"),
         pytest.param({"native": True}, id="native",
                      marks=pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON))]
IOVA = Iova(0x40_0000_0000)


@pytest.mark.parametrize("options", UNITS)
def test_read_and_write_pages_contiguous_in_host_memory_give_one_run_and_a_write_stops_at_the_read_only_one(
        tmp_path: Path, options: dict[str, bool]) -> None:
    """Runs carry no permissions: a read over an RW page and the read-only page
    after it (contiguous in host memory) is one run, cold and warm (IOTLB
    entries, then the extent they formed); a write gets the RW page's run and
    the NO_WRITE fault at the read-only one."""
    s = build_system(tmp_path, p1_ram=16 * 1024 * 1024, **options)
    try:
        s.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
        s.s1.map(Iova(IOVA + SZ_4K), Gpa(DATA + SZ_4K), SZ_4K, Perm.READ)
        s.s1.map(Iova(IOVA + 2 * SZ_4K), Gpa(DATA + 3 * SZ_4K), SZ_4K, RW)  # elsewhere in host memory
        whole = [Run(s.hpa(DATA), 2 * SZ_4K), Run(s.hpa(DATA + 3 * SZ_4K), SZ_4K)]
        for _ in ("cold", "warm", "warm again"):
            got = s.unit.translate(SLOT, IOVA, 3 * SZ_4K, False)
            assert got.fault is None and got.runs == whole
        inside = s.unit.translate(SLOT, Iova(IOVA + 0x800), SZ_4K, False)  # from mid-page, ends mid-page
        assert inside.fault is None and inside.runs == [Run(Hpa(s.hpa(DATA) + 0x800), SZ_4K)]
        for _ in ("cold", "warm"):
            wrote = s.unit.translate(SLOT, Iova(IOVA + 0x800), SZ_4K, True)
            assert wrote.runs == [Run(Hpa(s.hpa(DATA) + 0x800), SZ_4K - 0x800)]
            assert wrote.fault is not None and wrote.fault.reason == FaultReason.NO_WRITE
            assert wrote.fault.iova == IOVA + SZ_4K
    finally:
        s.host.close()
