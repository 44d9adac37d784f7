"""A partition reset and its PASIDs (SVA proposal, not in the series), on the in-process rig of
the ownership race (racekit): nothing a PASID cached before the reset answers a binding the
rebooted partition makes, even one that reuses the old binding's domain tag and PASID."""

from __future__ import annotations

import time
from pathlib import Path

from pviommu.abi import hv
from pviommu.abi.hv.sva import AttachDevicePasidInput
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import OwnerFence, QueueItem
from pviommu.addr import Gpa, Iova
from pviommu.iommu.pasid_unit import pasid_tag
from pviommu.pt.common import RW
from tests.kit.racekit import BUFFERS, IOVA_BASE, PAGE, Race

PASID = 1
OLD_GPA, NEW_GPA = BUFFERS[0], BUFFERS[0] + 16 * PAGE


def test_a_pasid_translation_cached_before_a_reset_never_answers_the_rebooted_partitions_binding(
        tmp_path: Path) -> None:
    """DMA of a bound PASID between the reset's fence and the host's reset of the PASID tables
    walks the old binding under the new epoch (same owner) and caches it; the rebooted guest then
    binds that PASID to a new domain that gets the same tag (a FIFO of 6): its DMA must walk the
    new table, not hit the old incarnation's IOTLB entry (found by the PASID race's oracle)."""
    race = Race(tmp_path, 1, partitions=1, devices=1, pasid=True)
    try:
        part, rd = race.parts[0], race.devices[0]
        dev = next(d for d in race.host.devices.values() if d.slot == rd.slot)
        device_id = hv.HvDeviceId.logical(dev.logical_device_id)

        def domain(dom_id: int, gpa: int | None) -> None:
            table = race.guests[0].guest.new_table()
            if gpa is not None:
                table.map(Iova(IOVA_BASE), Gpa(gpa), PAGE, RW)
            assert race.call(part, hv.CreateDeviceDomainInput(race.device_domain(dom_id))) == HvStatus.SUCCESS
            settings = hv.DeviceDomainSettings(True, False, 0, Gpa(int(table.root)))
            assert race.call(part, hv.ConfigureDeviceDomainInput(race.device_domain(dom_id), settings)) \
                == HvStatus.SUCCESS

        def dma() -> int | None:
            runs = rd.unit.translate(rd.slot, Iova(IOVA_BASE), 8, True, PASID)
            return None if runs.fault is not None else int(runs.runs[0].hpa)

        domain(1, OLD_GPA)
        old_tag = part.domains[1].tag
        assert race.call(part, AttachDevicePasidInput(race.device_domain(1), device_id, PASID)) == HvStatus.SUCCESS
        assert dma() == part.bank.hpa_of(OLD_GPA)

        plain = rd.queue._handle
        window: list[int | None] = []

        def handle(item: QueueItem) -> None:
            plain(item)
            if isinstance(item, OwnerFence):  # the device's DMA goes on right after the fence
                window.extend((dma(), dma()))

        rd.queue._handle = handle
        part = race.host.reset_partition(part.partition_id)
        race.guests[0].rebooted(part)
        assert window == [part.bank.hpa_of(OLD_GPA)] * 2  # the old binding, under the new epoch: same owner
        assert rd.unit.pasid_path.iotlb.lookup(pasid_tag(old_tag, PASID), IOVA_BASE, True, count=False)
        deadline = time.monotonic() + 5
        while dma() is not None and time.monotonic() < deadline:  # the host's posted PASID-cache flush
            time.sleep(0.01)
        assert dma() is None and dev.pasids == {}
        for dom_id in range(10, 15):  # the tag FIFO comes round to the old tag
            domain(dom_id, None)
        domain(1, NEW_GPA)
        assert part.domains[1].tag == old_tag
        assert race.call(part, AttachDevicePasidInput(race.device_domain(1), device_id, PASID)) == HvStatus.SUCCESS
        assert dma() == part.bank.hpa_of(NEW_GPA), "the old incarnation's translation answered the new binding"
    finally:
        race.close()
