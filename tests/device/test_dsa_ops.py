"""Conformance in the spirit of accel-config's dsa_user_test_runner.sh: each
operation at 1 B, 4 KiB, 64 KiB, 1 MiB and 2 MiB, on the shared and the
dedicated WQ, with BOF on and off, singly and in batches of 16, checked
against software references (status must be exactly SUCCESS)."""

from __future__ import annotations

import struct

import crc32c
import fastcrc
import pytest

from dma_device.dsa import delta
from pviommu.abi.dsa import (
    DESC_SIZE,
    DIF_DST_FIXED_REF_TAG,
    DIF_SRC_FIXED_REF_TAG,
    DescFlags,
    Descriptor,
    DsaStatus,
    Opcode,
    op_ap_delta,
    op_cr_delta,
    op_crc,
    op_dif_check,
    op_dif_ins,
    op_dif_updt,
    op_dualcast,
)
from tests.kit.rig import DEDICATED_WQ, SHARED_WQ, Rig

SIZES = [1, 4096, 65536, 1 << 20, 2 << 20]
WQS = [pytest.param(SHARED_WQ, id="shared"), pytest.param(DEDICATED_WQ, id="dedicated")]
BOFS = [pytest.param(DescFlags.BOF, id="bof"), pytest.param(DescFlags.NONE, id="nobof")]
SRC_PAT = 0x0123456789ABCDEF
DST_PAT = 0xFEDCBA9876543210
SEED = 0x12345678


