"""Map, DMA, the stale-IOTLB hazard and a cross-partition refusal."""
import pytest

from pviommu.client import HvCallError


@pytest.mark.pviommu(guests=2, devices=1)
def test_stale_iotlb_and_cross_partition_refusal(pviommu_system):
    g0, g1 = pviommu_system.guests
    dev = g0.devices[0]
    src = dev.alloc_map(4096, "to-device", fill=0x5A)
    dst = dev.alloc_map(4096, "from-device")
    assert dev.memmove(dst, src).ok and dst.read() == src.read()
    dst.unmap(skip_flush=True)                      # unmapped, but the IOTLB still holds it
    assert dev.memmove(dst, src).ok                 # the device still reaches the page
    dev.flush()
    after = dev.memmove(dst, src)
    assert after.status_name == "DSA_COMP_PAGE_FAULT_NOBOF" and after.fault_addr == dst.iova
    with pytest.raises(HvCallError) as refused:     # guest0 takes guest1's device: refused
        g0.hypervisor.attach(dev.domain.domain_id, g1.devices[0].id)
    assert refused.value.hv_status_name == "HV_STATUS_ACCESS_DENIED"
