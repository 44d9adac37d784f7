"""The one DMA access API (``pviommu.mem.dma.DmaAccess``) as operations use
it: a buffer is translated once per descriptor (a multi-buffer operation
moves over the runs its common prefix found), moves over runs never reach
past what was translated, and an unbound device is a ``BlockedDma`` that
faults at the first byte of every access and touches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dma_device.dsa import DsaDevice
from pviommu.abi.dsa import COMP_SIZE, DescFlags, Descriptor, DsaStatus, Opcode, op_dif_ins, op_dualcast
from pviommu.addr import PAGE_SIZE, Iova
from pviommu.mem.dma import BlockedDma, DmaMemory, DmaRuns, common_prefix
from tests.kit.rig import DEDICATED_WQ, Rig, default_wqs

N = 4 * PAGE_SIZE


def _translations(rig: Rig, d: Descriptor) -> tuple[int, int]:
    """(translations the descriptor cost, its status code)."""
    before = rig.iommu.calls
    rec = rig.run(d)
    return rig.iommu.calls - before, rec.code


def test_each_buffer_of_a_multi_buffer_operation_is_translated_once(rig: Rig) -> None:
    src, dst, dst2 = rig.alloc(N), rig.alloc(N), rig.alloc(N)
    data = bytes(range(256)) * (N // 256)
    rig.write(src, data)
    record = 1  # the completion record's write
    cases = {
        "dualcast": (Descriptor(opcode=Opcode.DUALCAST, src_addr=src, dst_addr=dst, xfer_size=N,
                                op_specific=op_dualcast(dst2)), 3),
        "copy_crc": (Descriptor(opcode=Opcode.COPY_CRC, src_addr=src, dst_addr=dst, xfer_size=N), 2),
        "overlapping memmove": (Descriptor(opcode=Opcode.MEMMOVE, src_addr=src, dst_addr=src + 64,
                                           xfer_size=N - 64), 2),
        "dif insert": (Descriptor(opcode=Opcode.DIF_INS, src_addr=src, dst_addr=dst, xfer_size=2 * PAGE_SIZE,
                                  op_specific=op_dif_ins(0, 0x2, 0, 0, 0)), 2),
    }
    got = {name: _translations(rig, d) for name, (d, _) in cases.items()}
    assert got == {name: (buffers + record, DsaStatus.SUCCESS) for name, (_, buffers) in cases.items()}
    assert rig.read(dst2, N) == data and rig.read(src + 64, N - 64) == data[:-64]


def test_a_fault_in_the_first_buffer_leaves_the_later_ones_untranslated(rig: Rig) -> None:
    src, dst, dst2 = rig.alloc(N), rig.alloc(N), rig.alloc(N)
    rig.iommu.unmapped.add(src // PAGE_SIZE)
    rig.write(dst, b"\x5a" * N)
    calls, code = _translations(rig, Descriptor(opcode=Opcode.DUALCAST, src_addr=src, dst_addr=dst,
                                                xfer_size=N, op_specific=op_dualcast(dst2)))
    assert (calls, code) == (1 + 1, DsaStatus.PAGE_FAULT_NOBOF)
    assert rig.read(dst, N) == b"\x5a" * N


def test_common_prefix_is_the_shortest_range_and_its_fault(rig: Rig) -> None:
    a, b = rig.alloc(N), rig.alloc(N)
    rig.iommu.readonly.add(b // PAGE_SIZE + 2)
    pre = common_prefix(rig.dma, [(Iova(a), N, False), (Iova(b), N, True)])
    assert pre.done == 2 * PAGE_SIZE and pre.fault is not None and pre.fault.iova == b + 2 * PAGE_SIZE
    assert pre.fault.write and [r.done for r in pre.runs] == [N, 2 * PAGE_SIZE]


def test_moves_over_runs_refuse_more_than_was_translated(rig: Rig) -> None:
    a = rig.alloc(N)
    runs = rig.dma.translate(Iova(a), PAGE_SIZE, True)
    before = rig.snapshot()
    for move in (lambda: rig.dma.read_runs(runs, PAGE_SIZE + 1),
                 lambda: rig.dma.write_runs(runs, bytes(PAGE_SIZE + 1)),
                 lambda: rig.dma.copy_runs(runs, DmaRuns(), 1)):
        with pytest.raises(ValueError):
            move()
    assert rig.snapshot() == before
    rig.dma.write_runs(runs, b"\x11" * PAGE_SIZE)
    assert rig.dma.read_runs(runs, PAGE_SIZE) == b"\x11" * PAGE_SIZE == rig.read(a, PAGE_SIZE)


def test_a_blocked_device_faults_at_the_first_byte_of_every_access() -> None:
    blocked = BlockedDma()
    data, fault = blocked.read(Iova(0x5000), 64)
    assert data == b"" and fault is not None and (fault.iova, fault.write, fault.reason_name) == (0x5000, False,
                                                                                                   "NO_DOMAIN")
    for res, iova, write in ((blocked.write(Iova(0x6000), b"x"), 0x6000, True),
                             (blocked.copy(Iova(0x7000), Iova(0x8000), 8), 0x7000, False),
                             (blocked.write_record(Iova(0x9000), bytes(COMP_SIZE)), 0x9000, True)):
        assert res.done == 0 and res.fault is not None and (res.fault.iova, res.fault.write) == (iova, write)
    assert blocked.translate(Iova(0), PAGE_SIZE, False).runs == []


def test_an_unbound_device_completes_nothing_and_reports_each_fault(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        faults = rig.faults
        device = DsaDevice(None, on_fault=faults.append)
        default_wqs(device)
        assert device.enable_device() == 0 and device.enable_wq(DEDICATED_WQ) == 0
        src, dst, comp = rig.alloc(PAGE_SIZE), rig.alloc(PAGE_SIZE), rig.comp()
        before = rig.snapshot()
        rec = device.execute_now(DEDICATED_WQ, Descriptor(
            opcode=Opcode.MEMMOVE, flags=DescFlags.CRAV | DescFlags.RCR, src_addr=src, dst_addr=dst,
            xfer_size=PAGE_SIZE, completion_addr=comp))
        device.close()
        assert rec.code == DsaStatus.PAGE_FAULT_NOBOF and rec.fault_addr == src
        assert [(f.iova, f.reason_name) for f in faults] == [(src, "NO_DOMAIN"), (comp, "NO_DOMAIN")]
        assert rig.snapshot() == before
    finally:
        rig.close()


def test_dma_memory_is_a_dma_access_the_device_binds_directly(rig: Rig) -> None:
    assert isinstance(rig.dma, DmaMemory)
    rig.device.bind(rig.dma)
    a, b = rig.alloc(PAGE_SIZE), rig.alloc(PAGE_SIZE)
    rig.write(a, b"\x42" * PAGE_SIZE)
    assert rig.run(Descriptor(opcode=Opcode.MEMMOVE, src_addr=a, dst_addr=b, xfer_size=PAGE_SIZE)).code == \
        DsaStatus.SUCCESS
    assert rig.read(b, PAGE_SIZE) == b"\x42" * PAGE_SIZE
