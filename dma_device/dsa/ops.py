"""The DSA operations: one function per opcode.

Each takes a validated ``Descriptor`` and an ``OpContext`` and returns the
``CompletionRecord`` to write; none writes its own record (the device does,
status byte last). All data goes through ``ctx.mem`` (a ``DmaAccess`` over
IOVAs, with the block-on-fault policy), which stops at the first faulting page; an
operation that stops reports PAGE_FAULT_NOBOF (0x03), or PAGE_FAULT_IR (0x04)
when the guest refused the page request, with ``bytes_completed`` = bytes done
before the fault, ``fault_addr`` = the faulting IOVA, and the 0x80 bit when the
faulting access was a write (idxd.h DSA_COMP_STATUS_WRITE). Nothing at or
beyond the fault is written: operations with several buffers first find the
common translatable prefix (``common_prefix``), then move only that over the
runs it translated.

Streaming reads (compare, CRC) go in ``CHUNK`` pieces so a difference found
early stops the operation before later pages are touched, as the hardware
would. Every other operation also works in bounded steps -- translate a piece,
move it, go on -- so none allocates in proportion to its transfer size, data
or runs (a 2 GiB MEMFILL to an unmapped IOVA must not build 2 GiB of pattern
first); the completion record (bytes completed, fault address) is what one
pass over the whole transfer gives.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from dma_device.dsa import delta, dif
from dma_device.dsa.access import BlockOnFault
from dma_device.dsa.checks import Limits, fail, overlaps, validate
from dma_device.dsa.crc import crc32c_dsa
from pviommu.abi.dsa import (
    COMP_OP_SPECIFIC_SIZE,
    CRC_FLAG_READ_SEED,
    DELTA_ENTRY_SIZE,
    DESC_SIZE,
    DIF_TUPLE_SIZE,
    STATUS_WRITE,
    CompletionRecord,
    DescFlags,
    Descriptor,
    DsaStatus,
    Opcode,
    comp_op_crc,
    comp_op_dif,
    comp_op_u32,
    opcap_has,
)
from pviommu.addr import Iova
from pviommu.mem.dma import DmaFault, DmaResult, DmaRuns, common_prefix

CHUNK = 256 * 1024  # a multiple of 8 so COMPVAL patterns stay aligned per chunk
#: Bytes a step of MEMFILL, COPY_CRC or DIF materialises (a multiple of 8: MEMFILL's pattern stays aligned).
DATA_CHUNK = 1 << 20
#: Bytes a step of MEMMOVE or DUALCAST copies (no data buffer, only the runs translating it).
MOVE_CHUNK = 4 << 20
#: Bytes CFLUSH translates per step (only the translation matters: no runs are kept).
PROBE_CHUNK = 4 << 20
_NO_OP = bytes(COMP_OP_SPECIFIC_SIZE)


@dataclass(slots=True)
class OpContext:
    """What an operation may use besides its descriptor."""

    mem: BlockOnFault
    limits: Limits
    #: Execute one batch entry completely (validation, operation, its own
    #: completion record and interrupt) and return its record.
    run_batch_entry: Callable[[Descriptor], CompletionRecord]
    #: Block until every descriptor submitted to the WQ before this one completed.
    drain: Callable[[], None]


# -- helpers ---------------------------------------------------------------------
def _fault(ctx: OpContext, fault: DmaFault, done: int, *, result: int = 0,
           op_specific: bytes = _NO_OP) -> CompletionRecord:
    code = DsaStatus.PAGE_FAULT_IR if ctx.mem.refused else DsaStatus.PAGE_FAULT_NOBOF
    status = int(code) | (STATUS_WRITE if fault.write else 0)
    return CompletionRecord(status=status, result=result, bytes_completed=done,
                            fault_addr=int(fault.iova), op_specific=op_specific)


_SUCCESS = CompletionRecord(status=int(DsaStatus.SUCCESS))  # immutable: shared by every plain success


def _ok(*, result: int = 0, bytes_completed: int = 0, op_specific: bytes = _NO_OP) -> CompletionRecord:
    if not result and not bytes_completed and op_specific is _NO_OP:
        return _SUCCESS
    return CompletionRecord(status=int(DsaStatus.SUCCESS), result=result,
                            bytes_completed=bytes_completed, op_specific=op_specific)


def _checked(d: Descriptor, result: int, *, bytes_completed: int = 0) -> CompletionRecord:
    """COMPARE/COMPVAL: with the CR flag a result other than expected_res is
    "success with false predicate" (0x02), which fails a batch."""
    pred = bool(d.flags & DescFlags.CR) and result != d.expected_res
    status = DsaStatus.SUCCESS_PRED if pred else DsaStatus.SUCCESS
    return CompletionRecord(status=int(status), result=result, bytes_completed=bytes_completed)


def first_diff(a: bytes | memoryview, b: bytes | memoryview) -> int:
    """Index of the first differing byte of two unequal equal-length buffers
    (bisection on C-speed slice compares, then a short scan)."""
    va, vb = memoryview(a), memoryview(b)
    lo, hi = 0, len(va)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if va[lo:mid] == vb[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if va[i] != vb[i]:
            return i
    return hi


def _probe(ctx: OpContext, iova: int, length: int, write: bool) -> DmaResult:
    """How much of ``[iova, +length)`` translates for this access (after page
    requests), ``PROBE_CHUNK`` at a time, keeping no runs."""
    done = 0
    while done < length:
        tr = ctx.mem.translate(Iova(iova + done), min(PROBE_CHUNK, length - done), write)
        done += tr.done
        if tr.fault is not None:
            return DmaResult(done, tr.fault)
    return DmaResult(done, None)


def _pattern(value: int, length: int) -> bytes:
    pat = value.to_bytes(8, "little")
    return (pat * (length // 8 + 1))[:length]


# -- operations ------------------------------------------------------------------
def op_noop(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    return _ok()


def op_drain(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Complete after every earlier descriptor of the WQ. Its readback flags
    (bits 16-19, validated in checks) ask for reads that make earlier writes
    visible; memory here is coherent, so they change nothing (inf)."""
    ctx.drain()
    return _ok()


