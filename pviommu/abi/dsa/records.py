"""Intel DSA descriptors and completion records: ``struct dsa_hw_desc``
(64 bytes), ``struct dsa_completion_record`` (32 bytes) and the builders of
their op-specific areas (Linux ``include/uapi/linux/idxd.h``).

Decoding happens here, before any handler runs (STYLE.md convention 7): the
device model only ever sees ``Descriptor`` objects.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from pviommu.abi.dsa.codes import (
    COMP_OP_SPECIFIC_SIZE,
    COMP_SIZE,
    DESC_SIZE,
    FLAGS_MASK,
    OP_SPECIFIC_SIZE,
    STATUS_MASK,
    STATUS_WRITE,
    DsaStatus,
)

_DESC = struct.Struct("<IIQQQIHH24s")
_COMP = struct.Struct("<BBBBIQ16s")


def _u(fmt: str, buf: bytes, off: int) -> int:
    return int(struct.unpack_from(fmt, buf, off)[0])


def _op(*parts: tuple[int, str, int]) -> bytes:
    """Build an op-specific area from (offset-in-area, struct format, value)."""
    buf = bytearray(OP_SPECIFIC_SIZE)
    for off, fmt, value in parts:
        struct.pack_into(fmt, buf, off, value)
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """``struct dsa_hw_desc``: the generic 64-byte view.

    ``op_specific`` is bytes 40-63 raw; the properties below read the union
    members of idxd.h by their absolute descriptor offset (minus 40)."""

    opcode: int = 0
    flags: int = 0
    pasid: int = 0
    priv: int = 0
    rsvd: int = 0  # bits 20-30 of dword 0
    completion_addr: int = 0
    src_addr: int = 0
    dst_addr: int = 0
    xfer_size: int = 0
    int_handle: int = 0
    rsvd1: int = 0
    op_specific: bytes = field(default=bytes(OP_SPECIFIC_SIZE))

    # -- wire -------------------------------------------------------------------
    def pack(self) -> bytes:
        dword0 = (self.pasid & 0xFFFFF) | (self.rsvd & 0x7FF) << 20 | (self.priv & 1) << 31
        dword1 = (self.flags & FLAGS_MASK) | (self.opcode & 0xFF) << 24
        if len(self.op_specific) != OP_SPECIFIC_SIZE:
            raise ValueError("op_specific must be 24 bytes")
        return _DESC.pack(
            dword0, dword1, self.completion_addr, self.src_addr, self.dst_addr,
            self.xfer_size, self.int_handle, self.rsvd1, self.op_specific,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Descriptor:
        if len(data) != DESC_SIZE:
            raise ValueError(f"a DSA descriptor is {DESC_SIZE} bytes, got {len(data)}")
        d0, d1, comp, src, dst, xfer, ih, rsvd1, ops = _DESC.unpack(bytes(data))
        return cls(
            opcode=d1 >> 24, flags=d1 & FLAGS_MASK, pasid=d0 & 0xFFFFF, priv=d0 >> 31,
            rsvd=(d0 >> 20) & 0x7FF, completion_addr=comp, src_addr=src, dst_addr=dst,
            xfer_size=xfer, int_handle=ih, rsvd1=rsvd1, op_specific=ops,
        )

    def with_(self, **changes: int | bytes) -> Descriptor:
        return replace(self, **changes)  # type: ignore[arg-type]

    # -- aliases of the unions at 16, 24, 32 ------------------------------------
    @property
    def pattern(self) -> int:  # MEMFILL @16
        return self.src_addr

    @property
    def desc_list_addr(self) -> int:  # BATCH @16
        return self.src_addr

    @property
    def rdback_addr(self) -> int:  # DRAIN @16
        return self.src_addr

    @property
    def src2_addr(self) -> int:  # COMPARE / CR_DELTA @24
        return self.dst_addr

    @property
    def comp_pattern(self) -> int:  # COMPVAL @24
        return self.dst_addr

    @property
    def rdback_addr2(self) -> int:  # DRAIN @24
        return self.dst_addr

    @property
    def desc_count(self) -> int:  # BATCH @32
        return self.xfer_size

    # -- op-specific fields (absolute offset - 40) ------------------------------
    @property
    def expected_res(self) -> int:  # @40 u8
        return self.op_specific[0]

    @property
    def delta_addr(self) -> int:  # @40 u64
        return _u("<Q", self.op_specific, 0)

    @property
    def max_delta_size(self) -> int:  # @48 u32
        return _u("<I", self.op_specific, 8)

    @property
    def expected_res_mask(self) -> int:  # @56 u8
        return self.op_specific[16]

    @property
    def delta_rec_size(self) -> int:  # AP_DELTA @40 u32
        return _u("<I", self.op_specific, 0)

    @property
    def dest2(self) -> int:  # DUALCAST @40 u64
        return _u("<Q", self.op_specific, 0)

    @property
    def crc_seed(self) -> int:  # @40 u32
        return _u("<I", self.op_specific, 0)

    @property
    def seed_addr(self) -> int:  # @48 u64
        return _u("<Q", self.op_specific, 8)

    @property
    def src_dif_flags(self) -> int:  # DIF_CHECK/STRP @40; DIF_UPDT src_upd_flags
        return self.op_specific[0]

    @property
    def dest_dif_flags(self) -> int:  # DIF_INS dest_dif_flag @41; DIF_UPDT upd_dest_flags
        return self.op_specific[1]

    @property
    def dif_flags(self) -> int:  # dif_chk_flags / dif_ins_flags / dif_upd_flags @42
        return self.op_specific[2]

    @property
    def chk_ref_tag_seed(self) -> int:  # @48 (also DIF_UPDT src_ref_tag_seed)
        return _u("<I", self.op_specific, 8)

    @property
    def chk_app_tag_mask(self) -> int:  # @52
        return _u("<H", self.op_specific, 12)

    @property
    def chk_app_tag_seed(self) -> int:  # @54
        return _u("<H", self.op_specific, 14)

    @property
    def ins_ref_tag_seed(self) -> int:  # @56 (also DIF_UPDT dest_ref_tag_seed)
        return _u("<I", self.op_specific, 16)

    @property
    def ins_app_tag_mask(self) -> int:  # @60
        return _u("<H", self.op_specific, 20)

    @property
    def ins_app_tag_seed(self) -> int:  # @62
        return _u("<H", self.op_specific, 22)


# -- builders of the op-specific area (guest driver side) -----------------------
def op_compare(expected_res: int = 0) -> bytes:
    return _op((0, "<B", expected_res))


def op_cr_delta(delta_addr: int, max_delta_size: int, expected_res_mask: int = 0) -> bytes:
    return _op((0, "<Q", delta_addr), (8, "<I", max_delta_size), (16, "<B", expected_res_mask))


def op_ap_delta(delta_rec_size: int) -> bytes:
    return _op((0, "<I", delta_rec_size))


def op_dualcast(dest2: int) -> bytes:
    return _op((0, "<Q", dest2))


def op_crc(crc_seed: int = 0, seed_addr: int = 0) -> bytes:
    return _op((0, "<I", crc_seed), (8, "<Q", seed_addr))


def op_dif_check(src_dif_flags: int, dif_flags: int, ref_tag_seed: int, app_tag_mask: int,
                 app_tag_seed: int) -> bytes:
    """DIF_CHECK and DIF_STRP."""
    return _op((0, "<B", src_dif_flags), (2, "<B", dif_flags), (8, "<I", ref_tag_seed),
               (12, "<H", app_tag_mask), (14, "<H", app_tag_seed))


def op_dif_ins(dest_dif_flags: int, dif_flags: int, ref_tag_seed: int, app_tag_mask: int,
               app_tag_seed: int) -> bytes:
    return _op((1, "<B", dest_dif_flags), (2, "<B", dif_flags), (16, "<I", ref_tag_seed),
               (20, "<H", app_tag_mask), (22, "<H", app_tag_seed))


def op_dif_updt(src_flags: int, dest_flags: int, dif_flags: int, src_ref: int, src_mask: int,
                src_app: int, dest_ref: int, dest_mask: int, dest_app: int) -> bytes:
    return _op((0, "<B", src_flags), (1, "<B", dest_flags), (2, "<B", dif_flags),
               (8, "<I", src_ref), (12, "<H", src_mask), (14, "<H", src_app),
               (16, "<I", dest_ref), (20, "<H", dest_mask), (22, "<H", dest_app))


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """``struct dsa_completion_record`` (32 bytes).

    ``status`` is the raw byte: code in bits 0-6, ``STATUS_WRITE`` in bit 7."""

    status: int = 0
    result: int = 0  # also dif_status
    fault_info: int = 0
    rsvd: int = 0
    bytes_completed: int = 0  # also descs_completed
    fault_addr: int = 0
    op_specific: bytes = field(default=bytes(COMP_OP_SPECIFIC_SIZE))

    def pack(self) -> bytes:
        if len(self.op_specific) != COMP_OP_SPECIFIC_SIZE:
            raise ValueError("completion op_specific must be 16 bytes")
        return _COMP.pack(self.status, self.result, self.fault_info, self.rsvd,
                          self.bytes_completed, self.fault_addr, self.op_specific)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> CompletionRecord:
        if len(data) != COMP_SIZE:
            raise ValueError(f"a DSA completion record is {COMP_SIZE} bytes, got {len(data)}")
        st, res, fi, rsvd, bc, fa, ops = _COMP.unpack(bytes(data))
        return cls(st, res, fi, rsvd, bc, fa, ops)

    # -- status byte ----------------------------------------------------------
    @property
    def code(self) -> int:
        """idxd.h DSA_COMP_STATUS(status)."""
        return self.status & STATUS_MASK

    @property
    def fault_was_write(self) -> bool:
        return bool(self.status & STATUS_WRITE)

    @property
    def dsa_status(self) -> DsaStatus:
        return DsaStatus(self.code)

    @property
    def descs_completed(self) -> int:
        return self.bytes_completed

    @property
    def dif_status(self) -> int:
        return self.result

    # -- op-specific (absolute offset - 16) ------------------------------------
    @property
    def invalid_flags(self) -> int:  # @16 bits 0-23
        return _u("<I", self.op_specific, 0) & FLAGS_MASK

    @property
    def delta_rec_size(self) -> int:  # @16 u32
        return _u("<I", self.op_specific, 0)

    @property
    def crc_val(self) -> int:  # @16 u64 (u16 in 5.x headers; DSA CRCs are 32-bit)
        return _u("<Q", self.op_specific, 0)

    @property
    def dif_chk_ref_tag(self) -> int:  # @16 (also dif_upd_src_ref_tag)
        return _u("<I", self.op_specific, 0)

    @property
    def dif_chk_app_tag_mask(self) -> int:  # @20
        return _u("<H", self.op_specific, 4)

    @property
    def dif_chk_app_tag(self) -> int:  # @22
        return _u("<H", self.op_specific, 6)

    @property
    def dif_ins_ref_tag(self) -> int:  # @24 (also dif_upd_dest_ref_tag)
        return _u("<I", self.op_specific, 8)

    @property
    def dif_ins_app_tag_mask(self) -> int:  # @28
        return _u("<H", self.op_specific, 12)

    @property
    def dif_ins_app_tag(self) -> int:  # @30
        return _u("<H", self.op_specific, 14)


def comp_op_u32(value: int) -> bytes:
    """Record op-specific area holding one u32 at 16 (invalid_flags, delta_rec_size)."""
    return struct.pack("<I12x", value & 0xFFFFFFFF)


def comp_op_crc(value: int) -> bytes:
    return struct.pack("<Q8x", value)


def comp_op_dif(chk_ref: int = 0, chk_mask: int = 0, chk_app: int = 0, ins_ref: int = 0,
                ins_mask: int = 0, ins_app: int = 0) -> bytes:
    """DIF check/insert/update tags at 16..31."""
    return struct.pack("<IHHIHH", chk_ref & 0xFFFFFFFF, chk_mask, chk_app, ins_ref & 0xFFFFFFFF,
                       ins_mask, ins_app)
