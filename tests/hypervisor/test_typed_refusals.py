"""Each refused hypercall answers its exact HV status and changes nothing
(``Host.snapshot()`` equal before and after)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.kit.hvkit import (
    ACCESS_DENIED,
    DEVICE_ALREADY_IN_DOMAIN,
    INSUFFICIENT_DEVICE_DOMAINS,
    INVALID_DEVICE_ID,
    INVALID_DEVICE_STATE,
    INVALID_HYPERCALL_INPUT,
    INVALID_PARAMETER,
    PAGE,
    S1,
    S2,
    SUCCESS,
    UNKNOWN_PROPERTY,
    Guest,
    HvEnv,
    MiB,
)

RAM = 16 * MiB
HOLE = (4 * MiB, 2 * MiB)  # MMIO hole [4M, 6M)
RO = (8 * MiB, 2 * MiB)  # read-only [8M, 10M)
ROOT = 1 * MiB


@dataclass
class World:
    env: HvEnv
    g: Guest  # the caller
    h: Guest  # another partition
    dev: int  # g's device, attached to S1 domain 1
    free: int  # g's device in no domain
    hdev: int  # h's device
    loose: int  # a device assigned to nobody


@pytest.fixture
def world(hv: HvEnv) -> World:
    return make_world(hv)


def make_world(hv: HvEnv) -> World:
    g = hv.partition("g", RAM, holes=[HOLE], read_only=[RO])
    h = hv.partition("h", RAM)
    dev, _, _ = hv.device("g-dev", g)
    free, _, _ = hv.device("g-free", g, function=1)
    hdev, _, _ = hv.device("h-dev", h)
    loose, _, _ = hv.device("loose")
    assert g.create(1) == SUCCESS and g.configure(1, ROOT) == SUCCESS and g.attach(1, dev) == SUCCESS
    assert g.create(2) == SUCCESS
    assert g.create(3, dtype=S2) == SUCCESS
    assert g.map(3, 0x10_0000, [0x10]) == (SUCCESS, 1)
    assert h.create(1) == SUCCESS and h.configure(1, ROOT) == SUCCESS and h.attach(1, hdev) == SUCCESS
    return World(hv, g, h, dev, free, hdev, loose)


def refused(w: World, call: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The status ``call(*args, **kwargs)`` answers (an int, (status, reps) or a
    reply), checking nothing changed."""
    result = w.env.unchanged(call, *args, **kwargs)
    if isinstance(result, int):
        return result
    if isinstance(result, tuple):
        return int(result[0])
    return int(result.result.status)  # type: ignore[attr-defined]


# -- partition_id other than SELF / own -> ACCESS_DENIED, for every call --------------------
FOREIGN_CALLS: dict[str, Callable[[World, int], object]] = {
    "get_iommu_capabilities": lambda w, p: w.g.caps(partition_id=p).result.status,
    "get_logical_device_property": lambda w, p: w.g.prop(w.dev, partition_id=p).result.status,
    "create": lambda w, p: w.g.create(7, partition_id=p),
    "delete": lambda w, p: w.g.delete(2, partition_id=p),
    "attach": lambda w, p: w.g.attach(2, w.free, partition_id=p),
    "detach": lambda w, p: w.g.detach(w.dev, partition_id=p),
    "configure": lambda w, p: w.g.configure(2, ROOT, partition_id=p),
    "flush": lambda w, p: w.g.flush(1, partition_id=p),
    "flush_list": lambda w, p: w.g.flush_list(1, [(1, 0)], partition_id=p),
    "map": lambda w, p: w.g.map(3, 0x20_0000, [0x11], partition_id=p),
    "unmap": lambda w, p: w.g.unmap(3, 0x10_0000, 1, partition_id=p),
}


@pytest.mark.parametrize("call", sorted(FOREIGN_CALLS))
def test_foreign_partition_id_is_access_denied_for_every_call(world: World, call: str) -> None:
    fn = FOREIGN_CALLS[call]
    for pid in (world.h.pid, 0, world.g.pid + 100, 0xFFFF_FFFF_FFFF_FFFE):
        status = refused(world, fn, world, pid)
        assert status == ACCESS_DENIED, (call, pid)


# -- domain ids ----------------------------------------------------------------------------
@pytest.mark.parametrize("dom_id", [0, 0xFFFF_FFFF])
def test_reserved_domain_ids_are_invalid_parameter(world: World, dom_id: int) -> None:
    w = world
    for call in (lambda: w.g.create(dom_id), lambda: w.g.create(dom_id, dtype=S2), lambda: w.g.delete(dom_id),
                 lambda: w.g.attach(dom_id, w.free), lambda: w.g.configure(dom_id, ROOT),
                 lambda: w.g.flush(dom_id), lambda: w.g.flush_list(dom_id, [(0, 0)])):
        assert refused(w, call) == INVALID_PARAMETER


def test_unknown_domain_id_is_invalid_parameter(world: World) -> None:
    w = world
    for call in (lambda: w.g.delete(77), lambda: w.g.attach(77, w.free), lambda: w.g.configure(77, ROOT),
                 lambda: w.g.flush(77), lambda: w.g.flush_list(77, [(0, 0)]),
                 lambda: w.g.map(77, 0, [1]), lambda: w.g.unmap(77, 0, 1)):
        assert refused(w, call) == INVALID_PARAMETER


