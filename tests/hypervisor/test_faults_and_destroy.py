"""Fault reports reach only the owning partition (and the admin); destroying
a partition gives back everything it held."""

from __future__ import annotations

import threading

import grpc
import pytest

from pviommu.abi.hv_status import HvStatus
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hypervisor_pb2, hypervisor_pb2_grpc
from tests.kit.hvkit import CALL_TIMEOUT, S2, SUCCESS, Guest, HvEnv, MiB

INVALID_PARTITION_ID = 0xD
PAGE_REQUEST_INVALID = int(HvStatus.PAGE_REQUEST_INVALID)


class DeviceHost:
    """A device's DeviceHost channel; faults are reported under its current epoch (as a device does)."""

    def __init__(self, hv: HvEnv, token: str) -> None:
        self.stub = admin_pb2_grpc.DeviceHostStub(hv.channel(token))
        principal = hv.host.resolve(token)
        self.dev = hv.host.devices.get(principal.id) if principal is not None else None

    @property
    def epoch(self) -> int:
        return self.dev.epoch if self.dev is not None else 0

    def ReportFault(self, request: admin_pb2.ReportFaultRequest, timeout: float) -> None:
        self.stub.ReportFault(request, timeout=timeout)


def device_host(hv: HvEnv, token: str) -> DeviceHost:
    return DeviceHost(hv, token)


def admin_faults(hv: HvEnv, pid: int = 0, after: int = 0) -> list[hypervisor_pb2.Fault]:
    return list(hv.admin.StreamFaults(admin_pb2.StreamFaultsAdminRequest(partition_id=pid, after_sequence=after),
                                      timeout=CALL_TIMEOUT))


def report(dh: DeviceHost, iova: int, write: bool = True, reason: int = 0x5, epoch: int | None = None) -> int:
    r = dh.stub.ReportFault(admin_pb2.ReportFaultRequest(iova=iova, write=write, reason=reason,
                                                         reason_name="FS_WRITE", detail="test",
                                                         epoch=dh.epoch if epoch is None else epoch),
                            timeout=CALL_TIMEOUT)
    return int(r.result.status)


# ------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------
def test_reported_fault_goes_to_the_owning_partition_only(hv: HvEnv) -> None:
    g, h = hv.partition("g"), hv.partition("h")
    dev, token, _ = hv.device("d", g)
    hv.device("hd", h)
    assert g.create(3) == SUCCESS and g.configure(3, MiB) == SUCCESS and g.attach(3, dev) == SUCCESS
    assert report(device_host(hv, token), 0xDEAD_B000) == SUCCESS
    faults = g.faults()
    assert len(faults) == 1
    f = faults[0]
    assert (f.logical_device_id, f.iova, f.write, f.reason, f.reason_name, f.detail, f.domain_id) == (
        dev, 0xDEAD_B000, True, 0x5, "FS_WRITE", "test", 3)
    assert f.sequence == 1
    assert h.faults() == []
    seen = admin_faults(hv)
    assert [(x.logical_device_id, x.iova) for x in seen] == [(dev, 0xDEAD_B000)]
    assert admin_faults(hv, pid=g.pid)[0].iova == 0xDEAD_B000
    assert admin_faults(hv, pid=h.pid) == []


def test_fault_stream_resumes_after_a_sequence(hv: HvEnv) -> None:
    g = hv.partition()
    _, token, _ = hv.device("d", g)
    stub = device_host(hv, token)
    for i in range(3):
        assert report(stub, 0x1000 * (i + 1)) == SUCCESS
    assert [f.iova for f in g.faults()] == [0x1000, 0x2000, 0x3000]
    assert [f.iova for f in g.faults(after=2)] == [0x3000]
    assert [f.iova for f in admin_faults(hv, after=1)] == [0x2000, 0x3000]


