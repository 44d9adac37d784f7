"""Named DSA operations on the default one-guest system (pyproject.toml sets its shape)."""
import zlib

from pviommu.client import Opcode, build


def test_fill_compare_and_crc(pviommu_device):
    buf = pviommu_device.alloc_map(8192, "bidirectional")
    assert pviommu_device.fill(buf, 0x1122334455667788).ok
    assert buf.read(0, 8) == bytes.fromhex("8877665544332211")
    same = pviommu_device.compare_pattern(buf, 0x1122334455667788)
    assert same.ok and same.result == 0
    crc = pviommu_device.crc(buf)
    assert crc.ok and crc.crc != 0 and crc.crc != zlib.crc32(buf.read())  # CRC-32C, not CRC-32


def test_a_batch_reports_each_entry(pviommu_device):
    src = pviommu_device.alloc_map(4096, "to-device", data=bytes(range(256)) * 16)
    a, b = (pviommu_device.alloc_map(4096, "from-device") for _ in range(2))
    done = pviommu_device.batch([build("memmove", dst=a, src=src), build("memmove", dst=b, src=src)])
    assert done.ok and done.descs_completed == 2
    assert [e.opcode for e in done.entries] == [Opcode.MEMMOVE, Opcode.MEMMOVE]
    assert a.read() == b.read() == src.read()


def test_a_fault_reaches_the_guest_and_the_admin_explains_it(pviommu_system, pviommu_device):
    guest = pviommu_system.guests[0]
    src = pviommu_device.alloc_map(4096, "to-device")
    dst = pviommu_device.alloc_map(4096, "to-device")         # the device may not write here
    rec = pviommu_device.memmove(dst, src)
    assert not rec.ok and rec.fault_addr == dst.iova and rec.fault_was_write
    fault = guest.wait_fault(dst, write=True)
    walk = pviommu_system.admin.explain(guest.partition_id, dst.iova, device=pviommu_device.id, write=True)
    assert not walk.ok and walk.fault_reason_name == fault.reason_name
