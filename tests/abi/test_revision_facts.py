"""The revision profiles say what shared/reference/hyperv-series-revisions.md says, table by table.

Expected values are written here from the reference (tables 1-4, section 5), not derived from the
profiles, so a wrong fact in pviommu.abi.revision fails a test.
"""

from __future__ import annotations

import pytest

from pviommu.abi.hv_status import HvStatus
from pviommu.abi.revision import (
    DEFAULT_REVISION,
    FLUSH_LIST_CAPACITY,
    LATEST,
    PROFILES,
    FlushFallback,
    FlushListStyle,
    OutputPlacement,
    PgsizePolicy,
    Revision,
    StaticInit,
    profile,
)


def test_v2_is_the_latest_and_the_default_and_names_parse() -> None:
    assert LATEST is DEFAULT_REVISION is Revision.V2
    assert [r.value for r in Revision] == ["rfc", "v1", "v2"]
    assert Revision.parse(" V1 ") is Revision.V1 and profile("rfc").revision is Revision.RFC
    with pytest.raises(ValueError, match="one of rfc, v1, v2"):
        Revision.parse("v3")  # section 7: no posted v3


def test_flush_list_capacity_is_4096_minus_the_32_byte_header_over_8() -> None:
    assert FLUSH_LIST_CAPACITY == (4096 - 32) // 8 == 508


# table 1 -- attach and detach; release_device
ATTACH = {
    # revision: (DETACH first, DETACH ever sent, blocking domain's own op)
    "rfc": (True, True, False),
    "v1": (True, True, False),
    "v2": (False, False, True),
}
RELEASE = {
    # revision: (detach, disable ATS, clear dma_ops)
    "rfc": (True, False, True),
    "v1": (False, True, True),
    "v2": (False, True, False),
}


@pytest.mark.parametrize("rev", ["rfc", "v1", "v2"])
def test_attach_and_release_facts_follow_table_1(rev: str) -> None:
    d = profile(rev).driver
    assert (d.detach_before_attach, d.sends_detach, d.blocking_attach_own_op) == ATTACH[rev]
    assert d.attach_accepts == frozenset({HvStatus.SUCCESS}) == frozenset({0x0})  # 0x66 becomes an errno
    assert (d.release_detaches, d.release_disables_ats, d.release_clears_dma_ops) == RELEASE[rev]
    h = profile(rev).hypervisor
    assert h.attach_replaces is (rev == "v2") and h.blocking_attach_cannot_fail is (rev == "v2")


# table 2 and JG's v1 asks
@pytest.mark.parametrize(("rev", "init", "geometry"), [
    ("rfc", StaticInit.MEMSET_THEN_SET, True),
    ("v1", StaticInit.SET_IN_C, True),
    ("v2", StaticInit.STATIC_INITIALIZERS, False),
])
def test_static_domain_facts_follow_table_2(rev: str, init: StaticInit, geometry: bool) -> None:
    d = profile(rev).driver
    assert d.static_init is init and d.static_domains_have_geometry is geometry
    assert d.sets_dma_ops is (rev != "v2")


# table 3 -- init checks
@pytest.mark.parametrize(("rev", "hook", "logged", "pgsize", "reported_aperture", "top_level"), [
    ("rfc", "device_initcall", False, PgsizePolicy.AS_GIVEN, True, False),
    ("v1", "x86_init.iommu.iommu_init", True, PgsizePolicy.MASK_TO_FORMAT, False, True),
    ("v2", "x86_init.iommu.iommu_init", True, PgsizePolicy.REJECT_OUTSIDE_FORMAT, False, True),
])
def test_init_facts_follow_table_3(rev: str, hook: str, logged: bool, pgsize: PgsizePolicy,
                                   reported_aperture: bool, top_level: bool) -> None:
    d = profile(rev).driver
    assert (d.init_hook, d.caps_failure_logged, d.pgsize_policy) == (hook, logged, pgsize)
    assert (d.aperture_from_reported_width, d.sets_top_level) == (reported_aperture, top_level)
    assert d.create_flags == 0b01  # forward_progress_required = 1, inherit_owning_vtl = 0 (the patch text)


# section 4 -- page-selective flush; section 5 -- output placement, property code
@pytest.mark.parametrize(("rev", "style", "fallback", "capacity", "flags", "align_bug"), [
    ("rfc", FlushListStyle.NONE, FlushFallback.NEVER, 0, 0, False),
    ("v1", FlushListStyle.EXACT_BLOCKS, FlushFallback.ON_OVERFLOW, 508, 0x1, True),
    ("v2", FlushListStyle.COVERING_BLOCK, FlushFallback.ON_ANY_FAILURE, 1, 0x1, False),
])
def test_flush_facts_follow_section_4(rev: str, style: FlushListStyle, fallback: FlushFallback, capacity: int,
                                      flags: int, align_bug: bool) -> None:
    d = profile(rev).driver
    assert (d.flush_list, d.flush_fallback, d.flush_list_capacity) == (style, fallback, capacity)
    assert d.flush_list_flags == flags and d.flush_list_page_align_inclusive_end is align_bug


def test_output_placement_and_property_code_follow_section_5() -> None:
    assert profile("rfc").driver.output_placement is OutputPlacement.SEPARATE_PAGE
    assert profile("v1").driver.output_placement is profile("v2").driver.output_placement is OutputPlacement.AFTER_INPUT
    assert [profile(r).driver.property_code_is_enum for r in ("rfc", "v1", "v2")] == [True, False, False]
    assert set(PROFILES) == set(Revision)