def test_domain_named_with_the_wrong_type_is_invalid_parameter(world: World) -> None:
    w = world
    assert refused(w, lambda: w.g.delete(1, dtype=S2)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.flush(3, dtype=S1)) == INVALID_PARAMETER
    for undefined in (2, 3, 15):  # SOC (root only) and undefined types
        assert refused(w, w.g.create, 9, dtype=undefined) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.create(9, dtype=16)) == INVALID_PARAMETER  # does not fit 4 bits


def test_duplicate_create_is_invalid_parameter(world: World) -> None:
    w = world
    assert refused(w, lambda: w.g.create(2)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.create(2, dtype=S2)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.create(3, dtype=S2)) == INVALID_PARAMETER


@pytest.mark.parametrize("vtl", [0x1, 0x2, 0x10, 0x20, 0x80, 0x100])
def test_owner_vtl_other_than_zero_is_invalid_parameter(world: World, vtl: int) -> None:
    w = world
    for call in (lambda: w.g.create(7, vtl=vtl), lambda: w.g.delete(2, vtl=vtl),
                 lambda: w.g.attach(2, w.free, vtl=vtl), lambda: w.g.configure(2, ROOT, vtl=vtl),
                 lambda: w.g.flush(1, vtl=vtl), lambda: w.g.map(3, 0x20_0000, [0x11], vtl=vtl)):
        assert refused(w, call) == INVALID_PARAMETER


def test_create_flags_with_undefined_bits_are_invalid_parameter(world: World) -> None:
    assert refused(world, lambda: world.g.create(7, flags=0x4)) == INVALID_PARAMETER
    assert world.g.create(7, flags=0x3) == SUCCESS  # both defined bits are accepted


# -- devices -------------------------------------------------------------------------------
def test_unknown_property_code_is_unknown_property(world: World) -> None:
    for code in (0, 9, 11, 0xFFFF_FFFF):
        assert refused(world, world.g.prop, world.dev, code=code) == UNKNOWN_PROPERTY
        assert world.g.prop(world.dev, code=code).device_iommu == 0


def test_unknown_device_is_invalid_device_id(world: World) -> None:
    w = world
    missing = max(w.dev, w.free, w.hdev, w.loose) + 1
    for dev in (missing, 0, w.dev | 1 << 62):  # no such id; id 0; a PCI-typed id
        assert refused(w, w.g.prop, dev) == INVALID_DEVICE_ID
        assert refused(w, w.g.attach, 2, dev) == INVALID_DEVICE_ID
        assert refused(w, w.g.detach, dev) == INVALID_DEVICE_ID


def test_another_partitions_or_unassigned_device_is_access_denied(world: World) -> None:
    w = world
    for dev in (w.hdev, w.loose):
        assert refused(w, w.g.prop, dev) == ACCESS_DENIED
        assert refused(w, w.g.attach, 2, dev) == ACCESS_DENIED
        assert refused(w, w.g.detach, dev) == ACCESS_DENIED


@pytest.mark.parametrize("revision", ["rfc", "v1"])
def test_rfc_and_v1_refuse_attaching_a_device_already_in_a_domain_with_0x66(make_hv, revision: str) -> None:
    w = make_world(make_hv("--s2-baseline", "--revision", revision))
    assert refused(w, lambda: w.g.attach(2, w.dev)) == DEVICE_ALREADY_IN_DOMAIN == 0x66
    assert refused(w, lambda: w.g.attach(1, w.dev)) == DEVICE_ALREADY_IN_DOMAIN
    assert refused(w, lambda: w.g.attach(3, w.dev, dtype=S2)) == DEVICE_ALREADY_IN_DOMAIN


@pytest.mark.parametrize("revision", ["rfc", "v1", "v2"])
def test_attaching_a_device_to_its_own_domain_is_0x66_in_every_revision(make_hv, revision: str) -> None:
    w = make_world(make_hv("--s2-baseline", "--revision", revision))
    assert refused(w, lambda: w.g.attach(1, w.dev)) == DEVICE_ALREADY_IN_DOMAIN == 0x66


def test_detaching_a_device_in_no_domain_is_invalid_device_state(world: World) -> None:
    assert refused(world, lambda: world.g.detach(world.free)) == INVALID_DEVICE_STATE


def test_deleting_an_attached_domain_is_invalid_device_state(world: World) -> None:
    assert refused(world, lambda: world.g.delete(1)) == INVALID_DEVICE_STATE


# -- configure ------------------------------------------------------------------------------
@pytest.mark.parametrize("root", [RAM, RAM + PAGE, 1 << 40, ROOT + 8, ROOT + 0x800, HOLE[0], HOLE[0] + HOLE[1] - PAGE])
def test_stage1_root_outside_ram_unaligned_or_in_a_hole_is_invalid_parameter(world: World, root: int) -> None:
    assert refused(world, lambda: world.g.configure(2, root)) == INVALID_PARAMETER
    assert refused(world, lambda: world.g.configure(1, root)) == INVALID_PARAMETER  # a live domain too


