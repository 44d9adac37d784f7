"""Fault rings (docs/transports.md): a partition's faults and page requests
in shared memory, opened on the hypervisor's session socket by the
partition's credential holder only, ending with the partition."""

from __future__ import annotations

import pytest

from pviommu.abi import shm as L
from pviommu.shm.faultring import FaultRingReader, RingClosed
from pviommu.shm.sessions import SessionError
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from tests.kit.hvkit import ADMIN_TOKEN, CALL_TIMEOUT, SUCCESS, Guest, HvEnv


def socket_of(g: Guest) -> str:
    r = g.stub.GetTransports(common_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert r.fault_ring_slots == L.FAULT_RING_SLOTS
    return str(r.session_socket)


def reporter(hv: HvEnv, token: str) -> admin_pb2_grpc.DeviceHostStub:
    return admin_pb2_grpc.DeviceHostStub(hv.channel(token))


def report(hv: HvEnv, stub: admin_pb2_grpc.DeviceHostStub, dev: int, iova: int, *, page_request: bool = False,
           request_id: int = 0) -> None:
    r = stub.ReportFault(admin_pb2.ReportFaultRequest(
        iova=iova, write=True, reason=0x5, reason_name="FS_WRITE", detail="test", page_request=page_request,
        request_id=request_id, epoch=hv.host.devices[dev].epoch), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS


def read_all(ring: FaultRingReader, n: int) -> list[L.FaultRecord]:
    out: list[L.FaultRecord] = []
    for _ in range(50):
        out += ring.read(0.1)
        if len(out) >= n:
            break
    return out


def test_faults_and_page_requests_reach_the_owners_ring_only(hv: HvEnv) -> None:
    g, h = hv.partition("g"), hv.partition("h")
    dev, token, _ = hv.device("d", g)
    mine, theirs = FaultRingReader(socket_of(g), g.token), FaultRingReader(socket_of(h), h.token)
    try:
        stub = reporter(hv, token)
        report(hv, stub, dev, 0x1000)
        report(hv, stub, dev, 0x2000, page_request=True, request_id=7)
        recs = read_all(mine, 2)
        assert [(r.sequence, r.logical_device_id, r.iova, r.write, r.reason, r.page_request, r.request_id)
                for r in recs] == [(1, dev, 0x1000, True, 0x5, False, 0), (2, dev, 0x2000, True, 0x5, True, 7)]
        assert [f.sequence for f in g.faults()] == [1, 2]  # the gRPC log has the same entries
        assert theirs.read(0.05) == [] and mine.dropped == 0
    finally:
        mine.close()
        theirs.close()


def test_a_ring_opened_after_faults_gets_the_backlog_after_its_sequence(hv: HvEnv) -> None:
    g = hv.partition()
    dev, token, _ = hv.device("d", g)
    stub = reporter(hv, token)
    for i in range(3):
        report(hv, stub, dev, 0x1000 * (i + 1))
    ring = FaultRingReader(socket_of(g), g.token, after=1)
    try:
        report(hv, stub, dev, 0x9000)
        assert [r.sequence for r in read_all(ring, 3)] == [2, 3, 4]
    finally:
        ring.close()


def test_a_full_ring_drops_and_counts_and_never_blocks_the_reporter(hv: HvEnv) -> None:
    g = hv.partition()
    dev, token, _ = hv.device("d", g)
    ring = FaultRingReader(socket_of(g), g.token)
    try:
        stub = reporter(hv, token)
        for i in range(L.FAULT_RING_SLOTS + 5):
            report(hv, stub, dev, 0x1000 * i)
        assert ring.dropped == 5
        recs = read_all(ring, L.FAULT_RING_SLOTS)
        assert [r.sequence for r in recs] == list(range(1, L.FAULT_RING_SLOTS + 1))
        report(hv, stub, dev, 0x5000)  # room again: the sequence shows the gap
        assert [r.sequence for r in read_all(ring, 1)] == [L.FAULT_RING_SLOTS + 6]
    finally:
        ring.close()


def test_reset_and_destroy_close_the_ring(hv: HvEnv) -> None:
    g, h = hv.partition(), hv.partition()
    rg, rh = FaultRingReader(socket_of(g), g.token), FaultRingReader(socket_of(h), h.token)
    try:
        assert hv.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=g.pid)).result.status == SUCCESS
        with pytest.raises(RingClosed) as closed:
            read_all(rg, 1)
        assert closed.value.reason is L.CloseReason.OWNER_CHANGED
        assert hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=h.pid)).result.status == SUCCESS
        with pytest.raises(RingClosed):
            read_all(rh, 1)
    finally:
        rg.close()
        rh.close()


def test_only_the_partitions_credential_opens_a_ring_and_rings_are_bounded(hv: HvEnv) -> None:
    g = hv.partition()
    _, device_token, _ = hv.device("d", g)
    path = socket_of(g)
    for token, code in (("", "UNAUTHENTICATED"), ("nope", "UNAUTHENTICATED"), (ADMIN_TOKEN, "PERMISSION_DENIED"),
                        (device_token, "PERMISSION_DENIED")):
        with pytest.raises(SessionError) as refused:
            FaultRingReader(path, token)
        assert refused.value.code == code
    with pytest.raises(SessionError, match="INVALID_ARGUMENT"):
        FaultRingReader(path, g.token, after=-1)
    rings = [FaultRingReader(path, g.token), FaultRingReader(path, g.token)]
    try:
        with pytest.raises(SessionError) as refused:
            FaultRingReader(path, g.token)
        assert refused.value.code == "RESOURCE_EXHAUSTED"
    finally:
        for r in rings:
            r.close()


@pytest.mark.parametrize("pasid", [None, 0, 1, 0xFFFFF], ids=["no-pasid", "pasid-0", "pasid-1", "pasid-max"])
def test_a_record_keeps_its_pasid_or_its_absence_at_the_documented_offsets(pasid: int | None) -> None:
    rec = L.FaultRecord(7, 0x10, 0x7F00_1000, 42, 0x5, 3, True, True, 1234.5, pasid)
    raw = rec.pack()
    assert len(raw) == L.FAULT_RECORD and L.FaultRecord.unpack(raw) == rec
    assert raw[42] == (pasid is not None) and int.from_bytes(raw[44:48], "little") == (pasid or 0)
