"""The raw ``HvCall`` method, byte for byte.

Every input block is packed here by hand at the offsets of
shared/reference/hyperv-guest-iommu.md (``struct.pack_into`` at explicit
offsets), the input value is built by hand (code bits 0-15, rep count 32-43,
rep start 48-59) and the result value decoded by hand (status bits 0-15,
reps completed 32-43). Nothing here uses ``pviommu.abi.hv``'s encoder.
"""

from __future__ import annotations

import struct

import pytest

from pviommu.addr import Iova
from pviommu.mem.bank import bank_base
from pviommu.v1 import hypervisor_pb2
from tests.kit.hvkit import (
    ATTACH,
    CAP_PRESENT,
    CAP_S1,
    CAP_S1_5LVL,
    CONFIGURE,
    CREATE,
    DELETE,
    DETACH,
    FLUSH,
    FLUSH_LIST,
    GET_CAPS,
    GET_PROPERTY,
    INVALID_HYPERCALL_CODE,
    INVALID_HYPERCALL_INPUT,
    INVALID_PARAMETER,
    MAP,
    PAGE,
    S2,
    SUCCESS,
    UNMAP,
    Guest,
    HvEnv,
    MiB,
)
from tests.kit.rawabi import (
    attach_in,
    call,
    caps_in,
    configure_in,
    create_in,
    delete_in,
    detach_in,
    device_domain,
    flush_in,
    flush_list_in,
    map_in,
    prop_in,
    unmap_in,
    value,
)


# ------------------------------------------------------------------------------------------
# success paths
# ------------------------------------------------------------------------------------------
def test_raw_get_iommu_capabilities_output_bytes(make_hv) -> None:
    g = make_hv().partition()  # the default hypervisor: HV_IOMMU_CAP_S2 clear
    status, reps, out = call(g, value(GET_CAPS), caps_in())
    assert (status, reps) == (SUCCESS, 0)
    assert len(out) == 24
    assert struct.unpack_from("<I", out, 0)[0] == 24  # size
    assert struct.unpack_from("<H", out, 4)[0] == 0  # reserved
    assert out[6] == 48  # max_iova_width
    assert out[7] == 0  # max_pasid_width
    assert struct.unpack_from("<Q", out, 8)[0] == CAP_PRESENT | CAP_S1
    assert struct.unpack_from("<Q", out, 16)[0] == 0x4020_1000  # 4K | 2M | 1G
    assert out == bytes.fromhex("18000000" "0000" "30" "00" "0500000000000000" "0010204000000000")
    assert call(g, value(GET_CAPS), caps_in(pid=g.pid))[0] == SUCCESS


def test_raw_get_iommu_capabilities_five_level(make_hv) -> None:
    g = make_hv("--five-level").partition()
    status, _, out = call(g, value(GET_CAPS), caps_in())
    assert status == SUCCESS
    assert out[6] == 57
    assert struct.unpack_from("<Q", out, 8)[0] == CAP_PRESENT | CAP_S1 | CAP_S1_5LVL


def test_raw_result_value_has_no_bits_outside_status_and_reps(hv: HvEnv) -> None:
    g = hv.partition()
    assert g.create(3) == SUCCESS
    for v, data in ((value(GET_CAPS), caps_in()), (value(0x0001), b""),
                    (value(FLUSH_LIST, 2), flush_list_in(3, [(0, 0), (1, 0)]))):
        r = g.stub.HvCall(hypervisor_pb2.HvCallRequest(input_value=v, input=data))
        assert r.result_value & ~(0xFFFF | 0xFFF << 32) == 0


