"""The admin's device and partition operations: refusals change nothing, and
taking a device away makes its IOMMU unit forget everything it cached."""

from __future__ import annotations

import pytest

from pviommu.addr import Gpa, Iova
from pviommu.pt.common import Perm
from pviommu.v1 import admin_pb2
from tests.kit.hvkit import (
    CALL_TIMEOUT,
    INVALID_DEVICE_ID,
    INVALID_DEVICE_STATE,
    INVALID_PARAMETER,
    PAGE,
    SUCCESS,
    HvEnv,
    MiB,
)

INVALID_PARTITION_ID = 0xD
NOT_PRESENT = 0x59  # the unit's fault reason for a blocked context


def _attached_and_warm(hv: HvEnv):  # type: ignore[no-untyped-def]
    side = hv.guest_device("", device="d", dom=1)
    side.s1.map(Iova(0x1000), Gpa(4 * MiB), PAGE, Perm.READ | Perm.WRITE)
    assert side.unit.translate(side.slot, Iova(0x1000), PAGE, False).fault is None
    return side.guest, side.fake, side.dev, side.slot


def test_unregistered_device_loses_its_cached_context_and_translations(hv: HvEnv) -> None:
    g, fake, dev, slot = _attached_and_warm(hv)
    r = hv.admin.UnregisterDevice(admin_pb2.DeviceRequest(logical_device_id=dev), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS
    runs = fake.unit.translate(slot, Iova(0x1000), PAGE, False)
    assert runs.fault is not None and runs.fault.reason == NOT_PRESENT
    assert hv.host.tables.read_context_raw(slot) == bytes(64)
    assert dev not in hv.admin_devices()
    assert hv.domains(g.pid)[(g.pid, 1)].devices == []


def test_unassigned_device_loses_its_cached_context_and_translations(hv: HvEnv) -> None:
    g, fake, dev, slot = _attached_and_warm(hv)
    r = hv.admin.UnassignDevice(admin_pb2.DeviceRequest(logical_device_id=dev), timeout=CALL_TIMEOUT)
    assert r.result.status == SUCCESS
    runs = fake.unit.translate(slot, Iova(0x1000), PAGE, False)
    assert runs.fault is not None and runs.fault.reason == NOT_PRESENT
    assert fake.servicer.assigns[-1][1] == 0
    assert g.prop(dev).result.status == 0x6  # no longer the guest's


def test_reregistering_under_the_same_name_replaces_the_device(hv: HvEnv) -> None:
    g, fake, dev, slot = _attached_and_warm(hv)
    new_dev, _, _ = hv.device("d", fake=fake)
    devices = hv.admin_devices()
    assert dev not in devices and new_dev in devices
    assert devices[new_dev].partition_id == 0
    assert fake.unit.translate(slot, Iova(0x1000), PAGE, False).fault is not None
    assert g.detach(dev) == INVALID_DEVICE_ID


@pytest.mark.parametrize("memory,holes", [
    (0, []), (3 * MiB, []), (1 << 40, []), ((1 << 40) + 2 * MiB, []),
    (4 * MiB, [(0x800, 4096)]), (4 * MiB, [(0, 0)]), (4 * MiB, [(2 * MiB, 4 * MiB)]),
])
def test_bad_partition_sizes_and_ranges_are_invalid_parameter(hv: HvEnv, memory: int, holes) -> None:  # type: ignore[no-untyped-def]
    req = admin_pb2.CreatePartitionRequest(memory_bytes=memory,
                                           mmio_holes=[admin_pb2.GpaRange(gpa=a, size=b) for a, b in holes])
    r = hv.unchanged(hv.admin.CreatePartition, req, timeout=CALL_TIMEOUT)
    assert r.result.status == INVALID_PARAMETER
    assert list(hv.memory_dir.glob("bank-*.mem")) == [hv.memory_dir / "bank-00000.mem"]


def test_admin_device_refusals_change_nothing(hv: HvEnv) -> None:
    g, h = hv.partition(), hv.partition()
    dev, _, _ = hv.device("d", g)
    missing = dev + 1 if dev + 1 not in hv.host.devices else dev + 2
    a = hv.admin
    cases = [
        (a.AssignDevice, admin_pb2.AssignDeviceRequest(logical_device_id=dev, partition_id=h.pid),
         INVALID_DEVICE_STATE),
        (a.AssignDevice, admin_pb2.AssignDeviceRequest(logical_device_id=dev, partition_id=99), INVALID_PARTITION_ID),
        (a.AssignDevice, admin_pb2.AssignDeviceRequest(logical_device_id=missing, partition_id=g.pid),
         INVALID_DEVICE_ID),
        (a.UnassignDevice, admin_pb2.DeviceRequest(logical_device_id=missing), INVALID_DEVICE_ID),
        (a.UnregisterDevice, admin_pb2.DeviceRequest(logical_device_id=missing), INVALID_DEVICE_ID),
        (a.DestroyPartition, admin_pb2.PartitionRequest(partition_id=99), INVALID_PARTITION_ID),
    ]
    for method, req, status in cases:
        assert hv.unchanged(method, req, timeout=CALL_TIMEOUT).result.status == status, (req, status)