def test_following_stream_delivers_a_fault_reported_later(hv: HvEnv) -> None:
    g = hv.partition()
    _, token, _ = hv.device("d", g)
    stream = g.stub.StreamFaults(hypervisor_pb2.StreamFaultsRequest(follow=True), timeout=CALL_TIMEOUT)
    got: list[int] = []

    def read() -> None:
        for f in stream:
            got.append(f.iova)
            return

    t = threading.Thread(target=read)
    t.start()
    assert report(device_host(hv, token), 0x7000) == SUCCESS
    t.join(5)
    stream.cancel()
    assert got == [0x7000]


def test_fault_of_an_unassigned_device_reaches_nobody(hv: HvEnv) -> None:
    g = hv.partition()
    _, token, _ = hv.device("loose")
    assert report(device_host(hv, token), 0x5000) == SUCCESS
    assert g.faults() == [] and admin_faults(hv) == []
    assert hv.host.counters.stats.get("faults_unowned") == 1


def test_guest_cannot_report_faults_for_itself(hv: HvEnv) -> None:
    g = hv.partition()
    try:
        device_host(hv, g.token).ReportFault(admin_pb2.ReportFaultRequest(iova=1), timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    else:
        raise AssertionError("a partition token reported a fault")
    assert g.faults() == []


# ------------------------------------------------------------------------------------------
# destroy
# ------------------------------------------------------------------------------------------
def test_destroy_partition_gives_back_devices_domains_frames_and_bank(hv: HvEnv) -> None:
    frames_before = hv.host.tables.allocated_frames()
    keep = hv.partition("keep")
    keep_snapshot = hv.host.snapshot()["partitions"][keep.pid]
    frames_with_keep = hv.host.tables.allocated_frames()
    g = hv.partition("doomed", 32 * MiB, holes=[(4 * MiB, 2 * MiB)], read_only=[(8 * MiB, 2 * MiB)])
    dev, _, fake = hv.device("d", g)
    dev2, _, _ = hv.device("d2", g, function=1)
    slot = hv.admin_devices()[dev].slot
    assert g.create(1) == SUCCESS and g.configure(1, MiB) == SUCCESS and g.attach(1, dev) == SUCCESS
    assert g.create(2, dtype=S2) == SUCCESS and g.attach(2, dev2, dtype=S2) == SUCCESS
    assert g.map(2, 0x40_0000, list(range(0x100, 0x140))) == (SUCCESS, 0x40)
    assert g.map(2, 0x80_0000_0000, [0x10]) == (SUCCESS, 1)  # another top-level entry
    assert g.create(3) == SUCCESS
    assert hv.host.tables.allocated_frames() > frames_with_keep
    assert g.bank_path.exists()
    assert hv.host.tables.read_context_raw(slot) != bytes(64)

    r = hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS

    assert hv.host.tables.allocated_frames() == frames_with_keep
    assert not g.bank_path.exists()
    assert hv.domains(g.pid) == {} and g.pid not in hv.host.partitions
    assert [p.partition_id for p in hv.admin.ListPartitions(common_pb2.Empty(), timeout=CALL_TIMEOUT).partitions] \
        == [keep.pid]
    devices = hv.admin_devices()
    for d in (dev, dev2):
        assert (devices[d].partition_id, devices[d].domain_id) == (0, 0)
        assert hv.host.tables.read_context_raw(devices[d].slot) == bytes(64)  # blocked
    assert fake.servicer.assigns[-1][1] == 0  # the unit was told it is unassigned
    assert "context" in fake.servicer.scopes()
    assert hv.host.snapshot()["partitions"][keep.pid] == keep_snapshot
    # the devices can serve another partition now
    assert hv.admin.AssignDevice(admin_pb2.AssignDeviceRequest(logical_device_id=dev, partition_id=keep.pid),
                                 timeout=CALL_TIMEOUT).result.status == SUCCESS
    assert keep.create(1) == SUCCESS and keep.attach(1, dev) == SUCCESS
    # destroying it again is refused, and the last partition gives back the rest
    again = hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=CALL_TIMEOUT)
    assert again.result.status == INVALID_PARTITION_ID
    assert hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=keep.pid),
                                     timeout=CALL_TIMEOUT).result.status == SUCCESS
    assert hv.host.tables.allocated_frames() == frames_before
    assert sorted(p.name for p in hv.memory_dir.glob("bank-*.mem")) == ["bank-00000.mem"]