def test_raw_get_logical_device_property_output_bytes(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, _ = hv.device("d", g)
    status, reps, out = call(g, value(GET_PROPERTY), prop_in(dev))
    assert (status, reps) == (SUCCESS, 0)
    assert out == bytes.fromhex("0100000000000000" "0000000000000000")  # device_iommu bit0, reserved


def test_raw_domain_life_cycle(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, fake = hv.device("d", g)
    assert call(g, value(CREATE), create_in(0x1234)) == (SUCCESS, 0, b"")
    assert call(g, value(CREATE), create_in(0x1235) + bytes(4)) == (SUCCESS, 0, b"")  # padded to 32
    assert call(g, value(CONFIGURE), configure_in(0x1234, 2 * MiB)) == (SUCCESS, 0, b"")
    info = hv.domains(g.pid)[(g.pid, 0x1234)]
    assert info.configured and info.translation_enabled and info.page_table_root == 2 * MiB
    assert call(g, value(ATTACH), attach_in(0x1234, dev)) == (SUCCESS, 0, b"")
    assert hv.admin_devices()[dev].domain_id == 0x1234
    before = len(fake.servicer.invalidations)
    assert call(g, value(FLUSH), flush_in(0x1234)) == (SUCCESS, 0, b"")
    assert [c[:2] for c in fake.servicer.invalidations[before:]] == [("domain", info.tag)]
    assert call(g, value(DETACH), detach_in(dev)) == (SUCCESS, 0, b"")
    assert hv.admin_devices()[dev].domain_id == 0
    assert call(g, value(DELETE), delete_in(0x1234)) == (SUCCESS, 0, b"")
    assert (g.pid, 0x1234) not in hv.domains(g.pid)


def test_raw_flush_list_reps_and_rep_start(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, fake = hv.device("d", g)
    assert g.create(4) == SUCCESS and g.configure(4, MiB) == SUCCESS and g.attach(4, dev) == SUCCESS
    tag = hv.domains(g.pid)[(g.pid, 4)].tag
    elems = [(0x10, 0), (0x20, 1), (0x40, 2)]
    before = len(fake.servicer.invalidations)
    status, reps, out = call(g, value(FLUSH_LIST, 3), flush_list_in(4, elems))
    assert (status, reps, out) == (SUCCESS, 3, b"")
    assert [c[:4] for c in fake.servicer.invalidations[before:]] == [
        ("pages", tag, 0x10 * PAGE, 0), ("pages", tag, 0x20 * PAGE, 1), ("pages", tag, 0x40 * PAGE, 2)]
    # resuming from element 1: reps completed counts from element 0 (TLFS)
    before = len(fake.servicer.invalidations)
    status, reps, _ = call(g, value(FLUSH_LIST, 3, start=1), flush_list_in(4, elems))
    assert (status, reps) == (SUCCESS, 3)
    assert [c[2] for c in fake.servicer.invalidations[before:]] == [0x20 * PAGE, 0x40 * PAGE]


def test_raw_map_and_unmap(hv: HvEnv) -> None:
    g = hv.partition()
    assert g.create(6, dtype=S2) == SUCCESS
    table = hv.host.partitions[g.pid].domains[6].table
    va = 0x8000_0000
    status, reps, out = call(g, value(MAP, 3), map_in(6, va, [0x100, 0x2FF, 0x5]))
    assert (status, reps, out) == (SUCCESS, 3, b"")
    for i, pfn in enumerate([0x100, 0x2FF, 0x5]):
        tr = table.lookup(Iova(va + i * PAGE))
        assert tr is not None and tr.oa == bank_base(g.pid) + pfn * PAGE
    status, reps, _ = call(g, value(UNMAP, 2, start=1), unmap_in(6, va))  # pages 1..1 of 2
    assert (status, reps) == (SUCCESS, 2)
    assert table.lookup(Iova(va)) is not None
    assert table.lookup(Iova(va + PAGE)) is None
    status, reps, _ = call(g, value(UNMAP, 3), unmap_in(6, va))
    assert (status, reps) == (SUCCESS, 3)
    assert all(table.lookup(Iova(va + i * PAGE)) is None for i in range(3))


# ------------------------------------------------------------------------------------------
# refusals: status and no state change
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [0x0000, 0x0001, 0x00B0, 0x00B5, 0x00C3, 0x00CF, 0x00D5, 0x0126, 0x0082, 0xFFFF])
def test_raw_unknown_code_is_invalid_hypercall_code(hv: HvEnv, code: int) -> None:
    g = hv.partition()
    for data in (b"", caps_in(), bytes(4096)):
        status, reps, out = hv.unchanged(call, g, value(code), data)
        assert (status, reps, out) == (INVALID_HYPERCALL_CODE, 0, b"")
    # the code is judged before the rep fields
    assert hv.unchanged(call, g, value(code, 5, 7), b"")[0] == INVALID_HYPERCALL_CODE


SIMPLE = {
    GET_CAPS: caps_in(),
    GET_PROPERTY: prop_in(1),
    CREATE: create_in(9),
    DELETE: delete_in(9),
    ATTACH: attach_in(9, 1),
    DETACH: detach_in(1),
    CONFIGURE: configure_in(9, MiB),
    FLUSH: flush_in(9),
}


@pytest.mark.parametrize("code", sorted(SIMPLE))
def test_raw_truncated_or_oversized_input_is_invalid_hypercall_input(hv: HvEnv, code: int) -> None:
    g = hv.partition()
    data = SIMPLE[code]
    padded = (len(data) + 7) & ~7
    for bad in (b"", data[:-1], data[:8], data + bytes(padded - len(data) + 1), data + bytes(padded - len(data) + 8)):
        assert hv.unchanged(call, g, value(code), bad)[0] == INVALID_HYPERCALL_INPUT, (hex(code), len(bad))


def test_raw_rep_calls_need_exactly_header_plus_elements(hv: HvEnv) -> None:
    g = hv.partition()
    assert g.create(9) == SUCCESS and g.create(8, dtype=S2) == SUCCESS
    fl = flush_list_in(9, [(1, 0), (2, 0)])
    mp = map_in(8, 0, [1, 2])
    for v, bad in ((value(FLUSH_LIST, 2), fl[:-1]), (value(FLUSH_LIST, 2), fl + bytes(8)),
                   (value(FLUSH_LIST, 3), fl), (value(MAP, 2), mp[:-8]), (value(MAP, 1), mp),
                   (value(UNMAP, 1), unmap_in(8, 0)[:-1]), (value(UNMAP, 1), unmap_in(8, 0) + bytes(8))):
        assert hv.unchanged(call, g, v, bad)[0] == INVALID_HYPERCALL_INPUT


@pytest.mark.parametrize("code", sorted(SIMPLE))
def test_raw_rep_count_or_start_on_a_simple_call_is_invalid_hypercall_input(hv: HvEnv, code: int) -> None:
    g = hv.partition()
    for v in (value(code, 1), value(code, 0xFFF), value(code, 0, 1), value(code, 2, 1)):
        assert hv.unchanged(call, g, v, SIMPLE[code])[0] == INVALID_HYPERCALL_INPUT


def test_raw_zero_reps_or_bad_rep_start_on_a_rep_call_is_invalid_hypercall_input(hv: HvEnv) -> None:
    g = hv.partition()
    assert g.create(9) == SUCCESS and g.create(8, dtype=S2) == SUCCESS
    cases = [
        (value(FLUSH_LIST, 0), flush_list_in(9, [])),
        (value(MAP, 0), map_in(8, 0, [])),
        (value(UNMAP, 0), unmap_in(8, 0)),
        (value(FLUSH_LIST, 1, start=1), flush_list_in(9, [(1, 0)])),  # start == count
        (value(MAP, 2, start=3), map_in(8, 0, [1, 2])),
        (value(UNMAP, 1, start=1), unmap_in(8, 0)),
    ]
    for v, data in cases:
        assert hv.unchanged(call, g, v, data)[0] == INVALID_HYPERCALL_INPUT


@pytest.mark.parametrize("bit", [16, 17, 26, 27, 30, 31, 44, 47, 60, 63])
def test_raw_reserved_fast_varhead_nested_bits_of_the_input_value_are_invalid_hypercall_input(
        hv: HvEnv, bit: int) -> None:
    g = hv.partition()
    assert hv.unchanged(call, g, value(GET_CAPS) | 1 << bit, caps_in())[0] == INVALID_HYPERCALL_INPUT


def test_raw_reserved_fields_inside_the_input_are_invalid_parameter(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, _ = hv.device("d", g)
    assert g.create(9) == SUCCESS and g.configure(9, MiB) == SUCCESS and g.create(8, dtype=S2) == SUCCESS
    cases = [
        (value(GET_CAPS), caps_in(reserved=1)),
        (value(GET_CAPS), caps_in(reserved=1 << 63)),
        (value(GET_PROPERTY), prop_in(dev, reserved=1)),
        (value(CREATE), create_in(7, rsvd=1)),  # domain_id bits 4-31
        (value(CREATE), create_in(7, rsvd=1 << 27)),
        (value(CREATE), create_in(7, vtl=0x20)),  # hv_input_vtl.reserved_z
        (value(CREATE), create_in(7, flags=0x4)),
        (value(CREATE), create_in(7, flags=0x8000_0000)),
        (value(DELETE), delete_in(9, rsvd=0x0FFF_FFFF)),
        (value(ATTACH), attach_in(9, dev, vtl=0x80)),
        (value(CONFIGURE), configure_in(9, MiB, flags=1 | 1 << 3)),  # settings bits 3-63
        (value(CONFIGURE), configure_in(9, MiB, flags=1 | 1 << 63)),
        (value(FLUSH), flush_in(9, flags=1)),  # no flush flag is defined
        (value(FLUSH), flush_in(9, reserved=1)),
        (value(FLUSH_LIST, 1), flush_list_in(9, [(0, 0)], flags=2)),
        (value(FLUSH_LIST, 1), flush_list_in(9, [(0, 0)], reserved=1)),
        (value(MAP, 1), map_in(8, 0, [1], flags=4)),
        (value(MAP, 1), map_in(8, 0, [1], vtl=0x40)),
    ]
    for v, data in cases:
        assert hv.unchanged(call, g, v, data)[0] == INVALID_PARAMETER, data.hex()


def test_raw_padding_is_ignored(hv: HvEnv) -> None:
    g = hv.partition()
    b = bytearray(create_in(7) + b"\xAA" * 4)  # trailing pad of create (28 -> 32)
    b[9:16] = b"\xFF" * 7  # hv_input_device_domain.padding[7]
    assert call(g, value(CREATE), bytes(b))[0] == SUCCESS
    assert (g.pid, 7) in hv.domains(g.pid)


# ------------------------------------------------------------------------------------------
# typed and raw change the state the same way
# ------------------------------------------------------------------------------------------
GUID = bytes(range(16))


def _typed_step(g: Guest, dev: int, step: str) -> int:
    return {
        "create": lambda: g.create(5, flags=1),
        "configure": lambda: g.configure(5, 3 * MiB),
        "attach": lambda: g.attach(5, dev),
        "create_s2": lambda: g.create(6, dtype=S2),
        "map": lambda: g.map(6, 0x4000_0000, [0x10, 0x11, 0x12])[0],
        "unmap": lambda: g.unmap(6, 0x4000_1000, 1)[0],
        "flush": lambda: g.flush(5),
        "flush_list": lambda: g.flush_list(5, [(0x10, 0), (0x20, 4)])[0],
        "detach": lambda: g.detach(dev),
        "delete": lambda: g.delete(5),
        "reconfigure_blocked": lambda: g.configure(6, 0, translation=True, blocked=True, dtype=S2),
    }[step]()


def _raw_step(g: Guest, dev: int, step: str) -> int:
    v, data = {
        "create": (value(CREATE), create_in(5, flags=1)),
        "configure": (value(CONFIGURE), configure_in(5, 3 * MiB)),
        "attach": (value(ATTACH), attach_in(5, dev)),
        "create_s2": (value(CREATE), create_in(6, S2)),
        "map": (value(MAP, 3), map_in(6, 0x4000_0000, [0x10, 0x11, 0x12])),
        "unmap": (value(UNMAP, 1), unmap_in(6, 0x4000_1000)),
        "flush": (value(FLUSH), flush_in(5)),
        "flush_list": (value(FLUSH_LIST, 2), flush_list_in(5, [(0x10, 0), (0x20, 4)])),
        "detach": (value(DETACH), detach_in(dev)),
        "delete": (value(DELETE), delete_in(5)),
        "reconfigure_blocked": (value(CONFIGURE),
                                bytes(device_domain(6, S2, size=40)[:24]) + struct.pack("<QQ", 3, 0)),
    }[step]
    return call(g, v, data)[0]


def test_typed_and_raw_calls_make_the_same_state_changes(make_hv) -> None:
    typed_env, raw_env = make_hv("--s2-baseline"), make_hv("--s2-baseline")
    tg, rg = typed_env.partition("p"), raw_env.partition("p")
    tdev, _, _ = typed_env.device("d", tg, guid=GUID)
    rdev, _, _ = raw_env.device("d", rg, guid=GUID)
    assert tdev == rdev
    assert typed_env.host.snapshot() == raw_env.host.snapshot()
    for step in ("create", "configure", "attach", "create_s2", "map", "unmap", "flush", "flush_list",
                 "reconfigure_blocked", "detach", "delete"):
        ts, rs = _typed_step(tg, tdev, step), _raw_step(rg, rdev, step)
        assert ts == rs, step
        assert typed_env.host.snapshot() == raw_env.host.snapshot(), step