def pattern(value: int, n: int) -> bytes:
    return (struct.pack("<Q", value) * (n // 8 + 1))[:n]


def buffers(rig: Rig, n: int, count: int = 2) -> list[int]:
    bufs = [rig.alloc(n) for _ in range(count)]
    rig.write(bufs[0], pattern(SRC_PAT, n))
    for b in bufs[1:]:
        rig.write(b, pattern(DST_PAT, n))
    return bufs


def ok(rec_status: int) -> None:
    assert rec_status == DsaStatus.SUCCESS, f"status {rec_status:#x}"


@pytest.mark.parametrize("wq", WQS)
@pytest.mark.parametrize("opcode", [Opcode.NOOP, Opcode.DRAIN])
def test_noop_and_drain_complete(rig: Rig, wq: int, opcode: Opcode) -> None:
    ok(rig.run(Descriptor(opcode=opcode), wq).status)


@pytest.mark.parametrize("bof", BOFS)
@pytest.mark.parametrize("wq", WQS)
@pytest.mark.parametrize("n", SIZES)
class TestEachOperation:
    def test_memmove_copies(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        src, dst = buffers(rig, n)
        ok(rig.run(Descriptor(opcode=Opcode.MEMMOVE, flags=bof, src_addr=src, dst_addr=dst, xfer_size=n),
                   wq).status)
        assert rig.read(dst, n) == rig.read(src, n)

    def test_memfill_writes_pattern(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        (dst,) = buffers(rig, n, 1)
        ok(rig.run(Descriptor(opcode=Opcode.MEMFILL, flags=bof, src_addr=DST_PAT, dst_addr=dst,
                              xfer_size=n), wq).status)
        assert rig.read(dst, n) == pattern(DST_PAT, n)

    def test_compare_equal_then_one_byte_changed(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        a, b = buffers(rig, n)
        rig.write(b, rig.read(a, n))
        d = Descriptor(opcode=Opcode.COMPARE, flags=bof, src_addr=a, dst_addr=b, xfer_size=n)
        rec = rig.run(d, wq)
        ok(rec.status)
        assert rec.result == 0
        rig.write(b + n // 2, bytes([rig.read(b + n // 2, 1)[0] ^ 0xFF]))
        rec = rig.run(d, wq)
        ok(rec.status)
        assert rec.result == 1 and rec.bytes_completed == n // 2

    def test_compval_equal_then_one_byte_changed(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        (a,) = buffers(rig, n, 1)
        d = Descriptor(opcode=Opcode.COMPVAL, flags=bof, src_addr=a, dst_addr=SRC_PAT, xfer_size=n)
        rec = rig.run(d, wq)
        ok(rec.status)
        assert rec.result == 0
        rig.write(a + n // 2, bytes([rig.read(a + n // 2, 1)[0] ^ 0x01]))
        rec = rig.run(d, wq)
        assert rec.result == 1 and rec.bytes_completed == n // 2

    def test_dualcast_writes_both(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        src, dst, dst2 = buffers(rig, n, 3)
        ok(rig.run(Descriptor(opcode=Opcode.DUALCAST, flags=bof, src_addr=src, dst_addr=dst, xfer_size=n,
                              op_specific=op_dualcast(dst2)), wq).status)
        assert rig.read(dst, n) == rig.read(dst2, n) == rig.read(src, n)

    def test_crcgen_matches_crc32c(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        (src,) = buffers(rig, n, 1)
        rec = rig.run(Descriptor(opcode=Opcode.CRCGEN, flags=bof, src_addr=src, xfer_size=n,
                                 op_specific=op_crc(SEED)), wq)
        ok(rec.status)
        assert rec.crc_val == crc32c.crc32c(rig.read(src, n), SEED)

    def test_copy_crc_copies_and_matches(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        src, dst = buffers(rig, n)
        rec = rig.run(Descriptor(opcode=Opcode.COPY_CRC, flags=bof, src_addr=src, dst_addr=dst, xfer_size=n,
                                 op_specific=op_crc(SEED)), wq)
        ok(rec.status)
        assert rig.read(dst, n) == rig.read(src, n)
        assert rec.crc_val == crc32c.crc32c(rig.read(src, n), SEED)

    def test_cflush_completes(self, rig: Rig, n: int, wq: int, bof: int) -> None:
        (dst,) = buffers(rig, n, 1)
        ok(rig.run(Descriptor(opcode=Opcode.CFLUSH, flags=bof, dst_addr=dst, xfer_size=n), wq).status)


@pytest.mark.parametrize("wq", WQS)
@pytest.mark.parametrize("n", [4096, 65536])
def test_batch_of_16_memmoves_each_with_its_record(rig: Rig, n: int, wq: int) -> None:
    subs, pairs = [], []
    for _ in range(16):
        src, dst = buffers(rig, n)
        comp = rig.comp()
        pairs.append((src, dst, comp))
        subs.append(Descriptor(opcode=Opcode.MEMMOVE, flags=DescFlags.CRAV | DescFlags.RCR | DescFlags.BOF,
                               completion_addr=comp, src_addr=src, dst_addr=dst, xfer_size=n))
    lst = rig.alloc(16 * DESC_SIZE, 64)
    rig.write(lst, b"".join(s.pack() for s in subs))
    rec = rig.run(Descriptor(opcode=Opcode.BATCH, src_addr=lst, xfer_size=16), wq)
    ok(rec.status)
    assert rec.descs_completed == 16
    for src, dst, comp in pairs:
        ok(rig.record(comp).status)
        assert rig.read(dst, n) == rig.read(src, n)


@pytest.mark.parametrize("opcode", [Opcode.MEMFILL, Opcode.COMPARE, Opcode.CRCGEN, Opcode.DUALCAST,
                                    Opcode.NOOP, Opcode.CFLUSH])
def test_batch_of_16_other_ops(rig: Rig, opcode: Opcode) -> None:
    n = 4096
    subs, comps = [], []
    for _ in range(16):
        a, b, c = buffers(rig, n, 3)
        rig.write(b, rig.read(a, n))
        comp = rig.comp()
        comps.append(comp)
        d = Descriptor(opcode=opcode, flags=DescFlags.CRAV | DescFlags.RCR, completion_addr=comp)
        if opcode == Opcode.MEMFILL:
            d = d.with_(src_addr=SRC_PAT, dst_addr=c, xfer_size=n)
        elif opcode == Opcode.COMPARE:
            d = d.with_(src_addr=a, dst_addr=b, xfer_size=n)
        elif opcode == Opcode.CRCGEN:
            d = d.with_(src_addr=a, xfer_size=n)
        elif opcode == Opcode.DUALCAST:
            d = d.with_(src_addr=a, dst_addr=b, xfer_size=n, op_specific=op_dualcast(c))
        elif opcode == Opcode.CFLUSH:
            d = d.with_(dst_addr=c, xfer_size=n)
        subs.append(d)
    lst = rig.alloc(16 * DESC_SIZE, 64)
    rig.write(lst, b"".join(s.pack() for s in subs))
    ok(rig.run(Descriptor(opcode=Opcode.BATCH, src_addr=lst, xfer_size=16), SHARED_WQ).status)
    assert all(rig.record(c).code == DsaStatus.SUCCESS for c in comps)


# -- delta records -------------------------------------------------------------------
@pytest.mark.parametrize("wq", WQS)
@pytest.mark.parametrize("n", [8, 4096, 65536, 0x80000])
def test_cr_delta_then_ap_delta_reproduces_src2(rig: Rig, n: int, wq: int) -> None:
    src1, src2, dst = buffers(rig, n, 3)
    rig.write(src2, rig.read(src1, n))
    for off in range(0, n, max(8, n // 7 // 8 * 8)):  # change a few words
        rig.write(src2 + off, b"\xAA")
    max_delta = max(80, 2 * n // 8 * 10 // 10 * 10)
    rec_addr = rig.alloc(max_delta)
    rec = rig.run(Descriptor(opcode=Opcode.CR_DELTA, src_addr=src1, dst_addr=src2, xfer_size=n,
                             op_specific=op_cr_delta(rec_addr, max_delta)), wq)
    ok(rec.status)
    assert rec.result == 1
    expected = delta.create(rig.read(src1, n), rig.read(src2, n))
    assert rec.delta_rec_size == 10 * len(expected)
    rig.write(dst, rig.read(src1, n))
    ok(rig.run(Descriptor(opcode=Opcode.AP_DELTA, src_addr=rec_addr, dst_addr=dst, xfer_size=n,
                          op_specific=op_ap_delta(rec.delta_rec_size)), wq).status)
    assert rig.read(dst, n) == rig.read(src2, n)


def test_cr_delta_equal_buffers_result_0(rig: Rig) -> None:
    a, b = buffers(rig, 4096)
    rig.write(b, rig.read(a, 4096))
    out = rig.alloc(80)
    rec = rig.run(Descriptor(opcode=Opcode.CR_DELTA, src_addr=a, dst_addr=b, xfer_size=4096,
                             op_specific=op_cr_delta(out, 80)))
    ok(rec.status)
    assert rec.result == 0 and rec.delta_rec_size == 0


def test_cr_delta_overflow_result_2(rig: Rig) -> None:
    a, b = buffers(rig, 4096)  # every word differs
    out = rig.alloc(4096)
    rec = rig.run(Descriptor(opcode=Opcode.CR_DELTA, src_addr=a, dst_addr=b, xfer_size=4096,
                             op_specific=op_cr_delta(out, 80)))
    assert rec.result == 2 and rec.delta_rec_size == 80


# -- DIF (sizes as accel-config: 512, 1024, 4096) -------------------------------------
APP, REF = 0xFACE, 0xABBA


def t10(data: bytes) -> int:
    return int(fastcrc.crc16.t10_dif(data))


def protected(data: bytes, bs: int, *, fixed_ref: bool = False) -> bytes:
    out = bytearray()
    for i in range(len(data) // bs):
        blk = data[i * bs : (i + 1) * bs]
        out += blk + struct.pack(">HHI", t10(blk), APP, REF if fixed_ref else REF + i)
    return bytes(out)


def dif_flags_for(n: int) -> tuple[int, int]:
    bs = 4096 if n >= 4096 else 512
    return bs, (2 if bs == 4096 else 0)


@pytest.mark.parametrize("wq", WQS)
@pytest.mark.parametrize("n", [512, 1024, 4096])
def test_dif_insert_check_strip_update(rig: Rig, n: int, wq: int) -> None:
    bs, fl = dif_flags_for(n)
    blocks = n // bs
    (src,) = buffers(rig, n, 1)
    data = rig.read(src, n)
    prot = rig.alloc(n + 8 * blocks)
    ok(rig.run(Descriptor(opcode=Opcode.DIF_INS, src_addr=src, dst_addr=prot, xfer_size=n,
                          op_specific=op_dif_ins(0, fl, REF, 0, APP)), wq).status)
    assert rig.read(prot, n + 8 * blocks) == protected(data, bs)

    pn = n + 8 * blocks
    ok(rig.run(Descriptor(opcode=Opcode.DIF_CHECK, src_addr=prot, xfer_size=pn,
                          op_specific=op_dif_check(0, fl, REF, 0, APP)), wq).status)

    stripped = rig.alloc(n)
    ok(rig.run(Descriptor(opcode=Opcode.DIF_STRP, src_addr=prot, dst_addr=stripped, xfer_size=pn,
                          op_specific=op_dif_check(0, fl, REF, 0, APP)), wq).status)
    assert rig.read(stripped, n) == data

    upd = rig.alloc(pn)
    ok(rig.run(Descriptor(opcode=Opcode.DIF_UPDT, src_addr=prot, dst_addr=upd, xfer_size=pn,
                          op_specific=op_dif_updt(0, DIF_DST_FIXED_REF_TAG, fl, REF, 0, APP, REF, 0, APP)),
               wq).status)
    assert rig.read(upd, pn) == protected(data, bs, fixed_ref=True)
    ok(rig.run(Descriptor(opcode=Opcode.DIF_CHECK, src_addr=upd, xfer_size=pn,
                          op_specific=op_dif_check(DIF_SRC_FIXED_REF_TAG, fl, REF, 0, APP)), wq).status)


def test_dif_check_reports_guard_error_at_bad_block(rig: Rig) -> None:
    bs, n = 512, 2048
    (src,) = buffers(rig, n, 1)
    prot = protected(rig.read(src, n), bs)
    buf = rig.alloc(len(prot))
    rig.write(buf, prot)
    rig.write(buf + 2 * (bs + 8) + 3, b"\x00")  # corrupt block 2's data
    rec = rig.run(Descriptor(opcode=Opcode.DIF_CHECK, src_addr=buf, xfer_size=len(prot),
                             op_specific=op_dif_check(0, 0, REF, 0, APP)))
    assert rec.code == DsaStatus.DIF_ERR
    assert rec.dif_status & 0x01 and rec.bytes_completed == 2 * (bs + 8)
    assert rec.dif_chk_ref_tag == REF + 2


@pytest.mark.parametrize("shift", [-100, 100, -4096, 4096])
def test_overlapping_memmove_behaves_like_memmove(rig: Rig, shift: int) -> None:
    n = 3 * 4096
    base = rig.alloc(n + 2 * 4096) + 4096
    data = bytes(i * 7 % 251 for i in range(n))
    rig.write(base, data)
    rec = rig.run(Descriptor(opcode=Opcode.MEMMOVE, src_addr=base, dst_addr=base + shift, xfer_size=n))
    ok(rec.status)
    assert rec.result == (1 if shift > 0 else 0)  # direction: descending when dst is above src
    assert rig.read(base + shift, n) == data
