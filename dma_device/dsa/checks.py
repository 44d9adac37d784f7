"""Descriptor validation: everything the DSA checks before touching data.

Order (one status per descriptor, the first rule broken wins):
completion record alignment (0x1b, checked by the device since it decides
whether a record can be written at all), opcode (0x10), flags (0x11, with the
offending bits in ``invalid_flags``: each opcode's own set of bits 0-23, see
``ALLOWED_FLAGS``), reserved fields (0x12), privilege (0x1d),
interrupt handle (0x19), transfer size (0x13), then op-specific rules:
batch list alignment (0x18) and count (0x14), delta record sizes (0x15),
address alignment (0x1c), dualcast page offsets (0x17), overlaps (0x16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dma_device.dsa import delta, dif
from pviommu.abi.dsa import (
    CRC_FLAG_BYPASS_CRC_INV_REF,
    CRC_FLAG_BYPASS_DATA_REF,
    CRC_FLAG_READ_SEED,
    DELTA_ENTRY_SIZE,
    DESC_LIST_ALIGN,
    DIF_TUPLE_SIZE,
    DRAIN_FLAG_READBACK_ADDR1,
    DRAIN_FLAG_READBACK_ADDR2,
    DRAIN_FLAG_SUPPRESS_TCA_READBACK,
    DRAIN_FLAG_SUPPRESS_TCB_READBACK,
    DUALCAST_FLAG_DEST2_STEERING,
    FLAGS_MASK,
    CompletionRecord,
    DescFlags,
    Descriptor,
    DsaStatus,
    GenCap,
    Opcode,
    comp_op_u32,
)

# Plain ints throughout: ``~DescFlags.X`` would complement only within the
# IntFlag's defined members (bits 0-15) and silently drop bits 16-23.
F = DescFlags
FENCE, BOF, CR, CC = int(F.FENCE), int(F.BOF), int(F.CR), int(F.CC)
A1, A2, A3 = int(F.ADDR1_TCS), int(F.ADDR2_TCS), int(F.ADDR3_TCS)
STORD, DRDBK, DSTS = int(F.STORD), int(F.DRDBK), int(F.DSTS)
#: Flags every opcode accepts (completion record / interrupt control).
_COMMON = int(F.CRAV | F.RCR | F.RCI | F.CR_TCS | F.CRSTS)
#: The write-side flags of operations that write a destination.
_WRITES = CC | STORD | DRDBK | DSTS
_CRC = CRC_FLAG_READ_SEED | CRC_FLAG_BYPASS_CRC_INV_REF | CRC_FLAG_BYPASS_DATA_REF
_DRAIN_READBACK = DRAIN_FLAG_READBACK_ADDR1 | DRAIN_FLAG_READBACK_ADDR2
_DRAIN = _DRAIN_READBACK | DRAIN_FLAG_SUPPRESS_TCA_READBACK | DRAIN_FLAG_SUPPRESS_TCB_READBACK

#: Per-opcode flags, bits 0-23. Bits 0-15 as Intel DML lists them per operation
#: (include/dml/detail/common/flags.hpp: nop_flag ... cache_flush_flag); bits
#: 16-23 are each operation's own (specific_flags.hpp; CRC also accel-config
#: test/dsa.h and SPDK idxd_spec.h), reserved for every other opcode. Linux
#: idxd.h names bits 0-15 only. BOF and FENCE are not listed for BATCH and
#: DRAIN (accel-config never sets them there either).
ALLOWED_FLAGS: dict[int, int] = {
    Opcode.NOOP: FENCE,
    Opcode.BATCH: A1,
    Opcode.DRAIN: A1 | A2 | _DRAIN,
    Opcode.MEMMOVE: FENCE | BOF | A1 | A2 | _WRITES,
    Opcode.MEMFILL: FENCE | BOF | A2 | _WRITES,
    Opcode.COMPARE: FENCE | BOF | CR | A1 | A2,
    Opcode.COMPVAL: FENCE | BOF | CR | A1,
    Opcode.CR_DELTA: FENCE | BOF | CR | A1 | A2 | A3 | _WRITES,
    Opcode.AP_DELTA: FENCE | BOF | A1 | A2 | _WRITES,
    Opcode.DUALCAST: FENCE | BOF | A1 | A2 | A3 | _WRITES | DUALCAST_FLAG_DEST2_STEERING,
    # CRC generation reads address 1 (source) and address 3 (the seed); it writes nothing.
    Opcode.CRCGEN: FENCE | BOF | A1 | A3 | _CRC,
    Opcode.COPY_CRC: FENCE | BOF | A1 | A2 | A3 | _WRITES | _CRC,
    Opcode.DIF_CHECK: FENCE | BOF | A1,
    Opcode.DIF_INS: FENCE | BOF | A1 | A2 | _WRITES,
    Opcode.DIF_STRP: FENCE | BOF | A1 | A2 | _WRITES,
    Opcode.DIF_UPDT: FENCE | BOF | A1 | A2 | _WRITES,
    # Cache flush names its range in the destination field (address 2).
    Opcode.CFLUSH: FENCE | BOF | A2 | _WRITES,
}

#: Bytes 40-63 (index = offset - 40) that each opcode uses; the rest are reserved.
_OP_BYTES: dict[int, frozenset[int]] = {
    Opcode.COMPARE: frozenset({0}),
    Opcode.COMPVAL: frozenset({0}),
    Opcode.CR_DELTA: frozenset(range(0, 12)) | {16},
    Opcode.AP_DELTA: frozenset(range(0, 4)),
    Opcode.DUALCAST: frozenset(range(0, 8)),
    Opcode.CRCGEN: frozenset(range(0, 4)) | frozenset(range(8, 16)),
    Opcode.COPY_CRC: frozenset(range(0, 4)) | frozenset(range(8, 16)),
    Opcode.DIF_CHECK: frozenset({0, 2}) | frozenset(range(8, 16)),
    Opcode.DIF_STRP: frozenset({0, 2}) | frozenset(range(8, 16)),
    Opcode.DIF_INS: frozenset({1, 2}) | frozenset(range(16, 24)),
    Opcode.DIF_UPDT: frozenset({0, 1, 2}) | frozenset(range(8, 24)),
}

#: The same as masks over bytes 40-63 read as one little-endian integer: the reserved bytes.
_ALL_OP_BYTES = (1 << 8 * 24) - 1
_RESERVED_OP_BYTES: dict[int, int] = {
    op: _ALL_OP_BYTES & ~sum(0xFF << 8 * i for i in used) for op, used in _OP_BYTES.items()}
_RCI = int(F.RCI)

#: Opcodes whose src (@16) / dst (@24) / xfer_size (@32) fields are reserved.
_NO_SRC = {Opcode.NOOP, Opcode.CFLUSH}
_NO_DST = {Opcode.NOOP, Opcode.BATCH, Opcode.CRCGEN, Opcode.DIF_CHECK}
_NO_XFER = {Opcode.NOOP, Opcode.DRAIN}
#: Opcodes whose xfer_size is a byte count bounded by max_xfer (0x13).
_SIZED = {Opcode.MEMMOVE, Opcode.MEMFILL, Opcode.COMPARE, Opcode.COMPVAL, Opcode.CR_DELTA,
          Opcode.AP_DELTA, Opcode.DUALCAST, Opcode.CRCGEN, Opcode.COPY_CRC, Opcode.DIF_CHECK,
          Opcode.DIF_INS, Opcode.DIF_STRP, Opcode.DIF_UPDT, Opcode.CFLUSH}


@dataclass(frozen=True, slots=True)
class Limits:
    """What the device and the work queue allow one descriptor."""

    gencap: GenCap
    max_xfer: int  # min(WQCFG.max_xfer, GENCAP.max_xfer)
    max_batch: int  # min(WQCFG.max_batch, GENCAP.max_batch)
    wq_bof: bool  # WQCFG.bof
    shared: bool
    wq_priv: bool  # WQCFG.priv: privileged descriptors allowed
    num_int_handles: int
    opcap: int


def fail(status: DsaStatus, *, op_specific: bytes = bytes(16)) -> CompletionRecord:
    """A record that reports only a status (and, for 0x11, invalid_flags)."""
    return CompletionRecord(status=int(status), op_specific=op_specific)


def overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


@functools.lru_cache(maxsize=256)
def allowed_flags(op: int, bof: bool, cc_mem: bool, cc_cache: bool, dest_readback: bool, drain_readback: bool) -> int:
    """The flags ``op`` accepts given WQCFG.bof && GENCAP.bof and the GENCAP
    cache-control and readback bits (a plain int, computed once per combination).

    Each capability gates only the flags it governs: GENCAP.dest_readback the
    Destination Readback flag (bit 14) of the operations that have it,
    GENCAP.drain_readback DRAIN's readback-address flags (bits 16-17, which on
    CRCGEN/COPY_CRC are read-CRC-seed and bypass-CRC-inversion instead)."""
    allowed = ALLOWED_FLAGS[op] | _COMMON
    if not bof:
        allowed &= ~BOF  # WQCFG.bof=0: the BOF flag is reserved
    if not (cc_cache if op == Opcode.CFLUSH else cc_mem):
        allowed &= ~CC
    if not dest_readback:
        allowed &= ~DRDBK
    if op == Opcode.DRAIN and not drain_readback:
        allowed &= ~_DRAIN_READBACK
    return allowed & FLAGS_MASK


def validate(d: Descriptor, lim: Limits) -> CompletionRecord | None:
    """The error record for ``d``, or None when it may execute."""
    op = d.opcode
    gc = lim.gencap
    allowed = allowed_flags(op, lim.wq_bof and gc.block_on_fault, gc.cache_control_mem, gc.cache_control_cache,
                            gc.dest_readback, gc.drain_readback)
    bad = d.flags & ~allowed
    if bad:
        return fail(DsaStatus.INVALID_FLAGS, op_specific=comp_op_u32(bad))

    if d.rsvd or d.rsvd1 or _reserved_nonzero(d):
        return fail(DsaStatus.NOZERO_RESERVE)
    if lim.shared and d.priv and not lim.wq_priv:
        return fail(DsaStatus.PRIV_BAD)
    if d.flags & _RCI and d.int_handle >= lim.num_int_handles:
        return fail(DsaStatus.INT_HANDLE_INVAL)
    if op in _SIZED and not 0 < d.xfer_size <= lim.max_xfer:
        return fail(DsaStatus.XFER_ERANGE)
    return _op_rules(d, lim)


def _reserved_nonzero(d: Descriptor) -> bool:
    op = d.opcode
    if op in _NO_SRC and d.src_addr:
        return True
    if op == Opcode.DRAIN and d.src_addr and not d.flags & DRAIN_FLAG_READBACK_ADDR1:
        return True
    if op == Opcode.DRAIN and d.dst_addr and not d.flags & DRAIN_FLAG_READBACK_ADDR2:
        return True
    if op in _NO_DST and d.dst_addr:
        return True
    if op in _NO_XFER and d.xfer_size:
        return True
    if int.from_bytes(d.op_specific, "little") & _RESERVED_OP_BYTES.get(op, _ALL_OP_BYTES):
        return True
    if op in (Opcode.DIF_CHECK, Opcode.DIF_STRP, Opcode.DIF_INS, Opcode.DIF_UPDT):
        return bool(d.dif_flags & dif.DIF_FLAGS_RESERVED)
    return False


def _op_rules(d: Descriptor, lim: Limits) -> CompletionRecord | None:
    op, n = d.opcode, d.xfer_size
    # inf: the seed is a u32 read from seed_addr; a 4-byte alignment rule is assumed (SPDK points
    # seed_addr at a previous record's crc_val, accel-config at a 32-byte aligned u64: both satisfy it).
    if op in (Opcode.CRCGEN, Opcode.COPY_CRC) and d.flags & CRC_FLAG_READ_SEED and d.seed_addr % 4:
        return fail(DsaStatus.ADDR_ALIGN)
    if op == Opcode.BATCH:
        if d.desc_list_addr % DESC_LIST_ALIGN:
            return fail(DsaStatus.DESCLIST_ALIGN)
        if not 2 <= d.desc_count <= lim.max_batch:  # accel-config: 2..max_batch
            return fail(DsaStatus.DESC_CNT_ERANGE)
    elif op == Opcode.MEMMOVE:
        if not lim.gencap.overlap_copy and overlaps(d.src_addr, n, d.dst_addr, n):
            return fail(DsaStatus.OVERLAP_BUFFERS)
    elif op == Opcode.COPY_CRC:
        if overlaps(d.src_addr, n, d.dst_addr, n):
            return fail(DsaStatus.OVERLAP_BUFFERS)
    elif op == Opcode.DUALCAST:
        if (d.dst_addr ^ d.dest2) & 0xFFF:  # bits 11:0 of both destinations must match
            return fail(DsaStatus.DCAST_ERR)
        if (overlaps(d.src_addr, n, d.dst_addr, n) or overlaps(d.src_addr, n, d.dest2, n)
                or overlaps(d.dst_addr, n, d.dest2, n)):
            return fail(DsaStatus.OVERLAP_BUFFERS)
    elif op == Opcode.CR_DELTA:
        if n % 8 or n > delta.MAX_DELTA_XFER:
            return fail(DsaStatus.XFER_ERANGE)
        if d.max_delta_size % DELTA_ENTRY_SIZE or d.max_delta_size < delta.MIN_MAX_DELTA_SIZE:
            return fail(DsaStatus.DR_ERANGE)
        if (d.src_addr | d.src2_addr | d.delta_addr) % 8:
            return fail(DsaStatus.ADDR_ALIGN)
        if (overlaps(d.delta_addr, d.max_delta_size, d.src_addr, n)
                or overlaps(d.delta_addr, d.max_delta_size, d.src2_addr, n)):
            return fail(DsaStatus.OVERLAP_BUFFERS)
    elif op == Opcode.AP_DELTA:
        if n % 8 or n > delta.MAX_DELTA_XFER:
            return fail(DsaStatus.XFER_ERANGE)
        size = d.delta_rec_size
        if size == 0 or size % DELTA_ENTRY_SIZE or size > n // 8 * DELTA_ENTRY_SIZE:
            return fail(DsaStatus.DR_ERANGE)
        if (d.src_addr | d.dst_addr) % 8:
            return fail(DsaStatus.ADDR_ALIGN)
        if overlaps(d.src_addr, size, d.dst_addr, n):
            return fail(DsaStatus.OVERLAP_BUFFERS)
    elif op in (Opcode.DIF_CHECK, Opcode.DIF_STRP, Opcode.DIF_UPDT, Opcode.DIF_INS):
        bs = dif.block_size(d.dif_flags)
        unit = bs if op == Opcode.DIF_INS else bs + DIF_TUPLE_SIZE
        if n % unit:
            return fail(DsaStatus.XFER_ERANGE)
        if op != Opcode.DIF_CHECK:
            blocks = n // unit
            dlen = blocks * (bs + DIF_TUPLE_SIZE if op != Opcode.DIF_STRP else bs)
            if overlaps(d.src_addr, n, d.dst_addr, dlen):
                return fail(DsaStatus.OVERLAP_BUFFERS)
    return None
