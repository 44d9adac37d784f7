"""Every error status, each asserting that memory outside what the status
reports (the completion record) is untouched."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pviommu.abi.dsa import (
    COMP_SIZE,
    DESC_SIZE,
    CompletionRecord,
    DescFlags,
    Descriptor,
    DsaStatus,
    Opcode,
    WqCfg,
    op_ap_delta,
    op_compare,
    op_cr_delta,
    op_crc,
    op_dualcast,
)
from tests.kit.rig import DEDICATED_WQ, SHARED_WQ, Rig

N = 8192


def run_isolated(rig: Rig, d: Descriptor, wq: int = DEDICATED_WQ) -> CompletionRecord:
    """Run ``d`` and check that only its completion record changed."""
    comp = rig.comp()
    before = rig.snapshot()
    d = d.with_(completion_addr=comp, flags=d.flags | DescFlags.CRAV | DescFlags.RCR)
    assert rig.device.submit(wq, d)
    rec = rig.wait(comp)
    after = rig.snapshot()
    assert before[:comp] == after[:comp] and before[comp + COMP_SIZE :] == after[comp + COMP_SIZE :]
    return rec


@pytest.fixture
def bufs(rig: Rig) -> tuple[int, int, int]:
    a, b, c = rig.alloc(N), rig.alloc(N), rig.alloc(N)
    rig.write(a, bytes(range(256)) * (N // 256))
    rig.write(b, b"\x5a" * N)
    return a, b, c


MOVE = Descriptor(opcode=Opcode.MEMMOVE, xfer_size=N)


@pytest.mark.parametrize("opcode", [0x0B, 0x17, 0x0A, 0x21, 0xFF])
def test_unsupported_opcode_is_bad_opcode(rig: Rig, opcode: int) -> None:
    assert run_isolated(rig, Descriptor(opcode=opcode)).code == DsaStatus.BAD_OPCODE


def test_flag_not_valid_for_opcode_reports_invalid_flags(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, _ = bufs
    rec = run_isolated(rig, MOVE.with_(src_addr=a, dst_addr=b, flags=DescFlags.CR | 0x40))
    assert rec.code == DsaStatus.INVALID_FLAGS and rec.invalid_flags == DescFlags.CR | 0x40


def test_bof_on_batch_is_invalid(rig: Rig) -> None:
    rec = run_isolated(rig, Descriptor(opcode=Opcode.BATCH, flags=DescFlags.BOF, src_addr=rig.alloc(128, 64),
                                       xfer_size=2))
    assert rec.code == DsaStatus.INVALID_FLAGS and rec.invalid_flags == DescFlags.BOF


@pytest.mark.parametrize("field,value", [("rsvd1", 1), ("rsvd", 0x400), ("op_specific", b"\x01" + bytes(23))])
def test_nonzero_reserved_field(rig: Rig, bufs: tuple[int, int, int], field: str, value: int | bytes) -> None:
    a, b, _ = bufs
    rec = run_isolated(rig, MOVE.with_(src_addr=a, dst_addr=b, **{field: value}))
    assert rec.code == DsaStatus.NOZERO_RESERVE


def test_noop_with_addresses_is_nonzero_reserved(rig: Rig) -> None:
    assert run_isolated(rig, Descriptor(opcode=Opcode.NOOP, xfer_size=4)).code == DsaStatus.NOZERO_RESERVE


@pytest.mark.parametrize("size", [0, (2 << 20) + 1])
def test_transfer_size_out_of_range(rig: Rig, bufs: tuple[int, int, int], size: int) -> None:
    a, b, _ = bufs
    assert run_isolated(rig, MOVE.with_(src_addr=a, dst_addr=b, xfer_size=size)).code == DsaStatus.XFER_ERANGE


@pytest.mark.parametrize("count", [0, 1, 33])
def test_batch_count_out_of_range(rig: Rig, count: int) -> None:
    d = Descriptor(opcode=Opcode.BATCH, src_addr=rig.alloc(64 * 40, 64), xfer_size=count)
    assert run_isolated(rig, d).code == DsaStatus.DESC_CNT_ERANGE


def test_batch_list_misaligned(rig: Rig) -> None:
    d = Descriptor(opcode=Opcode.BATCH, src_addr=rig.alloc(256, 64) + 32, xfer_size=2)
    assert run_isolated(rig, d).code == DsaStatus.DESCLIST_ALIGN


def test_cr_delta_bad_max_delta_size(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, c = bufs
    for size in (70, 85):
        d = Descriptor(opcode=Opcode.CR_DELTA, src_addr=a, dst_addr=b, xfer_size=N,
                       op_specific=op_cr_delta(c, size))
        assert run_isolated(rig, d).code == DsaStatus.DR_ERANGE


def test_cr_delta_misaligned_address(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, c = bufs
    d = Descriptor(opcode=Opcode.CR_DELTA, src_addr=a + 4, dst_addr=b, xfer_size=N - 8,
                   op_specific=op_cr_delta(c, 80))
    assert run_isolated(rig, d).code == DsaStatus.ADDR_ALIGN


def test_copy_crc_overlap(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, _, _ = bufs
    d = Descriptor(opcode=Opcode.COPY_CRC, src_addr=a, dst_addr=a + 16, xfer_size=64, op_specific=op_crc())
    assert run_isolated(rig, d).code == DsaStatus.OVERLAP_BUFFERS


def test_dualcast_page_offsets_must_match(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, c = bufs
    d = Descriptor(opcode=Opcode.DUALCAST, src_addr=a, dst_addr=b, xfer_size=64, op_specific=op_dualcast(c + 8))
    assert run_isolated(rig, d).code == DsaStatus.DCAST_ERR


def test_dualcast_overlapping_destinations(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, _ = bufs
    d = Descriptor(opcode=Opcode.DUALCAST, src_addr=a, dst_addr=b, xfer_size=N, op_specific=op_dualcast(b + 4096))
    assert run_isolated(rig, d).code == DsaStatus.OVERLAP_BUFFERS


def test_invalid_interrupt_handle(rig: Rig) -> None:
    d = Descriptor(opcode=Opcode.NOOP, flags=DescFlags.RCI, int_handle=100)
    assert run_isolated(rig, d).code == DsaStatus.INT_HANDLE_INVAL
    assert rig.interrupts == []


def test_privileged_descriptor_on_user_shared_wq(rig: Rig) -> None:
    assert run_isolated(rig, Descriptor(opcode=Opcode.NOOP, priv=1), SHARED_WQ).code == DsaStatus.PRIV_BAD


def test_ap_delta_offsets_not_increasing_and_out_of_range(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, _ = bufs
    rig.write(a, struct.pack("<HQHQ", 5, 1, 3, 2))
    d = Descriptor(opcode=Opcode.AP_DELTA, src_addr=a, dst_addr=b, xfer_size=N, op_specific=op_ap_delta(20))
    assert run_isolated(rig, d).code == DsaStatus.DR_OFFSET_NOINC
    rig.write(a, struct.pack("<HQHQ", 5, 1, N // 8, 2))
    assert run_isolated(rig, d).code == DsaStatus.DR_OFFSET_ERANGE


def test_misaligned_completion_record_writes_nothing_and_logs_swerr(rig: Rig) -> None:
    comp = rig.comp() + 8
    before = rig.snapshot()
    assert rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.NOOP, completion_addr=comp,
                                                      flags=DescFlags.CRAV | DescFlags.RCR))
    rig.settle()
    assert rig.snapshot() == before
    assert rig.device.swerr[-1].status == DsaStatus.CRA_ALIGN
    assert rig.device.counters.completions[DsaStatus.CRA_ALIGN] == 1


def test_compare_check_result_gives_success_pred(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, _ = bufs
    d = Descriptor(opcode=Opcode.COMPARE, flags=DescFlags.CR, src_addr=a, dst_addr=b, xfer_size=N,
                   op_specific=op_compare(0))
    rec = run_isolated(rig, d)
    assert rec.code == DsaStatus.SUCCESS_PRED and rec.result == 1 and rec.bytes_completed == 0


def test_batch_pointing_at_itself_ends_with_defined_status(rig: Rig) -> None:
    lst = rig.alloc(2 * DESC_SIZE, 64)
    sub_comp = rig.comp()
    batch = Descriptor(opcode=Opcode.BATCH, flags=DescFlags.CRAV | DescFlags.RCR, completion_addr=sub_comp,
                       src_addr=lst, xfer_size=2)
    rig.write(lst, batch.pack() + batch.pack())  # the list holds the batch itself
    rec = rig.run(batch.with_(flags=0, completion_addr=0))
    assert rec.code == DsaStatus.BATCH_FAIL and rec.descs_completed == 2
    assert rig.record(sub_comp).code == DsaStatus.BAD_OPCODE


def test_failed_entry_fails_batch_but_others_run(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, _ = bufs
    c1, c2 = rig.comp(), rig.comp()
    lst = rig.alloc(2 * DESC_SIZE, 64)
    f = DescFlags.CRAV | DescFlags.RCR
    rig.write(lst, Descriptor(opcode=0x0B, flags=f, completion_addr=c1).pack()
              + MOVE.with_(flags=f, completion_addr=c2, src_addr=a, dst_addr=b).pack())
    rec = rig.run(Descriptor(opcode=Opcode.BATCH, src_addr=lst, xfer_size=2))
    assert rec.code == DsaStatus.BATCH_FAIL and rec.descs_completed == 2
    assert rig.record(c1).code == DsaStatus.BAD_OPCODE and rig.record(c2).code == DsaStatus.SUCCESS
    assert rig.read(b, N) == rig.read(a, N)


def test_fence_after_failure_abandons_rest_of_batch(rig: Rig, bufs: tuple[int, int, int]) -> None:
    a, b, _ = bufs
    c1, c2 = rig.comp(), rig.comp()
    lst = rig.alloc(2 * DESC_SIZE, 64)
    f = DescFlags.CRAV | DescFlags.RCR
    rig.write(lst, Descriptor(opcode=0x0B, flags=f, completion_addr=c1).pack()
              + MOVE.with_(flags=f | DescFlags.FENCE, completion_addr=c2, src_addr=a, dst_addr=b).pack())
    before_b = rig.read(b, N)
    rec = rig.run(Descriptor(opcode=Opcode.BATCH, src_addr=lst, xfer_size=2))
    assert rec.code == DsaStatus.BATCH_FAIL and rec.descs_completed == 1
    assert rig.record(c2).code == DsaStatus.NONE and rig.read(b, N) == before_b


def test_bof_flag_on_wq_without_bof_is_invalid(tmp_path: Path) -> None:
    rig = Rig(tmp_path, enable=False)
    try:
        rig.device.configure_wq(DEDICATED_WQ, WqCfg(wq_size=4, bof=False))
        rig.device.configure_group(0, [DEDICATED_WQ], [0])
        rig.device.enable_device()
        rig.device.enable_wq(DEDICATED_WQ)
        rec = rig.run(Descriptor(opcode=Opcode.NOOP, flags=DescFlags.BOF))
        assert rec.code == DsaStatus.INVALID_FLAGS and rec.invalid_flags == DescFlags.BOF
    finally:
        rig.close()