def op_memmove(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """result = copy direction: 1 when an overlapping copy runs descending
    (dst above src); then a fault completes nothing (bytes_completed 0) since
    the completed part would be the tail, and accel-config does not advance
    addresses after partial completion when result is 1."""
    n, src, dst = d.xfer_size, d.src_addr, d.dst_addr
    if dst > src and overlaps(src, n, dst, n):
        # all of both must translate before anything is copied (downwards): translated once and
        # the runs kept -- no data buffer, and the runs stop at the first fault, so an unmapped
        # IOVA costs nothing
        pre = common_prefix(ctx.mem, [(Iova(src), n, False), (Iova(dst), n, True)])
        if pre.fault is not None:
            return _fault(ctx, pre.fault, 0, result=1)
        ctx.mem.copy_runs(pre.runs[0], pre.runs[1], n)
        return _ok(result=1, bytes_completed=0)
    pos = 0
    while pos < n:  # ascending pieces: a forward overlap only overwrites source already copied
        res = ctx.mem.copy(Iova(src + pos), Iova(dst + pos), min(MOVE_CHUNK, n - pos))
        pos += res.done
        if res.fault is not None:
            return _fault(ctx, res.fault, pos)
    return _ok()


def op_memfill(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """dst[i] = pattern byte i % 8 (8-byte little-endian pattern at @16)."""
    n, pos = d.xfer_size, 0
    pat = memoryview(_pattern(d.pattern, min(n, DATA_CHUNK)))
    while pos < n:
        res = ctx.mem.write(Iova(d.dst_addr + pos), pat[: min(len(pat), n - pos)])
        pos += res.done
        if res.fault is not None:
            return _fault(ctx, res.fault, pos)
    return _ok()


def _compare_stream(d: Descriptor, ctx: OpContext, other: Callable[[int, int], tuple[bytes, DmaFault | None]]
                    ) -> CompletionRecord:
    n, pos = d.xfer_size, 0
    while pos < n:
        k = min(CHUNK, n - pos)
        a, fa = ctx.mem.read(Iova(d.src_addr + pos), k)
        b, fb = other(pos, k)
        m = min(len(a), len(b))
        if a[:m] != b[:m]:
            return _checked(d, 1, bytes_completed=pos + first_diff(a[:m], b[:m]))
        pos += m
        if m < k:
            fault = fa if fa is not None and len(a) == m else fb
            assert fault is not None
            return _fault(ctx, fault, pos)
    return _checked(d, 0)


def op_compare(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """result 0 equal / 1 different, bytes_completed = first differing byte."""
    return _compare_stream(d, ctx, lambda pos, k: ctx.mem.read(Iova(d.src2_addr + pos), k))


def op_compval(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Compare the buffer at src (@16) with the 8-byte pattern at @24."""
    pat = _pattern(d.comp_pattern, CHUNK)
    return _compare_stream(d, ctx, lambda pos, k: (pat[:k], None))


def op_cr_delta(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Delta record of src2 against src1; result 0 equal, 1 different,
    2 overflow (more entries than max_delta_size holds: the entries that fit
    are written and comparing stops). With CR, result N is acceptable when
    bit N of expected_res_mask is set; otherwise 0x02."""
    n = d.xfer_size
    pre = common_prefix(ctx.mem, [(Iova(d.src_addr), n, False), (Iova(d.src2_addr), n, False)])
    p = pre.done // 8 * 8
    a = ctx.mem.read_runs(pre.runs[0], p)
    b = ctx.mem.read_runs(pre.runs[1], p)
    entries = delta.create(a, b)
    room = d.max_delta_size // DELTA_ENTRY_SIZE
    overflow = len(entries) > room
    record = delta.pack(entries[:room])
    if record:
        w = ctx.mem.write(Iova(d.delta_addr), record)
        if w.fault is not None:
            return _fault(ctx, w.fault, 0, op_specific=comp_op_u32(w.done))
    size = comp_op_u32(len(record))
    result = 2 if overflow else int(bool(entries))
    if pre.fault is not None and not overflow:
        return _fault(ctx, pre.fault, p, result=result, op_specific=size)
    pred = bool(d.flags & DescFlags.CR) and not (d.expected_res_mask >> result) & 1
    status = DsaStatus.SUCCESS_PRED if pred else DsaStatus.SUCCESS
    return CompletionRecord(status=int(status), result=result, op_specific=size)


def op_ap_delta(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Apply the delta record at src (@16, delta_rec_size @40) to dst.

    The whole record is checked before any word is written (offsets strictly
    increasing, 0x07; inside the buffer, 0x08), so a bad record leaves the
    destination untouched. On a write fault bytes_completed counts the record
    bytes applied (inf)."""
    rec, fault = ctx.mem.read(Iova(d.src_addr), d.delta_rec_size)
    if fault is not None:
        return _fault(ctx, fault, 0)
    entries = delta.unpack(rec)
    last = -1
    for idx, _ in entries:
        if idx <= last:
            return fail(DsaStatus.DR_OFFSET_NOINC)
        if idx * 8 + 8 > d.xfer_size:
            return fail(DsaStatus.DR_OFFSET_ERANGE)
        last = idx
    applied = 0
    for start, data in delta.runs(entries):
        w = ctx.mem.write(Iova(d.dst_addr + start * 8), data)
        applied += w.done // 8
        if w.fault is not None:
            return _fault(ctx, w.fault, applied * DELTA_ENTRY_SIZE)
    return _ok()


def op_dualcast(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    n, pos = d.xfer_size, 0
    while pos < n:
        k = min(MOVE_CHUNK, n - pos)
        pre = common_prefix(ctx.mem, [(Iova(d.src_addr + pos), k, False), (Iova(d.dst_addr + pos), k, True),
                                      (Iova(d.dest2 + pos), k, True)])
        for dst in pre.runs[1:]:
            ctx.mem.copy_runs(pre.runs[0], dst, pre.done)
        pos += pre.done
        if pre.fault is not None:
            return _fault(ctx, pre.fault, pos)
    return _ok()


def _seed(d: Descriptor, ctx: OpContext) -> tuple[int, DmaFault | None]:
    if not d.flags & CRC_FLAG_READ_SEED:
        return d.crc_seed, None
    raw, fault = ctx.mem.read(Iova(d.seed_addr), 4)
    if fault is not None:
        return 0, fault
    return int(struct.unpack("<I", raw)[0]), None


def op_crcgen(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """CRC-32C of src; on a fault crc_val holds the CRC of the bytes done, so
    software can resubmit the rest with it as the seed."""
    crc, fault = _seed(d, ctx)
    if fault is not None:
        return _fault(ctx, fault, 0)
    n, pos = d.xfer_size, 0
    while pos < n:
        data, fault = ctx.mem.read(Iova(d.src_addr + pos), min(CHUNK, n - pos))
        crc = crc32c_dsa(data, crc, d.flags)
        pos += len(data)
        if fault is not None:
            return _fault(ctx, fault, pos, op_specific=comp_op_crc(crc))
    return _ok(op_specific=comp_op_crc(crc))


def op_copy_crc(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    crc, fault = _seed(d, ctx)
    if fault is not None:
        return _fault(ctx, fault, 0)
    n, pos = d.xfer_size, 0
    while pos < n:  # the CRC of each piece seeds the next (crc32c_dsa chains)
        k = min(DATA_CHUNK, n - pos)
        pre = common_prefix(ctx.mem, [(Iova(d.src_addr + pos), k, False), (Iova(d.dst_addr + pos), k, True)])
        data = ctx.mem.read_runs(pre.runs[0], pre.done)
        ctx.mem.write_runs(pre.runs[1], data)
        crc = crc32c_dsa(data, crc, d.flags)
        pos += pre.done
        if pre.fault is not None:
            return _fault(ctx, pre.fault, pos, op_specific=comp_op_crc(crc))
    return _ok(op_specific=comp_op_crc(crc))


def op_cflush(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Flush [dst, +xfer_size) from the caches: memory is always coherent
    here, so only the translation (a read access) matters."""
    res = _probe(ctx, d.dst_addr, d.xfer_size, False)
    if res.fault is not None:
        return _fault(ctx, res.fault, res.done)
    return _ok()


# -- DIF -------------------------------------------------------------------------
def _dif_prefix(ctx: OpContext, src: int, dst: int, blocks: int, src_unit: int, dst_unit: int
                ) -> tuple[int, DmaFault | None, DmaRuns, DmaRuns]:
    """How many of ``blocks`` whole blocks from ``src`` (and ``dst``) translate,
    the fault that stops the rest, and the source and destination runs."""
    ps = ctx.mem.translate(Iova(src), blocks * src_unit, False)
    avail, fault = ps.done // src_unit, ps.fault
    pd = DmaRuns()
    if dst_unit:
        pd = ctx.mem.translate(Iova(dst), blocks * dst_unit, True)
        if pd.done // dst_unit < avail:
            avail, fault = pd.done // dst_unit, pd.fault
    return avail, fault if avail < blocks else None, ps, pd


def _dif_blocks(d: Descriptor, ctx: OpContext, src_unit: int, out_unit: int,
                step: Callable[[memoryview, int], tuple[int, bytes]]) -> tuple[int, int, DmaFault | None]:
    """The loop every DIF operation shares: a ``DATA_CHUNK`` of whole blocks at
    a time, translated, read, each block passed to ``step(block, index)`` (DIF
    status, output bytes) and the output written, until a DIF error, a fault
    or the end. Returns (blocks done, DIF status, the fault that stopped it)."""
    blocks = d.xfer_size // src_unit
    per = max(1, DATA_CHUNK // max(src_unit, out_unit))
    done = 0
    while done < blocks:
        b0, nb = done, min(per, blocks - done)
        avail, fault, src_runs, dst_runs = _dif_prefix(ctx, d.src_addr + b0 * src_unit, d.dst_addr + b0 * out_unit,
                                                       nb, src_unit, out_unit)
        src = memoryview(ctx.mem.read_runs(src_runs, avail * src_unit))
        out = bytearray()
        status = 0
        for i in range(avail):
            status, emitted = step(src[i * src_unit : (i + 1) * src_unit], b0 + i)
            if status:
                break
            out += emitted
            done = b0 + i + 1
        if out:
            ctx.mem.write_runs(dst_runs, out)
        if status or fault is not None:
            return done, status, fault
    return done, 0, None


def _dif_run(d: Descriptor, ctx: OpContext, out_unit: int,
             emit: Callable[[memoryview, memoryview, int], bytes] | None) -> CompletionRecord:
    """Shared body of DIF_CHECK / DIF_STRP / DIF_UPDT: check each source block,
    emit its output (if any) and stop at the first DIF error or fault."""
    bs = dif.block_size(d.dif_flags)
    unit = bs + DIF_TUPLE_SIZE
    tags = dif.Tags(d.chk_ref_tag_seed, d.chk_app_tag_mask, d.chk_app_tag_seed)

    def step(block: memoryview, i: int) -> tuple[int, bytes]:
        blk, tup = block[:bs], block[bs:]
        status = dif.check_block(blk, tup, d.dif_flags, d.src_dif_flags, tags, i)
        if status or emit is None:
            return status, b""
        return 0, emit(blk, tup, i)

    done, status, fault = _dif_blocks(d, ctx, unit, out_unit, step)
    ref, app = dif.expected_src(tags, d.src_dif_flags, done)
    dref, dapp = dif.dest_tags(dif.Tags(d.ins_ref_tag_seed, d.ins_app_tag_mask, d.ins_app_tag_seed),
                               d.dest_dif_flags, done)
    tags_rec = comp_op_dif(ref, d.chk_app_tag_mask, app, dref, d.ins_app_tag_mask, dapp)
    if status:
        return CompletionRecord(status=int(DsaStatus.DIF_ERR), result=status,
                                bytes_completed=done * unit, op_specific=tags_rec)
    if fault is not None:
        return _fault(ctx, fault, done * unit, op_specific=tags_rec)
    return _ok(op_specific=tags_rec)


def op_dif_check(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    return _dif_run(d, ctx, 0, None)


def op_dif_strp(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    return _dif_run(d, ctx, dif.block_size(d.dif_flags), lambda blk, tup, i: bytes(blk))


def op_dif_updt(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    bs = dif.block_size(d.dif_flags)
    dtags = dif.Tags(d.ins_ref_tag_seed, d.ins_app_tag_mask, d.ins_app_tag_seed)
    return _dif_run(d, ctx, bs + DIF_TUPLE_SIZE, lambda blk, tup, i: bytes(blk) + dif.updated_tuple(
        blk, tup, d.dif_flags, d.dest_dif_flags, dtags, i))


def op_dif_ins(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Append a generated tuple after each source block."""
    bs = dif.block_size(d.dif_flags)
    tags = dif.Tags(d.ins_ref_tag_seed, d.ins_app_tag_mask, d.ins_app_tag_seed)

    def step(blk: memoryview, i: int) -> tuple[int, bytes]:
        ref, app = dif.dest_tags(tags, d.dest_dif_flags, i)
        return 0, bytes(blk) + dif.tuple_bytes(dif.guard(blk, d.dif_flags), app, ref)

    done, _, fault = _dif_blocks(d, ctx, bs, bs + DIF_TUPLE_SIZE, step)
    ref, app = dif.dest_tags(tags, d.dest_dif_flags, done)
    rec = comp_op_dif(ins_ref=ref, ins_mask=d.ins_app_tag_mask, ins_app=app)
    if fault is not None:
        return _fault(ctx, fault, done * bs, op_specific=rec)
    return _ok(op_specific=rec)


# -- batch -----------------------------------------------------------------------
def op_batch(d: Descriptor, ctx: OpContext) -> CompletionRecord:
    """Run ``desc_count`` descriptors read (64-byte aligned) from desc_list_addr.

    Each entry writes its own record. The batch completes SUCCESS when every
    entry completed SUCCESS, else BATCH_FAIL (0x05); descs_completed counts the
    entries processed. An entry with FENCE after a failed entry abandons the
    rest (inf, DSA spec "fence" semantics). A fault reading the list completes
    the entries before it, then BATCH_PAGE_FAULT (0x06). A BATCH entry is
    refused with BAD_OPCODE by the entry runner, so a list pointing at its own
    batch descriptor ends after one level, never recursing."""
    raw, fault = ctx.mem.read(Iova(d.desc_list_addr), d.desc_count * DESC_SIZE)
    whole = len(raw) // DESC_SIZE
    ok = True
    done = 0
    for i in range(whole):
        sub = Descriptor.unpack(raw[i * DESC_SIZE : (i + 1) * DESC_SIZE])
        if sub.flags & DescFlags.FENCE and not ok:
            break
        rec = ctx.run_batch_entry(sub)
        done += 1
        ok = ok and rec.code == DsaStatus.SUCCESS
    if fault is not None and done == whole:
        return CompletionRecord(status=int(DsaStatus.BATCH_PAGE_FAULT), bytes_completed=done,
                                fault_addr=int(fault.iova))
    status = DsaStatus.SUCCESS if ok and done == d.desc_count else DsaStatus.BATCH_FAIL
    return CompletionRecord(status=int(status), bytes_completed=done)


OpFn = Callable[[Descriptor, OpContext], CompletionRecord]

OPS: dict[int, OpFn] = {
    Opcode.NOOP: op_noop,
    Opcode.BATCH: op_batch,
    Opcode.DRAIN: op_drain,
    Opcode.MEMMOVE: op_memmove,
    Opcode.MEMFILL: op_memfill,
    Opcode.COMPARE: op_compare,
    Opcode.COMPVAL: op_compval,
    Opcode.CR_DELTA: op_cr_delta,
    Opcode.AP_DELTA: op_ap_delta,
    Opcode.DUALCAST: op_dualcast,
    Opcode.CRCGEN: op_crcgen,
    Opcode.COPY_CRC: op_copy_crc,
    Opcode.DIF_CHECK: op_dif_check,
    Opcode.DIF_INS: op_dif_ins,
    Opcode.DIF_STRP: op_dif_strp,
    Opcode.DIF_UPDT: op_dif_updt,
    Opcode.CFLUSH: op_cflush,
}


def execute(d: Descriptor, ctx: OpContext, *, in_batch: bool = False) -> CompletionRecord:
    """Validate then run ``d`` (the completion record address was checked by
    the caller, which decides whether a record can be written at all)."""
    if d.opcode not in OPS or not opcap_has(ctx.limits.opcap, d.opcode):
        return fail(DsaStatus.BAD_OPCODE)
    if in_batch and d.opcode == Opcode.BATCH:  # no batch in a batch
        return fail(DsaStatus.BAD_OPCODE)
    err = validate(d, ctx.limits)
    if err is not None:
        return err
    return OPS[d.opcode](d, ctx)
