"""Intel DSA wire formats: descriptors, completion records, capability and
configuration registers.

C sources: Linux ``include/uapi/linux/idxd.h`` (``struct dsa_hw_desc``,
``struct dsa_completion_record``, ``enum dsa_opcode``,
``enum dsa_completion_status``, ``IDXD_OP_FLAG_*``) and
``drivers/dma/idxd/registers.h`` (``union gen_cap_reg``, ``union wq_cap_reg``,
``union group_cap_reg``, ``union engine_cap_reg``, ``union wqcfg``,
``struct grpcfg``, ``enum idxd_cmd``, ``enum idxd_cmdsts_err``). Everything is
packed little-endian; every layout here is pinned by a byte-for-byte test
(tests/device/test_abi_dsa.py) whose expected bytes were written by hand from
those offsets.

Decoding happens here, before any handler runs (STYLE.md convention 7): the
device model only ever sees ``Descriptor`` objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag

DESC_SIZE = 64
COMP_SIZE = 32
#: idxd.h: the completion record must be 32-byte aligned (else DSA_COMP_CRA_ALIGN).
COMP_ALIGN = 32
#: Batch descriptor lists must be 64-byte aligned (else DSA_COMP_DESCLIST_ALIGN).
DESC_LIST_ALIGN = 64
OP_SPECIFIC_SIZE = 24
COMP_OP_SPECIFIC_SIZE = 16


class Opcode(IntEnum):
    """``enum dsa_opcode``; OPCAP bit ``n`` advertises opcode ``n``."""

    NOOP = 0x00
    BATCH = 0x01
    DRAIN = 0x02
    MEMMOVE = 0x03
    MEMFILL = 0x04
    COMPARE = 0x05
    COMPVAL = 0x06
    CR_DELTA = 0x07
    AP_DELTA = 0x08
    DUALCAST = 0x09
    TRANSL_FETCH = 0x0A
    CRCGEN = 0x10
    COPY_CRC = 0x11
    DIF_CHECK = 0x12
    DIF_INS = 0x13
    DIF_STRP = 0x14
    DIF_UPDT = 0x15
    DIX_GEN = 0x17
    CFLUSH = 0x20


class DescFlags(IntFlag):
    """Descriptor flags bits 0-15 (``IDXD_OP_FLAG_*``); bits 16-23 are op-specific."""

    NONE = 0
    FENCE = 0x0001
    BOF = 0x0002
    CRAV = 0x0004  # completion record address valid
    RCR = 0x0008  # request completion record
    RCI = 0x0010  # request completion interrupt
    CRSTS = 0x0020
    CR = 0x0080  # check result (COMPARE/COMPVAL/CR_DELTA)
    CC = 0x0100  # cache control
    ADDR1_TCS = 0x0200
    ADDR2_TCS = 0x0400
    ADDR3_TCS = 0x0800
    CR_TCS = 0x1000
    STORD = 0x2000
    DRDBK = 0x4000
    DSTS = 0x8000


# Op-specific flag bits 16-23: each operation's own, reserved on every other
# opcode. Linux idxd.h defines none for DSA (it names bits 0-15, and IAX's
# 16-21); values from Intel DML include/dml/detail/common/specific_flags.hpp
# (crc_specific_flag, drain_specific_flag, dualcast_specific_flag, as bits
# 0-7 of descriptor byte 6), the CRC ones also in accel-config test/dsa.h and
# SPDK include/spdk/idxd_spec.h (IDXD_FLAG_CRC_READ_CRC_SEED = 1 << 16).
CRC_FLAG_READ_SEED = 0x10000  #: CRCGEN/COPY_CRC: read the u32 seed at seed_addr (the crc_seed field is unused)
CRC_FLAG_BYPASS_CRC_INV_REF = 0x20000  #: no seed/result inversion and no result reflection
CRC_FLAG_BYPASS_DATA_REF = 0x40000  #: feed data bytes unreflected (MSB first)
DRAIN_FLAG_READBACK_ADDR1 = 0x10000  #: DRAIN: readback address 1 (@16) valid; needs GENCAP.drain_readback
DRAIN_FLAG_READBACK_ADDR2 = 0x20000  #: DRAIN: readback address 2 (@24) valid; needs GENCAP.drain_readback
DRAIN_FLAG_SUPPRESS_TCA_READBACK = 0x40000  #: DRAIN: suppress the implicit readback on traffic class A
DRAIN_FLAG_SUPPRESS_TCB_READBACK = 0x80000  #: DRAIN: suppress the implicit readback on traffic class B
DUALCAST_FLAG_DEST2_STEERING = 0x10000  #: DUALCAST: destination 2 steering-tag selector
FLAGS_MASK = 0xFFFFFF


class DsaStatus(IntEnum):
    """``enum dsa_completion_status`` (bits 0-6 of the record's status byte)."""

    NONE = 0x00
    SUCCESS = 0x01
    SUCCESS_PRED = 0x02
    PAGE_FAULT_NOBOF = 0x03
    PAGE_FAULT_IR = 0x04
    BATCH_FAIL = 0x05
    BATCH_PAGE_FAULT = 0x06
    DR_OFFSET_NOINC = 0x07
    DR_OFFSET_ERANGE = 0x08
    DIF_ERR = 0x09
    BAD_OPCODE = 0x10
    INVALID_FLAGS = 0x11
    NOZERO_RESERVE = 0x12
    XFER_ERANGE = 0x13
    DESC_CNT_ERANGE = 0x14
    DR_ERANGE = 0x15
    OVERLAP_BUFFERS = 0x16
    DCAST_ERR = 0x17
    DESCLIST_ALIGN = 0x18
    INT_HANDLE_INVAL = 0x19
    CRA_XLAT = 0x1A
    CRA_ALIGN = 0x1B
    ADDR_ALIGN = 0x1C
    PRIV_BAD = 0x1D
    TRAFFIC_CLASS_CONF = 0x1E
    PFAULT_RDBA = 0x1F
    HW_ERR1 = 0x20
    HW_ERR_DRB = 0x21
    TRANSLATION_FAIL = 0x22
    DRAIN_EVL = 0x26
    BATCH_EVL_ERR = 0x27


#: idxd.h DSA_COMP_STATUS_MASK: the code part of the status byte.
STATUS_MASK = 0x7F
#: idxd.h DSA_COMP_STATUS_WRITE: the faulting access was a write.
STATUS_WRITE = 0x80
#: Driver-only status meaning "aborted" (never written by the device).
STATUS_ABORTED = 0xFF

# DIF flags (descriptor bytes 40-42 of the DIF ops).
DIF_BLOCK_SIZES = (512, 520, 4096, 4104)  #: dif flags bits 1:0
DIF_FLAG_INVERT_CRC_SEED = 0x04
DIF_FLAG_INVERT_CRC_RESULT = 0x08
DIF_SRC_ALL_F_DETECT_ERR = 0x01
DIF_SRC_ALL_F_DETECT = 0x02
DIF_SRC_APP_F_DETECT = 0x04
DIF_SRC_APP_REF_F_DETECT = 0x08
DIF_SRC_INC_APP_TAG = 0x10
DIF_SRC_GUARD_CHECK_DISABLE = 0x20
DIF_SRC_REF_CHECK_DISABLE = 0x40
DIF_SRC_FIXED_REF_TAG = 0x80
DIF_DST_APP_PASS = 0x08
DIF_DST_INC_APP_TAG = 0x10
DIF_DST_GUARD_PASS = 0x20
DIF_DST_REF_PASS = 0x40
DIF_DST_FIXED_REF_TAG = 0x80
# DIF status (record byte 1 on DIF_ERR).
DIF_STATUS_GUARD = 0x01
DIF_STATUS_APP = 0x02
DIF_STATUS_REF = 0x04
DIF_STATUS_ALL_F = 0x08
DIF_TUPLE_SIZE = 8

#: CR_DELTA entries: u16 word offset + u64 data (10 bytes).
DELTA_ENTRY_SIZE = 10

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


# ==== capability and configuration registers (registers.h) ====================
VERSION_1_0 = 0x100
VERSION_2_0 = 0x200


def _bits(value: int, lo: int, width: int) -> int:
    return (value >> lo) & ((1 << width) - 1)


@dataclass(frozen=True, slots=True)
class GenCap:
    """``union gen_cap_reg`` (BAR0 0x10)."""

    block_on_fault: bool = True
    overlap_copy: bool = True
    cache_control_mem: bool = True
    cache_control_cache: bool = True
    cmd_cap: bool = True
    dest_readback: bool = False
    drain_readback: bool = False
    max_xfer_shift: int = 21  # 2 MiB
    max_batch_shift: int = 5  # 32
    max_ims_mult: int = 0
    config_en: bool = True

    def encode(self) -> int:
        return (
            int(self.block_on_fault) | int(self.overlap_copy) << 1 | int(self.cache_control_mem) << 2
            | int(self.cache_control_cache) << 3 | int(self.cmd_cap) << 4
            | int(self.dest_readback) << 8 | int(self.drain_readback) << 9
            | (self.max_xfer_shift & 0x1F) << 16 | (self.max_batch_shift & 0xF) << 21
            | (self.max_ims_mult & 0x3F) << 25 | int(self.config_en) << 31
        )

    @classmethod
    def decode(cls, v: int) -> GenCap:
        return cls(bool(v & 1), bool(v & 2), bool(v & 4), bool(v & 8), bool(v & 16),
                   bool(v >> 8 & 1), bool(v >> 9 & 1), _bits(v, 16, 5), _bits(v, 21, 4),
                   _bits(v, 25, 6), bool(v >> 31 & 1))

    @property
    def max_xfer_size(self) -> int:
        return 1 << self.max_xfer_shift

    @property
    def max_batch_size(self) -> int:
        return 1 << self.max_batch_shift


@dataclass(frozen=True, slots=True)
class WqCap:
    """``union wq_cap_reg`` (BAR0 0x20)."""

    total_wq_size: int = 128
    num_wqs: int = 8
    wqcfg_size: int = 0  # 0: 32-byte WQCFG (1.0)
    shared_mode: bool = True
    dedicated_mode: bool = True
    wq_ats_support: bool = False
    priority: bool = True
    occupancy: bool = False

    def encode(self) -> int:
        return (
            (self.total_wq_size & 0xFFFF) | (self.num_wqs & 0xFF) << 16 | (self.wqcfg_size & 0xF) << 24
            | int(self.shared_mode) << 48 | int(self.dedicated_mode) << 49
            | int(self.wq_ats_support) << 50 | int(self.priority) << 51 | int(self.occupancy) << 52
        )

    @classmethod
    def decode(cls, v: int) -> WqCap:
        return cls(_bits(v, 0, 16), _bits(v, 16, 8), _bits(v, 24, 4), bool(v >> 48 & 1),
                   bool(v >> 49 & 1), bool(v >> 50 & 1), bool(v >> 51 & 1), bool(v >> 52 & 1))


def grpcap_encode(num_groups: int, total_rdbufs: int = 96) -> int:
    """``union group_cap_reg``: num_groups bits 0-7, total read buffers 8-15."""
    return (num_groups & 0xFF) | (total_rdbufs & 0xFF) << 8


def engcap_encode(num_engines: int) -> int:
    """``union engine_cap_reg``: num_engines bits 0-7."""
    return num_engines & 0xFF


def opcap_encode(opcodes: Iterable[int]) -> int:
    """OPCAP (256 bits): bit ``n`` set when opcode ``n`` is supported."""
    value = 0
    for op in opcodes:
        value |= 1 << int(op)
    return value


def opcap_words(opcap: int) -> tuple[int, int, int, int]:
    """The four u64 registers at 0x40, 0x48, 0x50, 0x58."""
    m = (1 << 64) - 1
    return (opcap & m, opcap >> 64 & m, opcap >> 128 & m, opcap >> 192 & m)


def opcap_has(opcap: int, opcode: int) -> bool:
    return bool(opcap >> opcode & 1)


class WqState(IntEnum):
    """``enum idxd_wq_hw_state`` (WQCFG bits 30-31 of dword 6)."""

    DISABLED = 0
    ENABLED = 1
    BUSY = 2


@dataclass(frozen=True, slots=True)
class WqCfg:
    """``union wqcfg`` (DSA 1.0, 32 bytes)."""

    wq_size: int = 0
    wq_thresh: int = 0
    dedicated: bool = True  # mode bit 0: 1 = dedicated
    bof: bool = False
    ats_disable: bool = False
    prs_disable: bool = False
    priority: int = 0
    pasid: int = 0
    pasid_en: bool = False
    priv: bool = False
    max_xfer_shift: int = 21
    max_batch_shift: int = 5
    occupancy: int = 0
    wq_state: WqState = WqState.DISABLED

    def pack(self) -> bytes:
        d2 = (int(self.dedicated) | int(self.bof) << 1 | int(self.ats_disable) << 2
              | int(self.prs_disable) << 3 | (self.priority & 0xF) << 4 | (self.pasid & 0xFFFFF) << 8
              | int(self.pasid_en) << 28 | int(self.priv) << 29)
        d3 = (self.max_xfer_shift & 0x1F) | (self.max_batch_shift & 0xF) << 5
        d6 = (self.occupancy & 0xFFFF) | (int(self.wq_state) & 3) << 30
        return struct.pack("<HHHHIIIIII", self.wq_size, 0, self.wq_thresh, 0, d2, d3, 0, 0, d6, 0)

    @classmethod
    def unpack(cls, data: bytes) -> WqCfg:
        size, _, thresh, _, d2, d3, _, _, d6, _ = struct.unpack("<HHHHIIIIII", data[:32])
        return cls(size, thresh, bool(d2 & 1), bool(d2 & 2), bool(d2 & 4), bool(d2 & 8),
                   _bits(d2, 4, 4), _bits(d2, 8, 20), bool(d2 >> 28 & 1), bool(d2 >> 29 & 1),
                   _bits(d3, 0, 5), _bits(d3, 5, 4), _bits(d6, 0, 16), WqState(_bits(d6, 30, 2)))


def grpcfg_pack(wqs: int, engines: int, flags: int = 0) -> bytes:
    """``struct grpcfg``: WQ bitmap 4 x u64, engine bitmap u64 @32, flags @40 (64 bytes)."""
    m = (1 << 64) - 1
    return struct.pack("<QQQQQQ16x", wqs & m, wqs >> 64 & m, wqs >> 128 & m, wqs >> 192 & m,
                       engines, flags)


class DeviceState(IntEnum):
    """GENSTS bits 0-1 (``enum idxd_device_status_state``)."""

    DISABLED = 0
    ENABLED = 1
    DRAIN = 2
    HALT = 3


class Cmd(IntEnum):
    """``enum idxd_cmd`` (CMD register bits 20-24)."""

    ENABLE_DEVICE = 1
    DISABLE_DEVICE = 2
    DRAIN_ALL = 3
    ABORT_ALL = 4
    RESET_DEVICE = 5
    ENABLE_WQ = 6
    DISABLE_WQ = 7
    DRAIN_WQ = 8
    ABORT_WQ = 9
    RESET_WQ = 10
    DRAIN_PASID = 11
    ABORT_PASID = 12
    REQUEST_INT_HANDLE = 13
    RELEASE_INT_HANDLE = 14


class CmdErr(IntEnum):
    """``enum idxd_cmdsts_err`` (CMDSTS bits 0-7)."""

    SUCCESS = 0
    INVAL_CMD = 1
    INVAL_WQIDX = 2
    HW_ERR = 3
    DEV_ENABLED = 0x10
    CONFIG = 0x11
    BUSMASTER_EN = 0x12
    PASID_INVAL = 0x13
    WQ_SIZE_ERANGE = 0x14
    GRP_CONFIG = 0x15
    GRP_CONFIG2 = 0x16
    GRP_CONFIG3 = 0x17
    GRP_CONFIG4 = 0x18
    DEV_NOTEN = 0x20
    WQ_ENABLED = 0x21
    WQ_SIZE = 0x22
    WQ_PRIOR = 0x23
    WQ_MODE = 0x24
    BOF_EN = 0x25
    PASID_EN = 0x26
    MAX_BATCH_SIZE = 0x27
    MAX_XFER_SIZE = 0x28
    DIS_DEV_EN = 0x31
    DEV_NOT_EN = 0x32  # registers.h IDXD_CMDSTS_ERR_DEV_NOT_EN (disable/drain/abort/reset WQ errors)
    WQ_NOT_EN = 0x32  # the earlier name here, kept as an alias
    INVAL_INT_IDX = 0x41
    NO_HANDLE = 0x42


CMDSTS_ACTIVE = 0x8000_0000


def cmd_encode(cmd: Cmd, operand: int = 0, int_req: bool = False) -> int:
    """CMD register: operand bits 0-19, command 20-24, request interrupt bit 31."""
    return (operand & 0xFFFFF) | (int(cmd) & 0x1F) << 20 | int(int_req) << 31


def cmdsts_encode(err: int, result: int = 0, active: bool = False) -> int:
    """CMDSTS: error bits 0-7, result 8-23, active bit 31."""
    return (err & 0xFF) | (result & 0xFFFF) << 8 | int(active) << 31
