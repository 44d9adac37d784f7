"""The SVA proposal's hypercalls (pviommu proposal, not in the series): off by default, the
PASID attach/detach and page-group response calls with a real IOMMU unit behind the queue,
and every refusal's status. Layout offsets are written from docs/proposal-sva.md."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import pytest

from pviommu.abi.hv import DeviceDomain, DeviceDomainId, HvDeviceId, IommuCap
from pviommu.abi.hv.sva import (
    AttachDevicePasidInput,
    DetachDevicePasidInput,
    ProcessIommuPrqInput,
    PrqResponse,
)
from pviommu.abi.invq import PageResponse, PageResponseCode, PasidInvalidation, QueueItem
from pviommu.addr import Gpa, Iova
from pviommu.iommu.fault import FaultReason
from pviommu.mem.bank import bank_base
from pviommu.pt.common import Perm
from pviommu.pt.walk import PageTable
from tests.kit.hvkit import (
    ACCESS_DENIED,
    DEVICE_ALREADY_IN_DOMAIN,
    INVALID_DEVICE_STATE,
    INVALID_HYPERCALL_CODE,
    INVALID_PARAMETER,
    PAGE,
    SELF,
    SUCCESS,
    FakeDevice,
    Guest,
    HvEnv,
    MiB,
)
from tests.kit.nested import guest_tables

ATTACH_PASID, DETACH_PASID, PRQ = 0x7F01, 0x7F02, 0x00C3
PAGE_REQUEST_INVALID = 0x60
SVA_DOM = 9
VA = 0x7000_0000_0000
DATA_GPA = 6 * MiB


def attach_input(dom: int, device: int, pasid: int, partition_id: int = SELF) -> bytes:
    # hv_input_device_domain (24 B: partition_id, owner_vtl + 7 pad, domain_id type 1 | id << 32), device, pasid, 0
    return struct.pack("<QB7xQQII", partition_id, 0, 1 | dom << 32, device, pasid, 0)


def detach_input(device: int, pasid: int, partition_id: int = SELF) -> bytes:
    return struct.pack("<QQII", partition_id, device, pasid, 0)


def prq_input(device: int, request_id: int, pasid: int, code: int, partition_id: int = SELF) -> bytes:
    return struct.pack("<QQQIB3x", partition_id, device, request_id, pasid, code)


def test_layouts_match_the_documented_offsets() -> None:
    a = AttachDevicePasidInput(DeviceDomain(SELF, DeviceDomainId(1, 9)), HvDeviceId.logical(0x1234), 0x55)
    assert a.pack() == attach_input(9, 0x1234, 0x55) and len(a.pack()) == AttachDevicePasidInput.SIZE == 40
    d = DetachDevicePasidInput(SELF, HvDeviceId.logical(7), 3)
    assert d.pack() == detach_input(7, 3) and DetachDevicePasidInput.SIZE == 24
    p = ProcessIommuPrqInput(SELF, HvDeviceId.logical(7), 0xABCD, 3, PrqResponse.FAILURE)
    assert p.pack() == prq_input(7, 0xABCD, 3, 0xF) and ProcessIommuPrqInput.SIZE == 32
    assert ProcessIommuPrqInput.unpack(p.pack()) == p and AttachDevicePasidInput.unpack(a.pack()) == a


def test_without_the_option_the_pasid_calls_are_unknown_and_the_caps_unchanged(make_hv) -> None:  # type: ignore[no-untyped-def]
    env: HvEnv = make_hv()
    g = env.partition("g")
    caps = g.caps()
    assert not caps.iommu_cap & (IommuCap.PASID | IommuCap.PRI) and caps.max_pasid_width == 0
    for code, data in ((ATTACH_PASID, attach_input(1, 1, 1)), (DETACH_PASID, detach_input(1, 1)),
                       (PRQ, prq_input(1, 1, 1, 0))):
        assert g.raw(code, data)[0] == INVALID_HYPERCALL_CODE
    assert env.host.sva is None


@dataclass
class Sva:
    env: HvEnv
    guest: Guest
    fake: FakeDevice
    dev: int
    slot: int
    process: PageTable[Iova, Gpa, Gpa]
    #: page responses the unit received, in order
    answers: list[PageResponse]

    def translate(self, pasid: int | None, write: bool = False):  # type: ignore[no-untyped-def]
        return self.fake.unit.translate(self.slot, Iova(VA), 8, write, pasid)


@pytest.fixture
def sva(make_hv) -> Sva:  # type: ignore[no-untyped-def]
    env: HvEnv = make_hv("--proposal-sva")
    g = env.partition("g", 16 * MiB)
    fake = env.fake_device()
    recorder = fake.servicer
    plain = recorder.handle

    def handle(slot: int, item: QueueItem) -> None:  # the fake unit applies the PASID descriptors too
        if isinstance(item, PasidInvalidation):
            item.apply(recorder.unit)
        if isinstance(item, PageResponse):
            answers.append(item)
        plain(slot, item)

    answers: list[PageResponse] = []
    recorder.handle = handle  # type: ignore[method-assign]
    dev, _, _ = env.device("dsa0", g, fake=fake)
    slot = env.admin_devices()[dev].slot
    process = guest_tables(g.ram(env.host_memory()), (1 * MiB, 2 * MiB)).s1
    process.map(Iova(VA), Gpa(DATA_GPA), PAGE, Perm.READ | Perm.WRITE)
    assert g.create(SVA_DOM) == SUCCESS
    assert g.configure(SVA_DOM, int(process.root)) == SUCCESS
    return Sva(env, g, fake, dev, slot, process, answers)


def test_the_option_advertises_pasid_pri_and_a_pasid_width(sva: Sva) -> None:
    caps = sva.guest.caps()
    assert caps.iommu_cap & IommuCap.PASID and caps.iommu_cap & IommuCap.PRI
    assert caps.max_pasid_width == 15


def test_attach_gives_the_pasid_the_domains_table_and_detach_makes_it_fault(sva: Sva) -> None:
    g = sva.guest
    assert sva.translate(5).fault is not None  # nothing bound yet
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == SUCCESS
    runs = sva.translate(5, write=True)
    assert runs.fault is None and runs.runs[0].hpa == bank_base(g.pid) + DATA_GPA
    assert sva.translate(None).fault is not None  # the device's own (RID) context is still blocked
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == DEVICE_ALREADY_IN_DOMAIN
    assert g.delete(SVA_DOM) == INVALID_DEVICE_STATE
    assert g.configure(SVA_DOM, int(sva.process.root)) == INVALID_DEVICE_STATE
    assert g.raw(DETACH_PASID, detach_input(sva.dev, 5))[0] == SUCCESS
    runs = sva.translate(5)
    assert runs.fault is not None and runs.fault.reason == FaultReason.PASID_ENTRY_NOT_PRESENT
    assert g.raw(DETACH_PASID, detach_input(sva.dev, 5))[0] == INVALID_DEVICE_STATE
    assert g.delete(SVA_DOM) == SUCCESS


def test_pasid_0_beyond_the_width_and_unconfigured_domains_are_refused(sva: Sva) -> None:
    g = sva.guest
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 0))[0] == INVALID_PARAMETER
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 1 << 15))[0] == INVALID_PARAMETER
    assert g.create(SVA_DOM + 1) == SUCCESS
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM + 1, sva.dev, 3))[0] == INVALID_PARAMETER
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM + 2, sva.dev, 3))[0] == INVALID_PARAMETER  # no such domain
    assert g.raw(ATTACH_PASID, struct.pack("<QB7xQQII", SELF, 0, 1 | SVA_DOM << 32, sva.dev, 3, 1))[0] \
        == INVALID_PARAMETER  # reserved word set
    assert sva.translate(3).fault is not None


def test_another_partition_can_neither_attach_nor_answer_for_the_device(sva: Sva) -> None:
    other = sva.env.partition("h", 16 * MiB)
    assert other.create(SVA_DOM) == SUCCESS
    assert other.configure(SVA_DOM, 1 * MiB) == SUCCESS
    assert other.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == ACCESS_DENIED
    assert other.raw(PRQ, prq_input(sva.dev, 1, 5, 0))[0] == ACCESS_DENIED
    assert sva.guest.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5, partition_id=other.pid))[0] \
        == ACCESS_DENIED


def _pending(sva: Sva, request_id: int, pasid: int) -> None:
    """A page request as the device's report leaves it (fault_owner + its PASID)."""
    host = sva.env.host
    dev = host.devices[sva.dev]
    assert host.fault_owner(dev, dev.epoch, True, request_id) is not None
    assert host.sva is not None
    host.sva.note_page_request(dev, request_id, pasid)


