"""Hypothesis drawing of DSA descriptors for the isolation fuzz suites (tests/robustness, fuzz/):
mostly well-formed (so the DMA really runs, through hostile translations), sometimes anything."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from pviommu.abi.dsa import DESC_SIZE, DescFlags, Descriptor, Opcode
from pviommu.addr import Gpa
from tests.kit.dsarig import LIST_GPA, LIST_IOVA, PAGE, DsaRig

U64 = (1 << 64) - 1

DATA_OPCODES = [Opcode.MEMMOVE, Opcode.MEMFILL, Opcode.COMPARE, Opcode.COMPVAL, Opcode.DUALCAST, Opcode.CRCGEN,
                Opcode.COPY_CRC, Opcode.CR_DELTA, Opcode.AP_DELTA, Opcode.DIF_CHECK, Opcode.DIF_INS,
                Opcode.DIF_STRP, Opcode.DIF_UPDT, Opcode.CFLUSH]
ALL_OPCODES = [*DATA_OPCODES, Opcode.BATCH, Opcode.NOOP, Opcode.DRAIN]


def op_specific(opcode: int, a1: int, a2: int, word: int, raw: bytes | None) -> bytes:
    """An op-specific area with addresses where the opcode takes them."""
    if raw is not None:
        return raw
    buf = bytearray(24)
    if opcode in (Opcode.DUALCAST, Opcode.CR_DELTA):
        struct.pack_into("<QI", buf, 0, a1, word)
    elif opcode in (Opcode.CRCGEN, Opcode.COPY_CRC):
        struct.pack_into("<IIQ", buf, 0, word, 0, a1)
    elif opcode == Opcode.AP_DELTA:
        struct.pack_into("<I", buf, 0, word)
    elif opcode in (Opcode.DIF_CHECK, Opcode.DIF_STRP, Opcode.DIF_INS, Opcode.DIF_UPDT):
        struct.pack_into("<BBB", buf, 0, word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0x3)
    return bytes(buf)


# -- hypothesis drawing of descriptors (shared by the suites) --------------------------------
SIZES = st.one_of(st.sampled_from([0, 1, 8, 64, 512, 520, 4096, 4104, 8192, 16384, 65536, 2 << 20, (2 << 20) + 1]),
                  st.integers(1, 20_000))


def draw_descriptor(data: st.DataObject, rig: DsaRig, iovas: st.SearchStrategy[int],
                    allow_batch: bool = True) -> Descriptor:
    """Mostly well-formed descriptors (so the DMA really runs, through hostile
    translations), sometimes anything (random flags, sizes, op-specific bytes)."""
    opcode = data.draw(st.sampled_from(ALL_OPCODES if allow_batch else DATA_OPCODES), label="opcode")
    wild = data.draw(st.integers(0, 3), label="wild") == 0
    comp = rig.next_comp() if data.draw(st.integers(0, 9), label="comp") else data.draw(iovas, label="comp addr")
    src, dst, a1 = (data.draw(iovas, label=n) for n in ("src", "dst", "addr1"))
    if wild:
        extra = data.draw(st.sampled_from([0, DescFlags.BOF, DescFlags.CR, DescFlags.FENCE, DescFlags.CC, 0x10000,
                                           0x20000, 0x40000, DescFlags.BOF | DescFlags.CR]), label="flags")
        size = data.draw(SIZES, label="size")
        word = data.draw(st.integers(0, 0xFFFF_FFFF), label="word")
        raw = data.draw(st.none() | st.binary(min_size=24, max_size=24), label="op_specific")
    else:
        extra = data.draw(st.sampled_from([0, 0, DescFlags.BOF]), label="flags")
        src, dst, a1 = src & ~63, dst & ~63, a1 & ~63
        raw = None
        if opcode in (Opcode.DIF_CHECK, Opcode.DIF_STRP, Opcode.DIF_UPDT):
            size, word = 520 * data.draw(st.integers(1, 16), label="blocks"), 0
        elif opcode == Opcode.DIF_INS:
            size, word = 512 * data.draw(st.integers(1, 16), label="blocks"), 0
        else:
            size = 8 * data.draw(st.integers(1, 1024) | st.sampled_from([512, 2048, 8192]), label="size")
            word = size // 8 * 10  # CR_DELTA max_delta_size / AP_DELTA delta_rec_size (10-byte entries)
        if opcode == Opcode.DUALCAST:
            a1 = (a1 & ~0xFFF) | (dst & 0xFFF)
        if opcode == Opcode.AP_DELTA:
            word = 10 * data.draw(st.integers(1, max(1, size // 8)), label="delta entries")
        if opcode in (Opcode.NOOP, Opcode.DRAIN):
            src = dst = size = 0
        if opcode in (Opcode.MEMFILL, Opcode.COMPVAL):
            src = data.draw(st.integers(0, U64), label="pattern")
        if opcode in (Opcode.CRCGEN, Opcode.CFLUSH):
            dst = 0 if opcode == Opcode.CRCGEN else dst
            src = 0 if opcode == Opcode.CFLUSH else src
    if opcode == Opcode.BATCH:
        src, size = build_batch(data, rig, iovas)
        dst = 0
    return Descriptor(opcode=int(opcode), flags=int(DescFlags.CRAV | DescFlags.RCR | extra) & 0xFFFFFF,
                      completion_addr=comp, src_addr=src, dst_addr=dst, xfer_size=size,
                      op_specific=op_specific(opcode, a1, dst, word, raw))


def build_batch(data: st.DataObject, rig: DsaRig, iovas: st.SearchStrategy[int]) -> tuple[int, int]:
    """A descriptor list in the guest's list pages: data ops, a BATCH entry that
    points back at the list itself, or a list read through a hostile IOVA."""
    n = data.draw(st.integers(0, 6), label="batch entries")
    raw = bytearray()
    for _ in range(n):
        if data.draw(st.integers(0, 5), label="self batch") == 0:
            sub = Descriptor(opcode=Opcode.BATCH, flags=int(DescFlags.CRAV | DescFlags.RCR),
                             completion_addr=rig.next_comp(), src_addr=LIST_IOVA + rig.list_used, xfer_size=n)
        else:
            sub = draw_descriptor(data, rig, iovas, allow_batch=False)
        raw += sub.pack()
    start = rig.take_list(len(raw))
    rig.ram.write(Gpa(LIST_GPA + start), bytes(raw))
    where = data.draw(st.sampled_from(["list", "list", "misaligned", "hostile"]), label="list addr")
    addr = {"list": LIST_IOVA + start, "misaligned": LIST_IOVA + start + 8}.get(where)
    if addr is None:
        addr = data.draw(iovas, label="list iova")
    count = data.draw(st.sampled_from([n, n, 0, 1, 33, 4096, 2 * PAGE // DESC_SIZE]), label="desc count")
    return addr, count
