"""Hostile hypercalls against a real gRPC hypervisor (``main.build``), with a
real IOMMU unit behind a device server (tests/hypervisor/hvkit.FakeDevice).

Every typed method and the raw ``HvCall`` get random and boundary values
(ids 0, 1, 2^32-1, 2^64-1, SELF, the other partition's, random; reserved
fields and bits; rep counts and starts; truncated, oversized, all-zero,
all-ones inputs and valid layouts with one field mutated), under every kind
of credential: none, garbage, the caller's own, the other partition's, the
admin's, a device's.

Every answer: a gRPC error only for a credential problem (UNAUTHENTICATED or
PERMISSION_DENIED), otherwise a defined HV status; a refusal (and any call
that made no progress) leaves ``host.snapshot()`` unchanged; nothing a
partition does changes the other partition's domains, devices or context
entries. Afterwards, deleting everything returns every table frame.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pviommu.abi.hv_status import HvStatus
from pviommu.v1 import admin_pb2, hypervisor_pb2, hypervisor_pb2_grpc
from tests.kit import hvkit  # type: ignore[import-not-found,unused-ignore]
from tests.kit import robustkit as rk

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
SELF = hvkit.SELF
RAM = 16 * hvkit.MiB
CODES = [hvkit.CREATE, hvkit.ATTACH, hvkit.MAP, hvkit.UNMAP, hvkit.DETACH, hvkit.DELETE, hvkit.CONFIGURE,
         hvkit.FLUSH, hvkit.FLUSH_LIST, hvkit.GET_CAPS, hvkit.GET_PROPERTY]
REP_CODES = {hvkit.MAP, hvkit.UNMAP, hvkit.FLUSH_LIST}


@dataclass
class World:
    env: hvkit.HvEnv
    p1: hvkit.Guest
    p2: hvkit.Guest
    devices: dict[str, int]
    stubs: dict[str, hypervisor_pb2_grpc.HypervisorStub]
    baseline_frames: int

    def slot_of(self, logical: int) -> int:
        return int(self.env.host.devices[logical].slot)


@contextlib.contextmanager
def make_world(tmp: Path) -> Iterator[World]:
    """Two partitions, three devices, some domains; torn down on exit (also used by fuzz/)."""
    token_file = tmp / "admin-token"
    token_file.write_text(hvkit.ADMIN_TOKEN)
    env = hvkit.HvEnv.start(tmp, "--admin-token-file", str(token_file), "--flush-timeout", "2",
                            "--bank0-size", str(64 * hvkit.MiB), "--max-domains", "8", "--s2-baseline")
    try:
        p1 = env.partition("p1", RAM, holes=[(8 * hvkit.MiB, 2 * hvkit.MiB)], read_only=[(10 * hvkit.MiB, hvkit.MiB)])
        p2 = env.partition("p2", RAM)
        baseline = env.host.tables.allocated_frames()
        d1, dev_token, _ = env.device("d1", p1)
        d2, _, _ = env.device("d2", p2)
        d3, _, _ = env.device("d3")  # registered, assigned to nobody
        # some state worth protecting: P1 has a nested domain with d1 attached and a
        # baseline domain with mapped pages; P2 has a nested domain with d2 attached
        assert p1.create(1) == hvkit.SUCCESS and p1.configure(1, 0x1000) == hvkit.SUCCESS
        assert p1.attach(1, d1) == hvkit.SUCCESS
        assert p1.create(2, hvkit.S2) == hvkit.SUCCESS and p1.map(2, 0x10_0000, range(16, 20))[0] == hvkit.SUCCESS
        assert p2.create(1) == hvkit.SUCCESS and p2.configure(1, 0x2000) == hvkit.SUCCESS
        assert p2.attach(1, d2) == hvkit.SUCCESS
        stubs = {
            "none": hypervisor_pb2_grpc.HypervisorStub(env.channel(None)),
            "garbage": hypervisor_pb2_grpc.HypervisorStub(env.channel("not-a-token-" + os.urandom(4).hex())),
            "p1": p1.stub, "p2": p2.stub,
            "admin": hypervisor_pb2_grpc.HypervisorStub(env.channel(hvkit.ADMIN_TOKEN)),
            "device": hypervisor_pb2_grpc.HypervisorStub(env.channel(dev_token)),
        }
        yield World(env, p1, p2, {"d1": d1, "d2": d2, "d3": d3}, stubs, baseline)
    finally:
        env.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(Path(tmp_path_factory.mktemp("hypercalls"))) as w:
        yield w


# -- values ---------------------------------------------------------------------------------
def u64s(w: World) -> st.SearchStrategy[int]:
    special = [0, 1, 2, 0xFFFF_FFFF, 1 << 32, SELF, U64 - 1, w.p1.pid, w.p2.pid, 1 << 63, *w.devices.values()]
    return st.one_of(st.sampled_from(special), st.integers(0, U64))


def mostly(good: list[int], bad: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Usually a value the hypervisor may accept, sometimes anything: so calls
    get past the first check often enough to reach the later ones."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(good), bad)


U32S = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 0xFFFF_FFFE, U32]), st.integers(0, U32))
DOMAIN_IDS = mostly([1, 2, 3, 4], st.sampled_from([0, U32, U32 - 1]) | U32S)
DTYPES = mostly([1, 1, 0], st.sampled_from([2, 3, 15]) | U32S)
VTLS = mostly([0], st.sampled_from([1, 0x10, 0x1F, 0x20, 0xFF, 0x100]) | U32S)
SHIFTS = st.one_of(st.integers(0, 60), st.sampled_from([52, 53, U32]))


def pids(w: World) -> st.SearchStrategy[int]:
    return mostly([SELF, SELF, w.p1.pid, w.p2.pid], st.sampled_from([0, U32, U64 - 1]) | u64s(w))


def device_ids(w: World) -> st.SearchStrategy[int]:
    ids = list(w.devices.values())
    return mostly(ids, st.sampled_from([i | 1 << 62 for i in ids] + [0, U64, 1 << 63]) | u64s(w))


def roots() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0x1000, 0x3000, 0, 8 * hvkit.MiB, 10 * hvkit.MiB, RAM - 4096, RAM, 0x1008,
                                      U64 & ~0xFFF, 1 << 52]), st.integers(0, U64))


def dd_msg(draw: st.DrawFn, w: World) -> hypervisor_pb2.DeviceDomain:
    return hypervisor_pb2.DeviceDomain(partition_id=draw(pids(w)), owner_vtl=draw(VTLS), domain_type=draw(DTYPES),
                                       domain_id=draw(DOMAIN_IDS))


@st.composite
def typed_call(draw: st.DrawFn, w: World) -> tuple[str, Any]:
    name = draw(st.sampled_from(["GetIommuCapabilities", "GetLogicalDeviceProperty", "CreateDeviceDomain",
                                 "DeleteDeviceDomain", "AttachDeviceDomain", "DetachDeviceDomain",
                                 "ConfigureDeviceDomain", "FlushDeviceDomain", "FlushDeviceDomainList",
                                 "MapDeviceGpaPages", "UnmapDeviceGpaPages", "PageResponse", "ListDevices"]))
    pb = hypervisor_pb2
    if name == "GetIommuCapabilities":
        return name, pb.GetIommuCapabilitiesRequest(partition_id=draw(pids(w)))
    if name == "GetLogicalDeviceProperty":
        return name, pb.GetLogicalDevicePropertyRequest(partition_id=draw(pids(w)), logical_device_id=draw(
            device_ids(w)), code=draw(st.sampled_from([10, 10, 0, 9, 11, U32]) | U32S))
    if name in ("CreateDeviceDomain", "FlushDeviceDomain"):
        flags = draw(mostly([0], st.sampled_from([1, 2, 3, 4, U32]) | U32S))
        return name, getattr(pb, name + "Request")(device_domain=dd_msg(draw, w), flags=flags)
    if name == "DeleteDeviceDomain":
        return name, pb.DeleteDeviceDomainRequest(device_domain=dd_msg(draw, w))
    if name == "AttachDeviceDomain":
        return name, pb.AttachDeviceDomainRequest(device_domain=dd_msg(draw, w), device_id=draw(device_ids(w)))
    if name == "DetachDeviceDomain":
        return name, pb.DetachDeviceDomainRequest(partition_id=draw(pids(w)), device_id=draw(device_ids(w)))
    if name == "ConfigureDeviceDomain":
        settings = pb.DeviceDomainSettings(translation_enabled=draw(st.booleans()), blocked=draw(st.booleans()),
                                           first_stage_paging_mode=draw(st.booleans()), page_table_root=draw(roots()))
        return name, pb.ConfigureDeviceDomainRequest(device_domain=dd_msg(draw, w), settings=settings)
    if name == "FlushDeviceDomainList":
        n = draw(st.sampled_from([0, 1, 2, 4095, 4096]) | st.integers(0, 8))
        items = [pb.FlushVa(page_number=draw(u64s(w)) if i < 8 else i, page_mask_shift=draw(SHIFTS) if i < 8 else 0)
                 for i in range(n)]
        return name, pb.FlushDeviceDomainListRequest(device_domain=dd_msg(draw, w),
                                                     flags=draw(st.sampled_from([0, 1, 2, U32])), list=items)
    if name == "MapDeviceGpaPages":
        n = draw(st.sampled_from([0, 1, 2, 4095, 4096]) | st.integers(0, 8))
        pfns = [draw(st.sampled_from([16, 100, 2047, 2048, 2560, 2600, 4095, 4096]) | u64s(w)) if i < 8 else 16 + i
                for i in range(n)]
        return name, pb.MapDeviceGpaPagesRequest(
            device_domain=dd_msg(draw, w), map_flags=draw(st.sampled_from([1, 2, 3, 0, 4, U32])),
            target_device_va_base=draw(st.sampled_from([0x10_0000, 0x20_0000, 0x10_0800, 0]) | u64s(w)),
            gpa_page_list=pfns)
    if name == "UnmapDeviceGpaPages":
        return name, pb.UnmapDeviceGpaPagesRequest(
            device_domain=dd_msg(draw, w), page_count=draw(st.sampled_from([0, 1, 4, 4095, 4096]) | U32S),
            target_device_va_base=draw(st.sampled_from([0x10_0000, 0x10_1000, 0x10_0800, 0]) | u64s(w)))
    if name == "PageResponse":
        return name, pb.PageResponseRequest(logical_device_id=draw(device_ids(w)), request_id=draw(u64s(w)),
                                            success=draw(st.booleans()))
    return name, pb.ListDevicesRequest() if hasattr(pb, "ListDevicesRequest") else _empty()


def _empty() -> Any:
    from pviommu.v1 import common_pb2

    return common_pb2.Empty()


# -- raw ABI ----------------------------------------------------------------------------------
def raw_layout(draw: st.DrawFn, w: World, code: int, reps: int) -> bytes:
    """A correctly sized input block of ``code`` with drawn (often valid) fields."""
    def dd() -> bytes:
        dtype, dom = draw(st.sampled_from([1, 1, 1, 0, 2, 15])), draw(DOMAIN_IDS)
        return struct.pack("<QB7sQ", draw(pids(w)), draw(st.sampled_from([0] * 8 + [1, 0x10, 0xE0])),
                           bytes(7), dtype | dom << 32)
    if code == hvkit.CREATE:
        return dd() + struct.pack("<I", draw(st.sampled_from([0, 0, 1, 2, 4, U32]))) + bytes(4)
    if code == hvkit.DELETE:
        return dd()
    if code == hvkit.ATTACH:
        return dd() + struct.pack("<Q", draw(device_ids(w)))
    if code == hvkit.DETACH:
        return struct.pack("<QQ", draw(pids(w)), draw(device_ids(w)))
    if code == hvkit.CONFIGURE:
        return dd() + struct.pack("<QQ", draw(st.sampled_from([1, 1, 0, 2, 3, 5, 8, U64])), draw(roots()))
    if code == hvkit.FLUSH:
        return dd() + struct.pack("<II", draw(st.sampled_from([0, 0, 1])), draw(st.sampled_from([0, 0, 1])))
    if code == hvkit.GET_CAPS:
        return struct.pack("<QQ", draw(pids(w)), draw(st.sampled_from([0, 0, 1])))
    if code == hvkit.GET_PROPERTY:
        return struct.pack("<QQII", draw(pids(w)), draw(device_ids(w)), draw(st.sampled_from([10, 10, 9])),
                           draw(st.sampled_from([0, 0, 1])))
    if code == hvkit.FLUSH_LIST:
        head = dd() + struct.pack("<II", draw(st.sampled_from([0, 1, 2])), draw(st.sampled_from([0, 0, 1])))
        return head + b"".join(struct.pack("<Q", draw(u64s(w))) for _ in range(min(reps, 64))) + bytes(
            8 * max(0, reps - 64))
    if code == hvkit.MAP:
        head = dd() + struct.pack("<B3sIQ", draw(st.sampled_from([0, 0, 1])), bytes(3),
                                  draw(st.sampled_from([1, 2, 3, 0, 4])),
                                  draw(st.sampled_from([0x10_0000, 0x30_0000, 0x10_0800]) | u64s(w)))
        return head + b"".join(struct.pack("<Q", draw(st.sampled_from([16, 17, 2048, 2560, 4096]) | u64s(w)))
                               for _ in range(min(reps, 64))) + struct.pack("<Q", 20) * max(0, reps - 64)
    if code == hvkit.UNMAP:
        return dd() + struct.pack("<Q", draw(st.sampled_from([0x10_0000, 0x10_1000, 0x10_0800]) | u64s(w)))
    return draw(st.binary(max_size=64))


@st.composite
def raw_call(draw: st.DrawFn, w: World) -> tuple[int, bytes, str]:
    code = draw(mostly(CODES, st.integers(0, 0xFFFF)))
    if code in REP_CODES:
        reps = draw(st.sampled_from([1, 1, 2, 3, 4, 0, 4095, 4096 & 0xFFF]) | st.integers(0, 0xFFF))
        start = draw(st.sampled_from([0, 0, 0, 1, reps, max(0, reps - 1), 0xFFF]))
    else:
        reps = draw(st.sampled_from([0] * 8 + [1, 0xFFF]))
        start = draw(st.sampled_from([0] * 8 + [1, 0xFFF]))
    junk = draw(st.sampled_from([0] * 10 + [1 << 16, 1 << 17, 0x3FF << 17, 1 << 27, 1 << 31, 1 << 44, 1 << 60,
                                            0xF << 60]) | st.integers(0, U64).map(lambda v: v & ~0xFFFF))
    value = (code | (reps & 0xFFF) << 32 | (start & 0xFFF) << 48 | junk) & U64
    data = raw_layout(draw, w, code, reps)
    how = draw(st.sampled_from(["valid"] * 4 + ["mutated"] * 3 + ["truncated", "oversized", "zeros", "ones",
                                                                   "random", "empty"]))
    if how == "mutated" and data:
        at = draw(st.integers(0, len(data) - 1))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        data = data[:at] + draw(st.binary(min_size=width, max_size=width)) + data[at + width:]
        data = data[: len(data)]
    elif how == "truncated" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "oversized":
        data = data + draw(st.binary(min_size=1, max_size=16) | st.just(bytes(8)) | st.just(bytes(5000)))
    elif how == "zeros":
        data = bytes(len(data))
    elif how == "ones":
        data = b"\xff" * len(data)
    elif how == "random":
        data = draw(st.binary(max_size=80))
    elif how == "empty":
        data = b""
    return value, data, how


# -- the invariant ------------------------------------------------------------------------------
def view_of(w: World, snap: dict[str, Any], pid: int) -> tuple[Any, ...]:
    """What belongs to partition ``pid`` in a host snapshot."""
    devs = {d: v for d, v in snap["devices"].items() if v[0] == pid}
    slots = {w.slot_of(d) for d in devs if d in w.env.host.devices}
    ctx = {s: c for s, c in snap["contexts"].items() if s in slots}
    return snap["partitions"].get(pid), devs, ctx


CRED_ERRORS = {"none": grpc.StatusCode.UNAUTHENTICATED, "garbage": grpc.StatusCode.UNAUTHENTICATED,
               "admin": grpc.StatusCode.PERMISSION_DENIED, "device": grpc.StatusCode.PERMISSION_DENIED}


def call_once(w: World, cred: str, method: str, request: Any, raw: tuple[int, bytes, str] | None = None) -> None:
    host = w.env.host
    before = host.snapshot()
    me = {"p1": w.p1.pid, "p2": w.p2.pid}.get(cred)
    others = [p for p in (w.p1.pid, w.p2.pid) if p != me]
    try:
        reply = getattr(w.stubs[cred], method)(request, timeout=hvkit.CALL_TIMEOUT)
    except grpc.RpcError as exc:
        assert cred in CRED_ERRORS, f"{cred} credential got gRPC {exc.code()} on {method}: {exc.details()}"
        assert exc.code() == CRED_ERRORS[cred], (cred, exc.code(), exc.details())
        assert host.snapshot() == before
        rk.count("hypercall_fuzz_credential_refusals")
        event(f"{cred}: {exc.code().name}")
        return
    assert cred not in CRED_ERRORS, f"{cred} credential was answered on {method}"
    after = host.snapshot()
    for pid in others:  # nothing one partition does reaches the other
        assert view_of(w, after, pid) == view_of(w, before, pid), f"{cred}'s {method} changed partition {pid}"
    if method == "HvCall":
        assert raw is not None
        status, reps = reply.result_value & 0xFFFF, (reply.result_value >> 32) & 0xFFF
        assert reply.result_value >> 44 == 0 and (reply.result_value >> 16) & 0xFFFF == 0, hex(reply.result_value)
        start = (raw[0] >> 48) & 0xFFF
        progressed = reps > start
        event(f"HvCall {raw[2]}: {HvStatus.name_of(status)}")
        rk.count("hypercall_fuzz_raw_calls")
    elif method == "ListDevices":
        mine = {d for d, v in after["devices"].items() if v[0] == me}
        assert {d.logical_device_id for d in reply.devices} == mine
        assert after == before
        rk.count("hypercall_fuzz_typed_calls")
        return
    else:
        status = reply.result.status
        progressed = getattr(reply, "reps_completed", 0) > 0
        event(f"{method}: {HvStatus.name_of(status)}")
        rk.count("hypercall_fuzz_typed_calls")
    assert status in HvStatus._value2member_map_, f"{method} answered undefined status {status:#x}"
    if status != HvStatus.SUCCESS:
        rk.count("hypercall_fuzz_refusals")
        if not progressed:
            assert after == before, f"refused {method} ({HvStatus.name_of(status)}) changed the host"
    else:
        rk.count("hypercall_fuzz_successes")
    # consistency: every attached device's domain exists and lists it
    for logical, (pid, dom) in after["devices"].items():
        if dom:
            assert logical in after["partitions"][pid]["domains"][dom][7]


CREDS = st.sampled_from(["p1"] * 6 + ["p2"] * 3 + ["none", "garbage", "admin", "device"])


def hostile_calls(world: World, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 8), label="calls")):
        cred = data.draw(CREDS, label="credential")
        if data.draw(st.integers(0, 2), label="raw?") == 0:
            raw = data.draw(raw_call(world), label="HvCall")
            call_once(world, cred, "HvCall", hypervisor_pb2.HvCallRequest(input_value=raw[0], input=raw[1]), raw)
        else:
            method, request = data.draw(typed_call(world), label="typed call")
            call_once(world, cred, method, request)
    # the service still answers, for both partitions
    assert world.p1.caps().result.status == hvkit.SUCCESS
    assert world.p2.caps().result.status == hvkit.SUCCESS


@rk.robust_settings(300)
@given(data=st.data())
def test_hostile_hypercalls_answer_a_defined_status_and_refusals_change_nothing(world: World,
                                                                                data: st.DataObject) -> None:
    hostile_calls(world, data)


@rk.robust_settings(3)
@given(data=st.data())
def test_killed_device_unit_is_marked_lost_and_hostile_hypercalls_keep_answering(world: World,
                                                                                 data: st.DataObject) -> None:
    """Kill the unit of an attached device (its server stops answering), then
    keep fuzzing: every answer stays defined and timely, the host marks the
    device unreachable and blocks its context, the other devices keep going."""
    env = world.env
    fake = env.fake_device()
    logical, _, _ = env.device(f"victim-{os.urandom(3).hex()}", world.p1, fake=fake)
    dom = 4
    left = env.host.partitions[world.p1.pid].domains.get(dom)
    for held in sorted(left.devices) if left is not None else []:  # v2: the fuzz may have attached some here
        world.p1.detach(held)
    world.p1.delete(dom)  # whatever the fuzz left under this id
    assert world.p1.create(dom) == hvkit.SUCCESS and world.p1.configure(dom, 0x1000) == hvkit.SUCCESS
    assert world.p1.attach(dom, logical) == hvkit.SUCCESS
    fake.stop()  # the kill
    rk.count("kills")
    assert world.p1.flush(dom) in (hvkit.SUCCESS, hvkit.TIME_OUT)
    dev = env.host.devices[logical]
    assert not dev.reachable
    assert env.host.snapshot()["contexts"][dev.slot] == bytes(64)  # blocked
    hostile_calls(world, data)
    assert world.p1.detach(logical) == hvkit.SUCCESS
    assert world.p1.delete(dom) == hvkit.SUCCESS


def test_deleting_everything_after_the_fuzz_returns_every_table_frame(world: World) -> None:
    """Whatever state the fuzz left: detach every device, delete every domain,
    and the table frames are back to the partitions' stage 2 alone; destroying
    the partitions then frees those too."""
    host = world.env.host
    for guest in (world.p1, world.p2):
        snap = host.snapshot()["partitions"][guest.pid]
        for logical in snap["devices"]:
            guest.detach(logical)
        for dom, info in snap["domains"].items():
            assert guest.delete(dom, info[0]) == hvkit.SUCCESS
    assert host.tables.allocated_frames() == world.baseline_frames
    for guest in (world.p1, world.p2):
        r = world.env.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=guest.pid))
        assert r.result.status == hvkit.SUCCESS
    assert host.tables.allocated_frames() == 0
    rk.count("hypercall_fuzz_leak_checks")
