"""Intel DSA codes: descriptor and record sizes, opcodes, descriptor flags
(generic and op-specific), completion statuses and the DIF flag bits.

C source: Linux ``include/uapi/linux/idxd.h`` (``enum dsa_opcode``,
``enum dsa_completion_status``, ``IDXD_OP_FLAG_*``); the op-specific bits as
noted beside them.
"""

from __future__ import annotations

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
