"""Translation faults: partial completion, block-on-fault with page requests,
completion-record faults, an unassigned device."""

from __future__ import annotations

import threading
from pathlib import Path

import crc32c

from dma_device.dsa import DsaDeviceConfig
from pviommu.abi.dsa import (
    COMP_SIZE,
    DESC_SIZE,
    STATUS_WRITE,
    DescFlags,
    Descriptor,
    DsaStatus,
    Opcode,
    op_crc,
)
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE
from pviommu.mem.dma import DmaFault
from pviommu.units import MiB
from tests.kit.rig import DEDICATED_WQ, Rig


def move(src: int, dst: int, n: int, flags: int = 0) -> Descriptor:
    return Descriptor(opcode=Opcode.MEMMOVE, flags=flags, src_addr=src, dst_addr=dst, xfer_size=n)


def setup_copy(rig: Rig, n: int = MiB) -> tuple[int, int]:
    src, dst = rig.alloc(n), rig.alloc(n)
    rig.write(src, bytes(range(256)) * (n // 256))
    return src, dst


def test_unmapped_source_page_mid_copy_completes_partially(rig: Rig) -> None:
    src, dst = setup_copy(rig)
    hole = src + MiB // 2
    rig.iommu.unmapped.add(hole >> PAGE_SHIFT)
    before = rig.read(dst, MiB)
    rec = rig.run(move(src, dst, MiB))
    assert rec.status == DsaStatus.PAGE_FAULT_NOBOF  # read fault: write bit clear
    assert rec.bytes_completed == MiB // 2 and rec.fault_addr == hole
    after = rig.read(dst, MiB)
    assert after[: MiB // 2] == rig.read(src, MiB // 2)
    assert after[MiB // 2 :] == before[MiB // 2 :]  # nothing beyond the fault written
    assert [f.iova for f in rig.faults] == [hole]


def test_read_only_destination_page_sets_write_bit(rig: Rig) -> None:
    src, dst = setup_copy(rig)
    ro = dst + 3 * PAGE_SIZE
    rig.iommu.readonly.add(ro >> PAGE_SHIFT)
    rec = rig.run(move(src, dst, MiB))
    assert rec.status == DsaStatus.PAGE_FAULT_NOBOF | STATUS_WRITE
    assert rec.bytes_completed == 3 * PAGE_SIZE and rec.fault_addr == ro
    assert rig.read(ro, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_software_resubmits_rest_after_partial_completion(rig: Rig) -> None:
    src, dst = setup_copy(rig)
    rig.iommu.unmapped.add((src + MiB // 4) >> PAGE_SHIFT)
    rec = rig.run(move(src, dst, MiB))
    rig.iommu.unmapped.clear()  # "touch the page"
    bc = rec.bytes_completed
    assert rig.run(move(src + bc, dst + bc, MiB - bc)).code == DsaStatus.SUCCESS
    assert rig.read(dst, MiB) == rig.read(src, MiB)


def test_bof_page_request_that_maps_the_page_completes_the_copy(rig: Rig) -> None:
    src, dst = setup_copy(rig)
    hole = (src + MiB // 2) >> PAGE_SHIFT
    rig.iommu.unmapped.add(hole)
    asked: list[DmaFault] = []

    def resolve(fault: DmaFault) -> bool:
        asked.append(fault)
        rig.iommu.unmapped.discard(int(fault.iova) >> PAGE_SHIFT)
        return True

    rig.device.on_page_request = resolve
    rec = rig.run(move(src, dst, MiB, DescFlags.BOF))
    assert rec.code == DsaStatus.SUCCESS
    assert rig.read(dst, MiB) == rig.read(src, MiB)
    assert [int(f.iova) for f in asked] == [hole << PAGE_SHIFT]
    assert rig.device.counters.page_requests == 1 and rig.device.counters.faults == 1


def test_bof_page_request_refused_gives_page_fault_ir(rig: Rig) -> None:
    src, dst = setup_copy(rig)
    rig.iommu.unmapped.add((dst + PAGE_SIZE) >> PAGE_SHIFT)
    rig.device.on_page_request = lambda fault: False
    rec = rig.run(move(src, dst, MiB, DescFlags.BOF))
    assert rec.status == DsaStatus.PAGE_FAULT_IR | STATUS_WRITE
    assert rec.bytes_completed == PAGE_SIZE


def test_bof_page_request_timeout_gives_partial_completion(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DsaDeviceConfig(page_request_timeout=0.05))
    try:
        src, dst = setup_copy(rig, 64 * 1024)
        rig.iommu.unmapped.add(src >> PAGE_SHIFT)
        release = threading.Event()
        rig.device.on_page_request = lambda fault: release.wait(5) or None
        rec = rig.run(move(src, dst, 64 * 1024, DescFlags.BOF))
        release.set()
        assert rec.code == DsaStatus.PAGE_FAULT_NOBOF and rec.bytes_completed == 0
        assert rig.device.counters.page_request_outcomes["timeout"] == 1
    finally:
        rig.close()


def test_bof_without_page_request_handler_completes_partially(rig: Rig) -> None:
    src, dst = setup_copy(rig)
    rig.iommu.unmapped.add((src + 2 * PAGE_SIZE) >> PAGE_SHIFT)
    rec = rig.run(move(src, dst, MiB, DescFlags.BOF))
    assert rec.code == DsaStatus.PAGE_FAULT_NOBOF and rec.bytes_completed == 2 * PAGE_SIZE


def test_compare_and_crc_report_progress_at_fault(rig: Rig) -> None:
    a, b = setup_copy(rig)
    rig.write(b, rig.read(a, MiB))
    rig.iommu.unmapped.add((b + 5 * PAGE_SIZE) >> PAGE_SHIFT)
    rec = rig.run(Descriptor(opcode=Opcode.COMPARE, src_addr=a, dst_addr=b, xfer_size=MiB))
    assert rec.code == DsaStatus.PAGE_FAULT_NOBOF and rec.bytes_completed == 5 * PAGE_SIZE
    rig.iommu.unmapped = {(a + 7 * PAGE_SIZE) >> PAGE_SHIFT}
    rec = rig.run(Descriptor(opcode=Opcode.CRCGEN, src_addr=a, xfer_size=MiB, op_specific=op_crc(7)))
    assert rec.code == DsaStatus.PAGE_FAULT_NOBOF and rec.bytes_completed == 7 * PAGE_SIZE
    assert rec.crc_val == crc32c.crc32c(rig.read(a, 7 * PAGE_SIZE), 7)


def test_faulting_completion_record_is_counted_and_reported(rig: Rig) -> None:
    src, dst = setup_copy(rig, PAGE_SIZE)
    comp = rig.alloc(PAGE_SIZE)
    rig.iommu.unmapped.add(comp >> PAGE_SHIFT)
    d = move(src, dst, PAGE_SIZE).with_(flags=DescFlags.CRAV | DescFlags.RCR | DescFlags.RCI,
                                        completion_addr=comp, int_handle=1)
    assert rig.device.submit(DEDICATED_WQ, d)
    rig.settle()
    assert rig.read(dst, PAGE_SIZE) == rig.read(src, PAGE_SIZE)
    assert rig.device.counters.cr_faults == 1
    assert [int(f.iova) for f in rig.faults] == [comp]
    assert rig.device.swerr[-1].status == DsaStatus.CRA_XLAT
    assert rig.interrupts == []


def test_unassigned_device_blocks_all_dma(rig: Rig) -> None:
    src, dst = setup_copy(rig, PAGE_SIZE)
    comp = rig.comp()
    rig.device.bind(None)
    before = rig.snapshot()
    assert rig.device.submit(DEDICATED_WQ, move(src, dst, PAGE_SIZE).with_(
        flags=DescFlags.CRAV | DescFlags.RCR, completion_addr=comp))
    rig.settle()
    assert rig.snapshot() == before
    assert rig.device.counters.cr_faults == 1
    assert {f.reason_name for f in rig.faults} == {"NO_DOMAIN"}
    rig.device.bind(rig.dma)
    assert rig.run(move(src, dst, PAGE_SIZE)).code == DsaStatus.SUCCESS


def test_fault_reading_batch_list_runs_entries_before_it(rig: Rig) -> None:
    lst = rig.alloc(2 * PAGE_SIZE)
    second_page = lst + PAGE_SIZE
    first = lst + PAGE_SIZE - 2 * DESC_SIZE  # two entries fit before the hole
    comps = [rig.comp(), rig.comp()]
    f = DescFlags.CRAV | DescFlags.RCR
    rig.write(first, b"".join(Descriptor(opcode=Opcode.NOOP, flags=f, completion_addr=c).pack() for c in comps))
    rig.iommu.unmapped.add(second_page >> PAGE_SHIFT)
    rec = rig.run(Descriptor(opcode=Opcode.BATCH, src_addr=first, xfer_size=4))
    assert rec.code == DsaStatus.BATCH_PAGE_FAULT and rec.descs_completed == 2
    assert rec.fault_addr == second_page
    assert all(rig.record(c).code == DsaStatus.SUCCESS for c in comps)


def test_batch_entry_fault_without_bof_fails_batch(rig: Rig) -> None:
    src, dst = setup_copy(rig, 4 * PAGE_SIZE)
    rig.iommu.unmapped.add((src + PAGE_SIZE) >> PAGE_SHIFT)
    comps = [rig.comp(), rig.comp()]
    f = DescFlags.CRAV | DescFlags.RCR
    lst = rig.alloc(2 * DESC_SIZE, 64)
    rig.write(lst, move(src, dst, 4 * PAGE_SIZE, f).with_(completion_addr=comps[0]).pack()
              + Descriptor(opcode=Opcode.NOOP, flags=f, completion_addr=comps[1]).pack())
    rec = rig.run(Descriptor(opcode=Opcode.BATCH, src_addr=lst, xfer_size=2))
    assert rec.code == DsaStatus.BATCH_FAIL and rec.descs_completed == 2
    sub = rig.record(comps[0])
    assert sub.code == DsaStatus.PAGE_FAULT_NOBOF and sub.bytes_completed == PAGE_SIZE
    assert rig.record(comps[1]).code == DsaStatus.SUCCESS


def test_record_status_written_last(rig: Rig) -> None:
    """A poller that sees a nonzero status sees the whole record: the record
    goes through ``DmaMemory.write_record`` (byte 0 after bytes 1..31, see
    tests/core/test_nested_unit.py), whole, at the record's address."""
    writes: list[tuple[int, int]] = []
    real = rig.dma.write_record

    def spy(iova, data):  # type: ignore[no-untyped-def]
        writes.append((int(iova), len(data)))
        return real(iova, data)

    rig.dma.write_record = spy  # type: ignore[method-assign]
    comp = rig.comp()
    assert rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.NOOP, flags=DescFlags.CRAV | DescFlags.RCR,
                                                      completion_addr=comp))
    rig.wait(comp)
    assert writes[-1:] == [(comp, COMP_SIZE)]
