"""A typed gRPC method and the raw ``HvCall`` answer one HV status for one bad input.

Both paths build the same ``pviommu.abi.hv`` request and the checks live in its constructors, so
undefined flag bits, a rep count of 0 or 4096, and an owner VTL that does not fit ``hv_input_vtl``
get the same status whichever way they come; where one validator answers both, the same message
too. The raw inputs are packed by hand (tests/kit/rawabi.py), the typed ones are plain messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pviommu.v1 import hypervisor_pb2 as pb
from tests.kit.hvkit import (
    CALL_TIMEOUT,
    CREATE,
    FLUSH,
    FLUSH_LIST,
    INVALID_HYPERCALL_INPUT,
    INVALID_PARAMETER,
    MAP,
    S2,
    SUCCESS,
    UNMAP,
    Guest,
    HvEnv,
    dd,
)
from tests.kit.rawabi import create_in, flush_in, flush_list_in, map_in, unmap_in, value

S1_DOM, S2_DOM = 1, 3
VA = 0x20_0000
Answer = tuple[int, str]


def typed(g: Guest, method: str, request: object) -> Answer:
    reply = getattr(g.stub, method)(request, timeout=CALL_TIMEOUT)
    return int(reply.result.status), reply.result.message


def raw(g: Guest, input_value: int, data: bytes) -> Answer:
    reply = g.stub.HvCall(pb.HvCallRequest(input_value=input_value, input=data), timeout=CALL_TIMEOUT)
    return reply.result_value & 0xFFFF, reply.message


@dataclass(frozen=True)
class Case:
    typed: Callable[[Guest], Answer]
    raw: Callable[[Guest], Answer]
    status: int
    #: False: the raw input value is refused before its block is read (4096 reps), or the message
    #: names the field by another path (``owner_vtl`` vs ``flush.device_domain.owner_vtl``)
    same_message: bool = True


def _flush_list(flags: int, n: int, vtl: int = 0) -> Case:
    elems = [(i, 0) for i in range(n)]
    return Case(
        lambda g: typed(g, "FlushDeviceDomainList", pb.FlushDeviceDomainListRequest(
            device_domain=dd(S1_DOM, vtl=vtl), flags=flags,
            list=[pb.FlushVa(page_number=p, page_mask_shift=s) for p, s in elems])),
        lambda g: raw(g, FLUSH_LIST | n << 32, flush_list_in(S1_DOM, elems, flags=flags)),
        INVALID_HYPERCALL_INPUT if not 1 <= n <= 4095 else INVALID_PARAMETER, same_message=n <= 4095)


def _map(flags: int, n: int) -> Case:
    pfns = [0x10 + i for i in range(n)]
    return Case(
        lambda g: typed(g, "MapDeviceGpaPages", pb.MapDeviceGpaPagesRequest(
            device_domain=dd(S2_DOM, S2), map_flags=flags, target_device_va_base=VA, gpa_page_list=pfns)),
        lambda g: raw(g, MAP | n << 32, map_in(S2_DOM, VA, pfns, flags=flags)),
        INVALID_HYPERCALL_INPUT if not 1 <= n <= 4095 else INVALID_PARAMETER, same_message=n <= 4095)


def _unmap(n: int) -> Case:
    return Case(
        lambda g: typed(g, "UnmapDeviceGpaPages", pb.UnmapDeviceGpaPagesRequest(
            device_domain=dd(S2_DOM, S2), target_device_va_base=VA, page_count=n)),
        lambda g: raw(g, UNMAP | n << 32, unmap_in(S2_DOM, VA)),
        INVALID_HYPERCALL_INPUT, same_message=n <= 4095)


def _create(flags: int, typed_vtl: int = 0, raw_vtl: int = 0) -> Case:
    return Case(
        lambda g: typed(g, "CreateDeviceDomain", pb.CreateDeviceDomainRequest(
            device_domain=dd(7, vtl=typed_vtl), flags=flags)),
        lambda g: raw(g, value(CREATE), create_in(7, flags=flags, vtl=raw_vtl)),
        INVALID_PARAMETER, same_message=typed_vtl == raw_vtl == 0)


def _flush(flags: int, typed_vtl: int = 0, raw_vtl: int = 0) -> Case:
    return Case(
        lambda g: typed(g, "FlushDeviceDomain", pb.FlushDeviceDomainRequest(
            device_domain=dd(S1_DOM, vtl=typed_vtl), flags=flags)),
        lambda g: raw(g, value(FLUSH), flush_in(S1_DOM, flags=flags, vtl=raw_vtl)),
        INVALID_PARAMETER, same_message=typed_vtl == raw_vtl == 0)


CASES: dict[str, Case] = {
    # undefined flag bits -> INVALID_PARAMETER
    "create flags bit 2": _create(0x4),
    "create flags bit 31": _create(0x8000_0000),
    "flush flags bit 0 (no flag is defined)": _flush(0x1),
    "flush-list flags bit 1": _flush_list(0x2, 1),
    "map_flags bit 2": _map(0x4, 1),
    # rep count 0 and 4096 -> INVALID_HYPERCALL_INPUT (4096 on the wire sets reserved bit 44)
    "flush-list 0 reps": _flush_list(1, 0),
    "flush-list 4096 reps": _flush_list(1, 4096),
    "map 0 reps": _map(3, 0),
    "map 4096 reps": _map(3, 4096),
    "unmap 0 reps": _unmap(0),
    "unmap 4096 reps": _unmap(4096),
    # the rep count is read first: bad flags and a bad count answer for the count on both paths
    "flush-list bad flags and 0 reps": _flush_list(0x2, 0),
    "map bad map_flags and 0 reps": _map(0x4, 0),
    "map bad map_flags and 4096 reps": _map(0x4, 4096),
    # hv_input_vtl: reserved_z set, or (typed only) a value above 0xFF -> INVALID_PARAMETER
    "owner_vtl reserved_z": _flush(0, typed_vtl=0x20, raw_vtl=0x20),
    "owner_vtl above 0xFF (raw: reserved_z)": _flush(0, typed_vtl=0x100, raw_vtl=0x20),
    "create owner_vtl above 0xFF (raw: reserved_z)": _create(0, typed_vtl=0x1E0, raw_vtl=0xE0),
}


@pytest.fixture
def guest(hv: HvEnv) -> Guest:
    g = hv.partition("g")
    assert g.create(S1_DOM) == SUCCESS and g.configure(S1_DOM, 0x1000) == SUCCESS
    assert g.create(S2_DOM, dtype=S2) == SUCCESS
    return g


@pytest.mark.parametrize("name", list(CASES))
def test_typed_and_raw_give_the_same_status_for_the_same_bad_input(hv: HvEnv, guest: Guest, name: str) -> None:
    case = CASES[name]
    (t_status, t_message), (r_status, r_message) = hv.unchanged(case.typed, guest), hv.unchanged(case.raw, guest)
    assert (t_status, r_status) == (case.status, case.status), (name, t_message, r_message)
    if case.same_message:
        assert t_message == r_message
    elif case.status == INVALID_PARAMETER:
        assert "owner_vtl" in t_message and "owner_vtl" in r_message


def test_the_same_inputs_with_good_fields_succeed_on_both_paths(guest: Guest) -> None:
    """The cases above are refused for the field they change, not for the domain or layout."""
    for answer in (typed(guest, "FlushDeviceDomain", pb.FlushDeviceDomainRequest(device_domain=dd(S1_DOM))),
                   raw(guest, value(FLUSH), flush_in(S1_DOM)),
                   typed(guest, "FlushDeviceDomainList", pb.FlushDeviceDomainListRequest(
                       device_domain=dd(S1_DOM), flags=1, list=[pb.FlushVa(page_number=0)])),
                   raw(guest, value(FLUSH_LIST, 1), flush_list_in(S1_DOM, [(0, 0)], flags=1)),
                   typed(guest, "MapDeviceGpaPages", pb.MapDeviceGpaPagesRequest(
                       device_domain=dd(S2_DOM, S2), map_flags=3, target_device_va_base=VA, gpa_page_list=[0x10])),
                   raw(guest, value(UNMAP, 1), unmap_in(S2_DOM, VA)),
                   raw(guest, value(MAP, 1), map_in(S2_DOM, VA, [0x10], flags=3)),
                   typed(guest, "UnmapDeviceGpaPages", pb.UnmapDeviceGpaPagesRequest(
                       device_domain=dd(S2_DOM, S2), target_device_va_base=VA, page_count=1)),
                   typed(guest, "CreateDeviceDomain", pb.CreateDeviceDomainRequest(device_domain=dd(7), flags=3)),
                   raw(guest, value(CREATE), create_in(8, flags=3))):
        assert answer[0] == SUCCESS, answer
