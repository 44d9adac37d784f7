"""Guest-written garbage in stage-1 tables: the unit must fault, never raise,
hang, or touch memory outside the guest's own table entries' A/D bits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pviommu.addr import SZ_4K, Gpa, Iova
from pviommu.iommu.fault import FaultReason
from pviommu.pt.common import RW
from pviommu.pt.fmt.x86_64 import A, D
from tests.kit.core_env import DATA, SLOT, NestedSystem, build_system, u64s

IOVAS = [0x7F00_0000_0000, 0x7F00_0000_1000, 0x7F00_0020_0000, 0x0, 0xFFFF_8000_0000_0000]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NestedSystem, list[Gpa], bytes]]:
    system = build_system(Path(tmp_path_factory.mktemp("hostile")), p1_ram=16 << 20, p2_ram=1 << 20, bank0_size=1 << 20)
    system.s1.map(Iova(IOVAS[0]), Gpa(DATA), 2 * SZ_4K, RW)
    system.s1.map(Iova(IOVAS[2]), Gpa(DATA), SZ_4K, RW)
    tables = sorted({Gpa(step.table) for iova in IOVAS for step in system.s1.walk(Iova(iova))})
    pristine = b"".join(system.ram.read(t, SZ_4K) for t in tables)
    yield system, tables, pristine
    system.host.close()


def _entry(tables: list[Gpa]) -> st.SearchStrategy[int]:
    """Random u64s, plus the nasty ones: self loops, pointers past RAM and
    into the hole, reserved bits, present bits on garbage."""
    addrs = st.sampled_from([*tables, 9 << 20, 15 << 20, 16 << 20, 1 << 47, (1 << 52) - SZ_4K, 10 << 20])
    flags = st.sampled_from([0x27, 0x67, 0xA7, 0xE7, 0x1, 0x21, 0x8000_0000_0000_0027, 0x27 | (1 << 13)])
    return st.integers(0, (1 << 64) - 1) | st.builds(lambda a, f: a | f, addrs, flags)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_stage1_bytes_fault_cleanly_and_touch_nothing_else(
    hostile: tuple[NestedSystem, list[Gpa], bytes], data: st.DataObject
) -> None:
    system, tables, pristine = hostile
    unit = system.new_unit()
    # scribble: some random slots of the live table pages
    for _ in range(data.draw(st.integers(1, 12))):
        table = data.draw(st.sampled_from(tables))
        index = data.draw(st.integers(0, 511) | st.sampled_from([0, 254, 255, 256, 511]))
        system.ram.write_u64(Gpa(table + index * 8), data.draw(_entry(tables)))
    bank0 = system.bank0.read(0, system.bank0.size)
    bank2 = system.bank2.read(0, system.bank2.size)
    ram = system.bank1.read(0, system.bank1.size)
    try:
        for iova in IOVAS:
            for write in (False, True):
                runs = unit.translate(SLOT, Iova(iova), 3 * SZ_4K, write)
                assert runs.fault is None or FaultReason(runs.fault.reason)
                event(runs.fault.reason_name if runs.fault else "translated")
                event("some bytes translated" if runs.done else "nothing translated")
                for run in runs.runs:
                    assert system.bank1.base <= run.hpa
                    assert run.hpa + run.length <= system.bank1.base + system.bank1.size
        assert system.bank0.read(0, system.bank0.size) == bank0
        assert system.bank2.read(0, system.bank2.size) == bank2
        after = system.bank1.read(0, system.bank1.size)
        if after != ram:  # only A/D bits of u64 entries may have been set
            for page in range(0, len(ram), SZ_4K):
                old_page, new_page = ram[page : page + SZ_4K], after[page : page + SZ_4K]
                if old_page != new_page:
                    for old, new in zip(u64s(old_page), u64s(new_page), strict=True):
                        assert old == new or ((new & ~old) & ~(A | D) == 0 and new & old == old)
    finally:
        for i, table in enumerate(tables):
            system.ram.write(table, pristine[i * SZ_4K : (i + 1) * SZ_4K])


def test_table_pointing_at_itself_terminates_with_translation_into_own_ram(
    hostile: tuple[NestedSystem, list[Gpa], bytes],
) -> None:
    system, tables, pristine = hostile
    unit = system.new_unit()
    root = system.s1.root
    try:
        system.ram.write_u64(root, root | 0x27)  # PML4E[0] -> the PML4 itself, at every level
        runs = unit.translate(SLOT, Iova(0), 8, False)
        # level 0 reads the self-pointer as a 4K leaf: the guest maps its own table page
        assert runs.fault is None and runs.runs[0].hpa == system.hpa(root)
        assert unit.stats.walk_reads == 24
    finally:
        for i, table in enumerate(tables):
            system.ram.write(table, pristine[i * SZ_4K : (i + 1) * SZ_4K])