def _wait_answers(sva: Sva, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(sva.answers) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # and no more come


def test_page_group_responses_refuse_unknown_duplicate_and_mismatched_requests(sva: Sva) -> None:
    g = sva.guest
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == SUCCESS
    assert g.raw(PRQ, prq_input(sva.dev, 77, 5, 0))[0] == PAGE_REQUEST_INVALID  # never asked
    _pending(sva, 77, 5)
    assert g.raw(PRQ, prq_input(sva.dev, 77, 5, 0x2))[0] == INVALID_PARAMETER  # not a response code
    assert g.raw(PRQ, prq_input(sva.dev, 77, 6, 0))[0] == INVALID_PARAMETER  # another PASID's
    assert g.raw(PRQ, prq_input(sva.dev, 77, 5, 0))[0] == SUCCESS
    assert g.raw(PRQ, prq_input(sva.dev, 77, 5, 0))[0] == PAGE_REQUEST_INVALID  # duplicate
    _wait_answers(sva, 1)
    assert [(a.request_id, a.code) for a in sva.answers] == [(77, PageResponseCode.SUCCESS)]  # one answer only


def test_a_response_after_the_pasid_was_detached_is_refused(sva: Sva) -> None:
    g = sva.guest
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == SUCCESS
    _pending(sva, 78, 5)
    assert g.raw(DETACH_PASID, detach_input(sva.dev, 5))[0] == SUCCESS
    assert g.raw(PRQ, prq_input(sva.dev, 78, 5, 0))[0] == PAGE_REQUEST_INVALID
    _wait_answers(sva, 1)  # the waiting device heard "invalid" at the detach, not nothing
    assert [(a.request_id, a.code) for a in sva.answers] == [(78, PageResponseCode.INVALID)]


def test_moving_the_device_to_another_partition_drops_its_pasids(sva: Sva) -> None:
    from pviommu.v1 import admin_pb2

    g = sva.guest
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == SUCCESS
    assert sva.translate(5).fault is None
    admin = sva.env.admin
    assert admin.UnassignDevice(admin_pb2.DeviceRequest(logical_device_id=sva.dev)).result.status == SUCCESS
    other = sva.env.partition("h", 16 * MiB)
    assert admin.AssignDevice(admin_pb2.AssignDeviceRequest(logical_device_id=sva.dev, partition_id=other.pid)
                              ).result.status == SUCCESS
    assert sva.translate(5).fault is not None
    assert sva.env.host.devices[sva.dev].pasids == {}
    assert g.delete(SVA_DOM) == SUCCESS  # the old owner's domain lost its PASID users with the move


def test_explain_by_device_and_pasid_shows_the_pasid_level(sva: Sva) -> None:
    from pviommu.v1 import admin_pb2

    g = sva.guest
    assert g.raw(ATTACH_PASID, attach_input(SVA_DOM, sva.dev, 5))[0] == SUCCESS
    r = sva.env.admin.ExplainIova(admin_pb2.ExplainIovaRequest(partition_id=g.pid, logical_device_id=sva.dev,
                                                               iova=VA, pasid=5), timeout=10)
    assert r.ok and r.pasid == 5 and r.hpa == bank_base(g.pid) + DATA_GPA
    assert [s.note.split()[0] for s in r.pasid_steps] == ["RTADDR", "root", "context", "pasid-dir", "pasid-entry"]
    plain = sva.env.admin.ExplainIova(admin_pb2.ExplainIovaRequest(partition_id=g.pid, logical_device_id=sva.dev,
                                                                   iova=VA), timeout=10)
    assert not plain.pasid_steps and not plain.ok  # the device's own context is blocked
