"""Byte-for-byte tests of pviommu.abi.dsa.

Every expected byte string is written by hand from the idxd.h / registers.h
offsets (reference/dsa-dmatest.md sections 1, 3, 4), never produced by the
encoder under test."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pviommu.abi.dsa import (
    STATUS_WRITE,
    Cmd,
    CompletionRecord,
    DescFlags,
    Descriptor,
    DsaStatus,
    GenCap,
    Opcode,
    WqCap,
    WqCfg,
    cmd_encode,
    cmdsts_encode,
    grpcfg_pack,
    op_cr_delta,
    op_crc,
    op_dif_ins,
    opcap_encode,
    opcap_words,
)

H = bytes.fromhex

CRC_DESC = H(
    "45230180"  # pasid 0x12345 bits 0-19, priv bit 31
    "0c000110"  # flags CRAV|RCR|read-seed (bytes 4-6), opcode 0x10 (byte 7)
    "8077665544332211"  # completion_addr @8
    "0807060504030201"  # src_addr @16
    "0000000000000000"  # dst_addr @24
    "00100000"  # xfer_size @32
    "0302" "0000"  # int_handle @36, rsvd1 @38
    "efbeadde" "00000000" "a8a6a5a4a3a2a1a0" "0000000000000000"  # crc_seed @40, rsvd, seed_addr @48
)


def test_descriptor_unpack_reads_uapi_offsets() -> None:
    d = Descriptor.unpack(CRC_DESC)
    assert d.pasid == 0x12345 and d.priv == 1 and d.rsvd == 0
    assert d.opcode == Opcode.CRCGEN
    assert d.flags == DescFlags.CRAV | DescFlags.RCR | 0x10000
    assert d.completion_addr == 0x1122334455667780
    assert d.src_addr == 0x0102030405060708 and d.dst_addr == 0
    assert d.xfer_size == 0x1000 and d.int_handle == 0x0203 and d.rsvd1 == 0
    assert d.crc_seed == 0xDEADBEEF and d.seed_addr == 0xA0A1A2A3A4A5A6A8


def test_descriptor_pack_gives_hand_written_bytes() -> None:
    d = Descriptor(opcode=Opcode.CRCGEN, flags=DescFlags.CRAV | DescFlags.RCR | 0x10000, pasid=0x12345,
                   priv=1, completion_addr=0x1122334455667780, src_addr=0x0102030405060708,
                   xfer_size=0x1000, int_handle=0x0203, op_specific=op_crc(0xDEADBEEF, 0xA0A1A2A3A4A5A6A8))
    assert d.pack() == CRC_DESC
    assert len(d.pack()) == 64


def test_descriptor_reserved_bits_20_30_roundtrip() -> None:
    raw = bytearray(CRC_DESC)
    raw[2] |= 0x10  # bit 20
    raw[3] |= 0x40  # bit 30
    d = Descriptor.unpack(bytes(raw))
    assert d.rsvd == 0x401 and d.pasid == 0x12345 and d.priv == 1
    assert d.pack() == bytes(raw)


def test_dif_insert_fields_at_41_42_56_60_62() -> None:
    ops = H("00" "80" "02" "0000000000" "0000000000000000" "baab0000" "ffff" "cefa")
    assert op_dif_ins(0x80, 0x02, 0xABBA, 0xFFFF, 0xFACE) == ops
    d = Descriptor(opcode=Opcode.DIF_INS, op_specific=ops)
    assert (d.dest_dif_flags, d.dif_flags, d.ins_ref_tag_seed, d.ins_app_tag_mask, d.ins_app_tag_seed) == (
        0x80, 0x02, 0xABBA, 0xFFFF, 0xFACE)


def test_cr_delta_fields_at_40_48_56() -> None:
    ops = H("0010000000000000" "50000000" "00000000" "03" "00000000000000")
    assert op_cr_delta(0x1000, 80, 3) == ops
    d = Descriptor(opcode=Opcode.CR_DELTA, op_specific=ops)
    assert (d.delta_addr, d.max_delta_size, d.expected_res_mask) == (0x1000, 80, 3)


def test_unions_alias_src_dst_xfer() -> None:
    d = Descriptor.unpack(CRC_DESC)
    assert d.pattern == d.desc_list_addr == d.src_addr
    assert d.src2_addr == d.comp_pattern == d.dst_addr
    assert d.desc_count == d.xfer_size


COMP = H(
    "83"  # status: PAGE_FAULT_NOBOF | write bit
    "01" "00" "00"  # result, fault_info, rsvd
    "45230100"  # bytes_completed @4
    "0010ffffff7f0000"  # fault_addr @8
    "bebafeca00000000" "0000000000000000"  # crc_val @16 (u64)
)


def test_completion_record_unpack() -> None:
    r = CompletionRecord.unpack(COMP)
    assert r.code == DsaStatus.PAGE_FAULT_NOBOF and r.fault_was_write
    assert r.result == 1 and r.bytes_completed == 0x12345 and r.fault_addr == 0x7FFFFFFF1000
    assert r.crc_val == 0xCAFEBABE


def test_completion_record_pack() -> None:
    r = CompletionRecord(status=DsaStatus.PAGE_FAULT_NOBOF | STATUS_WRITE, result=1, bytes_completed=0x12345,
                         fault_addr=0x7FFFFFFF1000, op_specific=H("bebafeca" + "00" * 12))
    assert r.pack() == COMP


def test_completion_invalid_flags_is_24_bits_at_16() -> None:
    r = CompletionRecord.unpack(H("11000000" "00000000" + "00" * 8 + "020000ff" + "00" * 12))
    assert r.dsa_status == DsaStatus.INVALID_FLAGS and r.invalid_flags == 0x000002


def test_completion_dif_tags_at_16_to_31() -> None:
    r = CompletionRecord.unpack(H("09" "01" "0000" "00000000" + "00" * 8
                                  + "bbaa0000" "0000" "cefa" "ccbb0000" "ffff" "0100"))
    assert (r.dif_status, r.dif_chk_ref_tag, r.dif_chk_app_tag_mask, r.dif_chk_app_tag) == (1, 0xAABB, 0, 0xFACE)
    assert (r.dif_ins_ref_tag, r.dif_ins_app_tag_mask, r.dif_ins_app_tag) == (0xBBCC, 0xFFFF, 1)


def test_status_codes_match_idxd_h() -> None:
    expected = {"NONE": 0, "SUCCESS": 1, "SUCCESS_PRED": 2, "PAGE_FAULT_NOBOF": 3, "PAGE_FAULT_IR": 4,
                "BATCH_FAIL": 5, "BATCH_PAGE_FAULT": 6, "DR_OFFSET_NOINC": 7, "DR_OFFSET_ERANGE": 8,
                "DIF_ERR": 9, "BAD_OPCODE": 0x10, "INVALID_FLAGS": 0x11, "NOZERO_RESERVE": 0x12,
                "XFER_ERANGE": 0x13, "DESC_CNT_ERANGE": 0x14, "DR_ERANGE": 0x15, "OVERLAP_BUFFERS": 0x16,
                "DCAST_ERR": 0x17, "DESCLIST_ALIGN": 0x18, "INT_HANDLE_INVAL": 0x19, "CRA_XLAT": 0x1A,
                "CRA_ALIGN": 0x1B, "ADDR_ALIGN": 0x1C, "PRIV_BAD": 0x1D, "TRAFFIC_CLASS_CONF": 0x1E,
                "PFAULT_RDBA": 0x1F, "HW_ERR1": 0x20, "HW_ERR_DRB": 0x21, "TRANSLATION_FAIL": 0x22,
                "DRAIN_EVL": 0x26, "BATCH_EVL_ERR": 0x27}
    assert {s.name: int(s) for s in DsaStatus} == expected


def test_opcodes_and_flags_match_idxd_h() -> None:
    assert [int(o) for o in Opcode] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xA, 0x10, 0x11, 0x12, 0x13, 0x14,
                                        0x15, 0x17, 0x20]
    assert (DescFlags.FENCE, DescFlags.BOF, DescFlags.CRAV, DescFlags.RCR, DescFlags.RCI, DescFlags.CRSTS,
            DescFlags.CR, DescFlags.CC, DescFlags.STORD, DescFlags.DRDBK, DescFlags.DSTS) == (
        0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x80, 0x100, 0x2000, 0x4000, 0x8000)


def test_gencap_encoding_and_real_spr_value() -> None:
    assert GenCap().encode() == 0x80B5001F  # bits 0-4, xfer shift 21 @16, batch shift 5 @21, config_en @31
    spr = GenCap.decode(0x40915F0107)  # lore post: 2 GiB transfers, batch 1024
    assert spr.max_xfer_shift == 31 and spr.max_batch_shift == 10
    assert spr.block_on_fault and spr.overlap_copy and spr.cache_control_mem and spr.dest_readback
    assert not spr.cache_control_cache


def test_wqcap_bits() -> None:
    assert WqCap(total_wq_size=128, num_wqs=8).encode() == 0x0002_0000_0008_0080 | 1 << 48 | 1 << 51
    assert WqCap.decode(0x0003_0000_0008_0080).shared_mode


def test_opcap_of_real_host_bits_0_31() -> None:
    ops = [0, 2, 3, 4, 5, 6, 9, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15]
    assert opcap_encode(ops) == 0x003F027D
    assert opcap_words(opcap_encode([0x20, 0x41])) == (1 << 32, 1 << 1, 0, 0)


def test_wqcfg_hand_written() -> None:
    raw = H("10000000" "0f000000" "a2230110" "b5000000" + "00" * 16)
    cfg = WqCfg(wq_size=16, wq_thresh=15, dedicated=False, bof=True, priority=10, pasid=0x123,
                pasid_en=True, max_xfer_shift=21, max_batch_shift=5)
    assert cfg.pack() == raw
    assert WqCfg.unpack(raw) == cfg


def test_grpcfg_and_cmd_registers() -> None:
    assert grpcfg_pack(0b101, 0b11) == H("0500000000000000" + "00" * 24 + "0300000000000000" + "00" * 24)
    assert cmd_encode(Cmd.ENABLE_WQ, 3, int_req=True) == 0x80600003
    assert cmdsts_encode(0x21, 0x1234, active=True) == 0x80123421


@given(st.binary(min_size=64, max_size=64))
def test_descriptor_roundtrip_any_bytes(raw: bytes) -> None:
    assert Descriptor.unpack(raw).pack() == raw


@given(st.binary(min_size=32, max_size=32))
def test_completion_roundtrip_any_bytes(raw: bytes) -> None:
    assert CompletionRecord.unpack(raw).pack() == raw


def test_wrong_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        Descriptor.unpack(b"\0" * 63)
    with pytest.raises(ValueError):
        CompletionRecord.unpack(b"\0" * 33)
