"""Descriptor bits 16-23: each operation's own flags, and the CRC variants
they select.

Expected values come from the sources, not from the model: flag bits as
literals (DML specific_flags.hpp, accel-config test/dsa.h, SPDK
idxd_spec.h), per-operation bits 0-15 from DML flags.hpp, and every CRC from
``ref_crc32c`` below, a bit-at-a-time CRC-32C written from the definition
(MSB-first register, poly 0x1EDC6F41) with the variants as DML's CRC kernel
describes them, checked against the published CRC-32C check value.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dma_device.dsa import DsaDeviceConfig
from pviommu.abi.dsa import CompletionRecord, Descriptor, GenCap
from tests.kit.rig import Rig

# Flag bits as the sources give them.
READ_SEED, BYPASS_CRC_INV_REF, BYPASS_DATA_REF = 0x10000, 0x20000, 0x40000
DRAIN_RB1, DRAIN_RB2, DRAIN_SUPPRESS_A, DRAIN_SUPPRESS_B = 0x10000, 0x20000, 0x40000, 0x80000
DCAST_DEST2_ST = 0x10000
ADDR1_TCS, ADDR2_TCS, ADDR3_TCS, STORD, DRDBK = 0x0200, 0x0400, 0x0800, 0x2000, 0x4000
# Opcodes and statuses (idxd.h).
NOOP, DRAIN, MEMMOVE, MEMFILL, COMPARE, COMPVAL, DUALCAST = 0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x09
CRCGEN, COPY_CRC, DIF_CHECK, CFLUSH = 0x10, 0x11, 0x12, 0x20
SUCCESS, PAGE_FAULT_NOBOF, INVALID_FLAGS = 0x01, 0x03, 0x11

CHECK_STRING = b"123456789"
CRC32C_CHECK = 0xE3069283  # CRC-32C ("CRC-32/ISCSI") of "123456789", the published check value
SEED = 0x12345678  # accel-config's seed
M32 = 0xFFFFFFFF


def _rev(v: int, bits: int) -> int:
    out = 0
    for _ in range(bits):
        out = out << 1 | (v & 1)
        v >>= 1
    return out


def ref_crc32c(data: bytes, seed: int, bypass_inv_ref: bool = False, bypass_data_ref: bool = False) -> int:
    """CRC-32C one bit at a time in an MSB-first register (DML's formulation):
    the register starts at reverse(~seed) and bytes go in bit-reversed; the
    result is ~reverse(register); the bypass flags drop those steps."""
    reg = seed & M32 if bypass_inv_ref else _rev(~seed & M32, 32)
    for byte in data:
        reg ^= (byte if bypass_data_ref else _rev(byte, 8)) << 24
        for _ in range(8):
            reg = ((reg << 1) ^ 0x1EDC6F41) & M32 if reg & 0x80000000 else (reg << 1) & M32
    return reg if bypass_inv_ref else ~_rev(reg, 32) & M32


def crc_area(crc_seed: int = 0, seed_addr: int = 0) -> bytes:
    """Descriptor bytes 40-63 of the CRC ops: crc_seed u32 @40, rsvd @44, seed_addr u64 @48."""
    return struct.pack("<IIQ8x", crc_seed, 0, seed_addr)


def all_caps() -> DsaDeviceConfig:
    return DsaDeviceConfig(gencap=GenCap(dest_readback=True, drain_readback=True))


@pytest.fixture
def caps_rig(tmp_path: Path) -> Iterator[Rig]:
    (tmp_path / "caps").mkdir()
    r = Rig(tmp_path / "caps", all_caps())
    yield r
    r.close()


def _data(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def _crc_run(rig: Rig, op: int, flags: int, data: bytes) -> tuple[CompletionRecord, int, int]:
    """Run CRCGEN/COPY_CRC over ``data``; the seed comes from memory when READ_SEED is set."""
    src = rig.alloc(len(data))
    rig.write(src, data)
    dst = rig.alloc(len(data)) if op == COPY_CRC else 0
    if flags & READ_SEED:
        seed_buf = rig.alloc(8, 32)
        rig.write(seed_buf, struct.pack("<Q", SEED))  # accel-config: a u64 holding the seed
        area = crc_area(0, seed_buf)
    else:
        area = crc_area(SEED)
    rec = rig.run(Descriptor(opcode=op, flags=flags, src_addr=src, dst_addr=dst, xfer_size=len(data),
                             op_specific=area))
    return rec, src, dst


CRC_FLAG_SETS = [sum(c) for n in range(4) for c in itertools.combinations(
    (READ_SEED, BYPASS_CRC_INV_REF, BYPASS_DATA_REF), n)]


def test_reference_crc_gives_the_published_crc32c_check_value() -> None:
    assert ref_crc32c(CHECK_STRING, 0) == CRC32C_CHECK


def test_crcgen_with_seed_0_gives_the_published_crc32c_check_value(rig: Rig) -> None:
    src = rig.alloc(len(CHECK_STRING))
    rig.write(src, CHECK_STRING)
    rec = rig.run(Descriptor(opcode=CRCGEN, src_addr=src, xfer_size=len(CHECK_STRING), op_specific=crc_area(0)))
    assert rec.status == SUCCESS and rec.crc_val == CRC32C_CHECK


@pytest.mark.parametrize("flags", CRC_FLAG_SETS, ids=lambda f: f"flags{f:#x}")
@pytest.mark.parametrize("op", [CRCGEN, COPY_CRC], ids=["crcgen", "copy_crc"])
def test_crc_ops_accept_their_flags_with_readback_off_and_compute_the_variant(rig: Rig, op: int,
                                                                              flags: int) -> None:
    data = _data(3000)
    rec, _, dst = _crc_run(rig, op, flags, data)
    assert rec.status == SUCCESS, (hex(rec.status), hex(rec.invalid_flags))
    assert rec.crc_val == ref_crc32c(data, SEED, bool(flags & BYPASS_CRC_INV_REF), bool(flags & BYPASS_DATA_REF))
    if op == COPY_CRC:
        assert rig.read(dst, len(data)) == data


@pytest.mark.parametrize("op", [CRCGEN, COPY_CRC], ids=["crcgen", "copy_crc"])
def test_crc_flags_are_not_gated_by_the_drain_or_destination_readback_capabilities(caps_rig: Rig, op: int) -> None:
    flags = READ_SEED | BYPASS_CRC_INV_REF | BYPASS_DATA_REF
    data = _data(513)
    rec, _, _ = _crc_run(caps_rig, op, flags, data)
    assert rec.status == SUCCESS
    assert rec.crc_val == ref_crc32c(data, SEED, True, True)


def test_bypass_variants_differ_from_the_standard_crc(rig: Rig) -> None:
    """The flags change the result (so a model ignoring them fails the tests above)."""
    data = _data(64)
    values = {ref_crc32c(data, SEED, a, b) for a in (False, True) for b in (False, True)}
    assert len(values) == 4


@pytest.mark.parametrize("flags", [0, BYPASS_CRC_INV_REF, BYPASS_DATA_REF, BYPASS_CRC_INV_REF | BYPASS_DATA_REF],
                         ids=lambda f: f"flags{f:#x}")
def test_a_partial_crc_seeds_the_rest_under_every_variant(rig: Rig, flags: int) -> None:
    data = _data(3 * 4096)
    src = rig.alloc(len(data))
    rig.write(src, data)
    rig.iommu.unmapped.add(src // 4096 + 1)
    first = rig.run(Descriptor(opcode=CRCGEN, flags=flags, src_addr=src, xfer_size=len(data),
                               op_specific=crc_area(SEED)))
    assert first.status == PAGE_FAULT_NOBOF and first.bytes_completed == 4096 and first.fault_addr == src + 4096
    rig.iommu.unmapped.clear()  # software touches the page, then resubmits the rest
    done = first.bytes_completed
    rest = rig.run(Descriptor(opcode=CRCGEN, flags=flags, src_addr=src + done, xfer_size=len(data) - done,
                              op_specific=crc_area(first.crc_val & M32)))
    assert rest.status == SUCCESS
    assert rest.crc_val == ref_crc32c(data, SEED, bool(flags & BYPASS_CRC_INV_REF), bool(flags & BYPASS_DATA_REF))


def test_reading_the_seed_from_an_unmapped_page_faults_at_the_seed_address(rig: Rig) -> None:
    src = rig.alloc(256)
    seed_buf = rig.alloc(4096)
    rig.iommu.unmapped.add(seed_buf // 4096)
    rec = rig.run(Descriptor(opcode=CRCGEN, flags=READ_SEED, src_addr=src, xfer_size=256,
                             op_specific=crc_area(0, seed_buf)))
    assert rec.status == PAGE_FAULT_NOBOF and rec.fault_addr == seed_buf and rec.bytes_completed == 0


@pytest.mark.parametrize("make", [Rig, lambda tmp: Rig(tmp, all_caps())], ids=["readback-off", "readback-on"])
def test_dualcast_accepts_its_destination_2_steering_flag(tmp_path: Path, make: object) -> None:
    rig = make(tmp_path)  # type: ignore[operator]
    try:
        data = _data(2048)
        src, d1, d2 = rig.alloc(2048), rig.alloc(2048), rig.alloc(2048)
        rig.write(src, data)
        rec = rig.run(Descriptor(opcode=DUALCAST, flags=DCAST_DEST2_ST, src_addr=src, dst_addr=d1, xfer_size=2048,
                                 op_specific=struct.pack("<Q16x", d2)))
        assert rec.status == SUCCESS
        assert rig.read(d1, 2048) == data and rig.read(d2, 2048) == data
    finally:
        rig.close()


@pytest.mark.parametrize("bit", [DRAIN_RB1, DRAIN_RB2])
def test_drain_readback_address_flags_need_gencap_drain_readback(rig: Rig, tmp_path: Path, bit: int) -> None:
    buf = rig.alloc(64)
    addrs = {"src_addr": buf} if bit == DRAIN_RB1 else {"dst_addr": buf}
    rec = rig.run(Descriptor(opcode=DRAIN, flags=bit, **addrs))
    assert rec.status == INVALID_FLAGS and rec.invalid_flags == bit
    (tmp_path / "cap").mkdir()
    with_cap = Rig(tmp_path / "cap", all_caps())
    try:
        buf = with_cap.alloc(64)
        addrs = {"src_addr": buf} if bit == DRAIN_RB1 else {"dst_addr": buf}
        assert with_cap.run(Descriptor(opcode=DRAIN, flags=bit, **addrs)).status == SUCCESS
    finally:
        with_cap.close()


@pytest.mark.parametrize("bit", [DRAIN_SUPPRESS_A, DRAIN_SUPPRESS_B])
def test_drain_suppress_readback_flags_are_accepted(rig: Rig, bit: int) -> None:
    assert rig.run(Descriptor(opcode=DRAIN, flags=bit)).status == SUCCESS


OP_BITS = [1 << b for b in range(16, 24)]


@pytest.mark.parametrize("bit", OP_BITS, ids=lambda b: f"{b:#x}")
@pytest.mark.parametrize("op", [NOOP, MEMMOVE, MEMFILL, COMPARE, COMPVAL, DIF_CHECK, CFLUSH],
                         ids=["noop", "memmove", "memfill", "compare", "compval", "dif_check", "cflush"])
def test_operations_without_own_flags_refuse_every_bit_16_to_23_even_with_all_capabilities(
        caps_rig: Rig, op: int, bit: int) -> None:
    rec = caps_rig.run(Descriptor(opcode=op, flags=bit))
    assert rec.status == INVALID_FLAGS and rec.invalid_flags == bit


@pytest.mark.parametrize("op,own", [(CRCGEN, 0x70000), (COPY_CRC, 0x70000), (DUALCAST, 0x10000),
                                    (DRAIN, 0xF0000)], ids=["crcgen", "copy_crc", "dualcast", "drain"])
def test_each_operation_refuses_the_bits_16_to_23_it_does_not_define(caps_rig: Rig, op: int, own: int) -> None:
    for bit in OP_BITS:
        if bit & own:
            continue
        rec = caps_rig.run(Descriptor(opcode=op, flags=bit))
        assert rec.status == INVALID_FLAGS and rec.invalid_flags == bit, hex(bit)


def test_crcgen_takes_address_3_traffic_class_not_address_2(rig: Rig) -> None:
    """DML crc_flag: fence, block on fault, address 1 and 3 TC selectors."""
    src = rig.alloc(128)
    desc = Descriptor(opcode=CRCGEN, src_addr=src, xfer_size=128, op_specific=crc_area(SEED))
    rec = rig.run(desc.with_(flags=ADDR2_TCS))
    assert rec.status == INVALID_FLAGS and rec.invalid_flags == ADDR2_TCS
    assert rig.run(desc.with_(flags=ADDR1_TCS | ADDR3_TCS)).status == SUCCESS


def test_cache_flush_takes_address_2_flags_not_address_1(rig: Rig) -> None:
    """DML cache_flush_flag: the range is in the destination field (address 2)."""
    dst = rig.alloc(4096)
    desc = Descriptor(opcode=CFLUSH, dst_addr=dst, xfer_size=4096)
    rec = rig.run(desc.with_(flags=ADDR1_TCS))
    assert rec.status == INVALID_FLAGS and rec.invalid_flags == ADDR1_TCS
    assert rig.run(desc.with_(flags=ADDR2_TCS | STORD)).status == SUCCESS


def test_destination_readback_needs_gencap_and_a_writing_operation(rig: Rig, caps_rig: Rig) -> None:
    for r, ok in ((rig, False), (caps_rig, True)):
        src, dst = r.alloc(512), r.alloc(512)
        rec = r.run(Descriptor(opcode=MEMMOVE, flags=DRDBK, src_addr=src, dst_addr=dst, xfer_size=512))
        assert (rec.status == SUCCESS) if ok else (rec.status == INVALID_FLAGS and rec.invalid_flags == DRDBK)
    a, b = caps_rig.alloc(512), caps_rig.alloc(512)
    rec = caps_rig.run(Descriptor(opcode=COMPARE, flags=DRDBK, src_addr=a, dst_addr=b, xfer_size=512))
    assert rec.status == INVALID_FLAGS and rec.invalid_flags == DRDBK