def test_five_level_without_the_capability_is_invalid_parameter(world: World) -> None:
    assert refused(world, lambda: world.g.configure(2, ROOT, five=True)) == INVALID_PARAMETER


def test_five_level_with_the_capability_is_accepted(make_hv) -> None:
    env = make_hv("--five-level")
    g = env.partition()
    assert g.create(1) == SUCCESS
    assert g.configure(1, ROOT, five=True) == SUCCESS
    assert env.domains(g.pid)[(g.pid, 1)].five_level


def test_configure_of_an_s2_domain_is_invalid_parameter(world: World) -> None:
    assert refused(world, lambda: world.g.configure(3, ROOT, dtype=S2)) == INVALID_PARAMETER


def test_domains_beyond_the_limit_are_insufficient_device_domains(make_hv) -> None:
    env = make_hv("--max-domains", "2", "--s2-baseline")
    g = env.partition()
    assert g.create(1) == SUCCESS
    assert g.create(2, dtype=S2) == SUCCESS
    for dtype in (S1, S2):
        assert env.unchanged(g.create, 3, dtype=dtype) == INSUFFICIENT_DEVICE_DOMAINS == 0x38
    assert g.delete(1) == SUCCESS
    assert g.create(3) == SUCCESS  # room again after a delete
    other = env.partition()  # the limit is per partition
    assert other.create(1) == SUCCESS and other.create(2) == SUCCESS


# -- flush -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [1, 2, 0x8000_0000])
def test_flush_flags_other_than_zero_are_invalid_parameter(world: World, flags: int) -> None:
    assert refused(world, lambda: world.g.flush(1, flags=flags)) == INVALID_PARAMETER


def test_flush_list_refusals(world: World) -> None:
    w = world
    assert refused(w, lambda: w.g.flush_list(1, [(1, 0)], flags=2)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.flush_list(1, [])) == INVALID_HYPERCALL_INPUT
    assert refused(w, lambda: w.g.flush_list(1, [(1, 1)])) == INVALID_PARAMETER  # page not aligned to 2^1
    assert refused(w, lambda: w.g.flush_list(1, [(0, 53)])) == INVALID_PARAMETER  # mask beyond 52
    assert refused(w, lambda: w.g.flush_list(1, [(1 << 52, 0)])) == INVALID_PARAMETER  # page number > 52 bits
    assert w.g.flush_list(1, [(2, 1)], flags=1) == (SUCCESS, 1)  # IOMMU_FORMAT is a defined flag


# -- map / unmap -----------------------------------------------------------------------------
def test_map_into_an_s1_domain_is_invalid_parameter(world: World) -> None:
    assert refused(world, lambda: world.g.map(2, 0x20_0000, [0x11], dtype=S1)) == INVALID_PARAMETER
    assert refused(world, lambda: world.g.unmap(2, 0x20_0000, 1, dtype=S1)) == INVALID_PARAMETER


@pytest.mark.parametrize("pfn", [RAM // PAGE, RAM // PAGE + 5, 1 << 40, HOLE[0] // PAGE,
                                 (HOLE[0] + HOLE[1]) // PAGE - 1])
def test_map_of_a_gpa_outside_ram_or_in_a_hole_is_invalid_parameter(world: World, pfn: int) -> None:
    status, reps = world.env.unchanged(lambda: world.g.map(3, 0x20_0000, [pfn]))
    assert (status, reps) == (INVALID_PARAMETER, 0)


def test_map_of_a_read_only_gpa_writable_is_access_denied(world: World) -> None:
    pfn = RO[0] // PAGE
    for flags in (2, 3):
        status, reps = world.env.unchanged(world.g.map, 3, 0x20_0000, [pfn], flags=flags)
        assert (status, reps) == (ACCESS_DENIED, 0)


def test_map_refusals_of_flags_alignment_and_overlap(world: World) -> None:
    w = world
    assert refused(w, lambda: w.g.map(3, 0x20_0000, [0x11], flags=0)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.map(3, 0x20_0000, [0x11], flags=4)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.map(3, 0x20_0800, [0x11])) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.map(3, 0x10_0000, [0x12])) == INVALID_PARAMETER  # IOVA already mapped
    assert refused(w, lambda: w.g.map(3, 0x20_0000, [])) == INVALID_HYPERCALL_INPUT
    assert refused(w, lambda: w.g.unmap(3, 0x10_0800, 1)) == INVALID_PARAMETER
    assert refused(w, lambda: w.g.unmap(3, 0x10_0000, 0)) == INVALID_HYPERCALL_INPUT


def test_map_stops_at_the_first_bad_page_and_reports_reps_completed(world: World) -> None:
    w = world
    status, reps = w.g.map(3, 0x40_0000, [0x20, 0x21, RAM // PAGE, 0x22])
    assert (status, reps) == (INVALID_PARAMETER, 2)
    dom = w.env.host.partitions[w.g.pid].domains[3]
    assert dom.mapped_pages == 3  # the one from the fixture and the two done