def test_reset_partition_reclaims_domains_zeroes_ram_and_rotates_the_token(hv: HvEnv) -> None:
    g = hv.partition("g", 8 * MiB)
    dev, _, fake = hv.device("d", g)
    _, dev_token, _ = hv.device("d2", g, function=1)
    frames_after_create = hv.host.tables.allocated_frames()
    slot = hv.admin_devices()[dev].slot
    assert g.create(1) == SUCCESS and g.configure(1, MiB) == SUCCESS and g.attach(1, dev) == SUCCESS
    assert g.create(2, dtype=S2) == SUCCESS and g.map(2, 0, [5, 6]) == (SUCCESS, 2)
    assert report(device_host(hv, dev_token), 0x1000) == SUCCESS
    ram = g.ram(hv.host_memory())
    ram.write(0x3000, b"secret")

    r = hv.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS and r.token and r.token != g.token
    assert hv.domains(g.pid) == {}
    assert hv.host.tables.allocated_frames() == frames_after_create
    assert ram.read(0x3000, 6) == bytes(6)
    assert hv.host.tables.read_context_raw(slot) == bytes(64)
    devices = hv.admin_devices()
    assert (devices[dev].partition_id, devices[dev].domain_id) == (g.pid, 0)  # still assigned, in no domain
    assert fake.servicer.assigns[-1][1] == g.pid
    with pytest.raises(grpc.RpcError) as err:
        g.caps()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rebooted = hypervisor_pb2_grpc.HypervisorStub(hv.channel(r.token))
    g.stub = rebooted
    assert g.faults() == []  # a fresh fault log
    assert g.create(1) == SUCCESS and g.attach(1, dev) == SUCCESS  # the same ids work again


# ------------------------------------------------------------------------------------------
# page requests a device gave up on
# ------------------------------------------------------------------------------------------
def _page_request(dh: DeviceHost, request_id: int) -> None:
    r = dh.stub.ReportFault(admin_pb2.ReportFaultRequest(iova=0x7000, write=True, reason=0x5, reason_name="FS_WRITE",
                                                         page_request=True, request_id=request_id, epoch=dh.epoch),
                            timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS


def _answer(g: Guest, dev: int, request_id: int) -> int:
    r = g.stub.PageResponse(hypervisor_pb2.PageResponseRequest(logical_device_id=dev, request_id=request_id,
                                                               success=True), timeout=CALL_TIMEOUT)
    return int(r.result.status)


def test_a_page_request_the_device_gave_up_on_refuses_a_late_answer_and_frees_its_quota(hv: HvEnv) -> None:
    g = hv.partition()
    dev, token, _ = hv.device("d", g)
    dh = device_host(hv, token)
    _page_request(dh, 7)
    _page_request(dh, 8)
    timed_out = dh.stub.PageRequestTimedOut(admin_pb2.PageRequestTimedOutRequest(request_id=7, epoch=dh.epoch),
                                            timeout=CALL_TIMEOUT)
    assert timed_out.result.status == SUCCESS
    assert dh.dev is not None and set(dh.dev.page_requests) == {8}  # no longer counted toward the quota
    assert _answer(g, dev, 7) == PAGE_REQUEST_INVALID  # late: refused, nothing reaches the unit
    assert _answer(g, dev, 8) == SUCCESS  # still pending: answered
    assert hv.host.counters.stats["page_requests_timed_out"] == 1


def test_a_timeout_report_of_another_epoch_leaves_the_pending_request_alone(hv: HvEnv) -> None:
    g = hv.partition()
    dev, token, _ = hv.device("d", g)
    dh = device_host(hv, token)
    _page_request(dh, 9)
    dh.stub.PageRequestTimedOut(admin_pb2.PageRequestTimedOutRequest(request_id=9, epoch=dh.epoch + 1),
                                timeout=CALL_TIMEOUT)
    assert _answer(g, dev, 9) == SUCCESS
    assert hv.host.counters.stats.get("page_requests_timed_out", 0) == 0
