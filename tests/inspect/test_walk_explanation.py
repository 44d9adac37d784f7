"""``Admin.ExplainIova`` tells the truth: on random mappings (hypothesis,
bounded) the explanation's final HPA or fault reason is what the device's own
IOMMU unit answers for the same device and IOVA, and a translated 4 KiB page
shows four stage-1 levels, each with the stage-2 walk of its table pointer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pviommu.addr import Gpa, Iova
from pviommu.mem.bank import bank_base
from pviommu.pt.common import Perm
from tests.kit.hvkit import HvEnv, MiB
from tests.kit.inspectkit import DATA_START, RAM, Nested, nested

IOVA_BASE = 0x4000_0000
SZ_2M = 2 * MiB
PERMS = [Perm.READ | Perm.WRITE, Perm.READ, Perm.READ | Perm.WRITE | Perm.PRIV]


@pytest.fixture
def rig(make_hv: Callable[..., HvEnv]) -> Nested:
    return nested(make_hv())


# one mapping per 2 MiB IOVA slot: (slot, big, page offset, pages, gpa choice, perm)
mapping = st.tuples(st.integers(0, 15), st.booleans(), st.integers(0, 500), st.integers(1, 8),
                    st.integers(0, 1 << 30), st.sampled_from(PERMS))


def _place(m: tuple[int, bool, int, int, int, Perm]) -> tuple[int, int, int, Perm]:
    slot, big, off, pages, pick, perm = m
    if big:  # a 2 MiB leaf (also over the stage-2 hole and the read-only range)
        gpa = DATA_START + (pick % ((RAM - DATA_START) // SZ_2M)) * SZ_2M
        return IOVA_BASE + slot * SZ_2M, gpa, SZ_2M, perm
    size = pages * 4096
    gpa = DATA_START + (pick % ((RAM - DATA_START - size) // 4096)) * 4096
    return IOVA_BASE + slot * SZ_2M + off * 4096, gpa, size, perm


@settings(settings.get_profile("inspect"), max_examples=40)
@given(maps=st.lists(mapping, min_size=1, max_size=6, unique_by=lambda m: m[0]),
       probes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, SZ_2M - 1), st.booleans()), min_size=4,
                       max_size=10))
def test_explanation_result_equals_the_iommu_units_translation_on_random_mappings(
        rig: Nested, maps: list[tuple[int, bool, int, int, int, Perm]], probes: list[tuple[int, int, bool]]) -> None:
    placed = [_place(m) for m in maps]
    for iova, gpa, size, perm in placed:
        rig.s1.map(Iova(iova), Gpa(gpa), size, perm)
    rig.fake.unit.invalidate_all()
    try:
        targets = []
        for which, off, write in probes:
            if which < len(placed):  # inside a mapping
                iova, _, size, _ = placed[which]
                targets.append((iova + off % size, write))
            else:  # anywhere in the slots (mostly unmapped), or non-canonical
                targets.append((IOVA_BASE + which * 5 * SZ_2M + off if which != 7 else 1 << 47 | off, write))
        for iova, write in targets:
            reply = rig.explain(iova, write)
            runs = rig.fake.unit.translate(rig.slot, Iova(iova), 1, write)
            if runs.fault is None:
                assert reply.ok, (hex(iova), reply.fault_reason_name, reply.fault_detail)
                assert reply.hpa == runs.runs[0].hpa
                assert bank_base(rig.guest.pid) <= reply.hpa < bank_base(rig.guest.pid) + RAM
            else:
                assert not reply.ok, hex(iova)
                assert reply.fault_reason == runs.fault.reason
                assert reply.fault_reason_name == runs.fault.reason_name
            # the would-be context of the domain is the device's live one: same walk, step for step
            assert list(rig.explain(iova, write, by_domain=True).steps) == list(reply.steps)
    finally:
        rig.unmap_all([(iova, size) for iova, _, size, _ in placed])


def test_a_translated_4k_page_shows_four_stage1_levels_each_with_a_stage2_subwalk(rig: Nested) -> None:
    iova, gpa = IOVA_BASE + 0x3000, DATA_START + 0x5000
    rig.s1.map(Iova(iova), Gpa(gpa), 4096, Perm.READ | Perm.WRITE)
    reply = rig.explain(iova + 0x123, write=True)
    assert reply.ok and reply.pgtt == "NESTED"
    assert reply.hpa == bank_base(rig.guest.pid) + gpa + 0x123
    assert [lv.level for lv in reply.levels] == [3, 2, 1, 0]
    assert int(rig.s1.root) == reply.levels[0].table_gpa
    for lv in reply.levels:
        assert lv.has_stage1 and lv.stage1.stage == "S1" and lv.stage1.table == lv.table_gpa
        assert lv.stage2 and all(s.stage == "S2" and s.va == lv.table_gpa for s in lv.stage2)
        assert lv.stage2[-1].note.startswith("OA")  # the table page's GPA reached a stage-2 leaf
    assert [lv.stage1.note for lv in reply.levels] == ["TABLE", "TABLE", "TABLE", "OA"]
    assert reply.final_stage2 and reply.final_stage2[0].va == gpa + 0x123
    assert reply.reads == len([s for s in reply.steps if s.stage in ("S1", "S2")])


def test_a_fault_in_a_table_pointers_stage2_walk_ends_the_levels_without_a_stage1_entry(rig: Nested) -> None:
    """The guest points a level-2 table at a GPA stage 2 leaves unmapped (the hole)."""
    from tests.kit.inspectkit import HOLE

    iova = IOVA_BASE
    rig.s1.map(Iova(iova), Gpa(DATA_START), 4096, Perm.READ | Perm.WRITE)
    ram = rig.guest.ram(rig.env.host_memory())
    steps = rig.explain(iova).levels
    top = steps[0].stage1
    ram.write_u64(Gpa(top.table + top.index * 8), (top.entry & ~0x000F_FFFF_FFFF_F000) | HOLE[0])
    reply = rig.explain(iova)
    assert not reply.ok and reply.fault_reason_name == "SS_NOT_PRESENT"
    assert [lv.has_stage1 for lv in reply.levels] == [True, False]
    assert reply.levels[1].table_gpa == HOLE[0] and reply.levels[1].stage2
    assert not reply.final_stage2
    runs = rig.fake.unit.translate(rig.slot, Iova(iova), 1, False)
    assert runs.fault is not None and runs.fault.reason == reply.fault_reason
