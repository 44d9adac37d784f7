"""Hostile stage-1 tables, system level: a guest writes anything into its
page-table pages (and points its domain at anything), then its DSA device
runs descriptors of every kind through the real IOMMU unit.

After every step: no byte of partition B or of bank 0 changed; bytes of
partition A changed only in pages that a write translation reached -- each
checked against an independent reference walk and against stage 2 -- or in
the Accessed/Dirty bits of entries the walks read; the unit answered exactly
what the reference walker answers; every completion is a defined DSA status;
the hypervisor still answers and a known-good MEMMOVE still succeeds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pviommu.abi import hv
from pviommu.abi.dsa import DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa
from pviommu.mem.bank import bank_base
from tests.kit import robustkit as rk
from tests.kit.descstrategies import draw_descriptor
from tests.kit.dsarig import (
    A_RAM,
    COMP_GPA,
    DATA_GPA,
    HOLE,
    PAGE,
    RO,
    UNMAPPED_GPA,
    DsaRig,
    check_device_statuses,
    check_isolation,
)

U64 = (1 << 64) - 1


def make_rig(tmp: Path, five_level: bool = False) -> DsaRig:
    return DsaRig(tmp, five_level=five_level)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DsaRig]:
    r = make_rig(Path(tmp_path_factory.mktemp("stage1")))
    yield r
    r.close()


@pytest.fixture(scope="module")
def rig5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DsaRig]:
    r = make_rig(Path(tmp_path_factory.mktemp("stage1-5lvl")), five_level=True)
    yield r
    r.close()


# -- what a hostile guest writes ------------------------------------------------------------
FLAGS = [0x27, 0x67, 0xA7, 0xE7, 0x07, 0x87, 0x03, 0x25, 0x8000_0000_0000_0027, 0x27 | 1 << 13, 0xA7 | 1 << 13,
         0xA7 | 1 << 20, 0x27 | 1 << 51, 0x27 | 1 << 48, 0x27 | 0x7FF << 52, 0x01, 0x21, 0xA5]


def targets(rig: DsaRig) -> list[int]:
    """Addresses a hostile entry points at: its own tables (loops), the root,
    the MMIO hole, the read-only range, past RAM, bank bases used as GPAs
    (bank 0, A, B), the MSI window, the top of the address width."""
    return sorted({*rig.table_pages, rig.root, HOLE[0], HOLE[0] + HOLE[1] - PAGE, RO[0],
                   DATA_GPA, COMP_GPA, UNMAPPED_GPA, A_RAM, A_RAM - PAGE, 1 << 30,
                   int(bank_base(0)), int(bank_base(rig.A.bank.index)), int(bank_base(rig.B.bank.index)),
                   0xFEE0_0000, (1 << 47), (1 << 48) - PAGE, (1 << 52) - PAGE, 0})


def entry_strategy(rig: DsaRig) -> st.SearchStrategy[int]:
    structured = st.builds(lambda a, f, low: (a | f | low) & U64, st.sampled_from(targets(rig)), st.sampled_from(FLAGS),
                           st.sampled_from([0, 0, 1 << 21, 1 << 12, 0x1000 * 7]))
    return st.one_of(structured, structured, st.integers(0, U64), st.just(0))


def sign_extend(iova: int, levels: int) -> int:
    width = 12 + 9 * levels
    return iova | (U64 & ~((1 << width) - 1)) if iova >> (width - 1) & 1 else iova


def iova_strategy(rig: DsaRig, hot: list[int]) -> st.SearchStrategy[int]:
    benign = st.builds(lambda base, off: base + off, st.sampled_from(rig.benign_iovas), st.integers(0, 0x1_0000))
    odd = st.sampled_from([0, 0x1000, 1 << 47, (1 << 47) - PAGE, 0x8000_0000_0000_0000, U64, U64 - 0xFFF,
                           0xFFFF_8000_0000_0000, 0x0000_8000_0000_1000, 1 << 56, 0xFEE0_0000, A_RAM])
    parts = [benign, odd, st.integers(0, U64)]
    if hot:
        parts += [st.sampled_from(hot)] * 4
    return st.one_of(*parts)


# -- one hostile step ---------------------------------------------------------------------------
def hostile_step(rig: DsaRig, data: st.DataObject) -> None:
    rig.restore()
    levels = rig.levels
    roots: list[int] = [rig.root]
    how = data.draw(st.sampled_from(["benign"] * 5 + ["data page", "s2 read-only page", "leaf table", "refused"]),
                    label="root")
    if how == "data page":
        roots = [DATA_GPA]
    elif how == "s2 read-only page":
        # a copy of the real root, Accessed bits cleared, in RAM stage 2 maps read-only:
        # the unit may read it but must not set A there (fault 0x77, nothing written)
        root_bytes = bytearray(rig.ram.read(Gpa(rig.root), PAGE))
        for i in range(0, PAGE, 8):
            root_bytes[i] &= ~0x20
        rig.ram.write(Gpa(RO[0]), bytes(root_bytes))
        roots = [RO[0]]
    elif how == "leaf table":
        roots = [min(g for g, (lvl, _) in rig.table_pages.items() if lvl == 0)]
    elif how == "refused":
        bad = data.draw(st.sampled_from([HOLE[0], HOLE[0] + PAGE, A_RAM, rig.root + 8, U64 & ~0xFFF,
                                         int(bank_base(rig.B.bank.index)), 1 << 52]), label="bad root")
        state = rig.host.snapshot()
        assert rig.configure(bad, five=levels == 5) == HvStatus.INVALID_PARAMETER
        assert rig.host.snapshot() == state
        rk.count("stage1_refused_roots")
    if roots[0] != rig.root:
        rig.point_at(roots[0])
    event(f"root: {how}")
    # the guest scribbles into its table pages
    pages = sorted({*rig.table_pages, *roots})
    hot: list[int] = []
    writes = data.draw(st.integers(1, 12), label="writes")
    entry = entry_strategy(rig)
    for _ in range(writes):
        page = data.draw(st.sampled_from(pages), label="table page")
        idx = data.draw(st.integers(0, 511), label="index")
        rig.ram.write_u64(Gpa(page + idx * 8), data.draw(entry, label="entry"))
        level, prefix = (levels - 1, 0) if page in roots else rig.table_pages[page]
        shift = 12 + 9 * level
        low = data.draw(st.integers(0, (1 << shift) - 1), label="low") & ~7
        hot.append(sign_extend(prefix | idx << shift | low, levels))
    rk.count("stage1_hostile_entries", writes)
    if data.draw(st.integers(0, 4), label="garbage page") == 0:
        page = data.draw(st.sampled_from(pages), label="garbage target")
        rig.ram.write(Gpa(page), random.Random(data.draw(st.integers(0, 2**32), label="seed")).randbytes(PAGE))
        rk.count("stage1_random_table_pages")
    rig.flush()  # the guest flushes after editing, as a driver must
    # the guest prepares its descriptors (records zeroed, batch lists written) ...
    iovas = iova_strategy(rig, hot)
    n = data.draw(st.integers(1, 4), label="descriptors")
    descs = [draw_descriptor(data, rig, iovas) for _ in range(n)]
    # ... and from here on only the device touches memory
    before = rig.banks()
    rig.recorder.take()
    for desc in descs:
        rig.run(desc)
        event(f"opcode {Opcode(desc.opcode).name}")
    calls = rig.recorder.take()
    numbers = check_isolation(rig, before, calls)
    check_device_statuses(rig.device)
    faults = sum(1 for c in calls if c.out.fault is not None)
    for c in calls:
        if c.out.fault is not None:
            event(f"fault {c.out.fault.reason_name}")
    rk.count("stage1_steps")
    rk.count("stage1_descriptors", n)
    rk.count("stage1_translations", len(calls))
    rk.count("stage1_faulted_translations", faults)
    rk.count("stage1_self_modifying_steps", numbers["self_modified"])
    # the services still answer
    assert rig.hypercall(hv.GetIommuCapabilitiesInput()) == HvStatus.SUCCESS
    rig.known_good_memmove()
    rk.count("known_good_memmoves")


@rk.robust_settings(100)
@given(data=st.data())
def test_hostile_stage1_tables_never_let_dma_escape_the_partition(rig: DsaRig, data: st.DataObject) -> None:
    hostile_step(rig, data)


@rk.robust_settings(25)
@given(data=st.data())
def test_hostile_5level_tables_never_let_dma_escape_the_partition(rig5: DsaRig, data: st.DataObject) -> None:
    hostile_step(rig5, data)


def test_5level_root_on_4level_capability_is_refused_and_changes_nothing(rig: DsaRig) -> None:
    rig.restore()
    before = rig.host.snapshot()
    context = rig.host.tables.read_context_raw(rig.dev.slot)
    for root in (rig.root, DATA_GPA, 0):
        assert rig.configure(root, five=True) == HvStatus.INVALID_PARAMETER
    assert rig.host.snapshot() == before
    assert rig.host.tables.read_context_raw(rig.dev.slot) == context
    rig.known_good_memmove()


def test_self_referencing_tables_at_every_level_terminate_inside_own_ram(rig: DsaRig) -> None:
    """Root entry 1 points at the root itself; IOVA 0x80_4020_1000 (index 1 at
    every level) then walks the root four times and lands on the root page as
    a 4 KiB leaf: a fill there rewrites the guest's own table, nothing else,
    and the next page faults."""
    rig.restore()
    rig.ram.write_u64(Gpa(rig.root + 8), rig.root | 0x67)
    rig.flush()
    loop_iova = 1 << 39 | 1 << 30 | 1 << 21 | 1 << 12
    comp = rig.next_comp()
    before = rig.banks()
    rig.run(Descriptor(opcode=Opcode.MEMFILL, flags=int(DescFlags.CRAV | DescFlags.RCR), completion_addr=comp,
                       src_addr=0x4141_4141_4141_4141, dst_addr=loop_iova + 64, xfer_size=3 * PAGE))
    calls = rig.recorder.take()
    check_isolation(rig, before, calls)
    rec = rig.record_at(comp)
    assert rec is not None and rec.code == DsaStatus.PAGE_FAULT_NOBOF and rec.bytes_completed == PAGE - 64
    assert rig.ram.read(Gpa(rig.root + 64), PAGE - 64) == b"\x41" * (PAGE - 64)
    rig.known_good_memmove()
