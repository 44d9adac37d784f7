"""Delta records (CR_DELTA creates, AP_DELTA applies).

A delta record is a list of 10-byte entries ``{u16 word offset, u64 data}``:
for each 8-byte word where src1 and src2 differ, the offset of the word and
src2's value. Applying it to a copy of src1 gives src2. Offsets are word
indices, so ``xfer_size <= 0x80000`` keeps them in 16 bits.
"""

from __future__ import annotations

import struct

from pviommu.abi.dsa import DELTA_ENTRY_SIZE

#: Largest buffer a delta record can describe (65536 words of 8 bytes).
MAX_DELTA_XFER = 0x80000
#: DML: max_delta_size must hold at least 8 entries.
MIN_MAX_DELTA_SIZE = 80
_ENTRY = struct.Struct("<HQ")
_CHUNK = 512  # compare this many bytes at C speed before looking at words


def create(src1: bytes | memoryview, src2: bytes | memoryview) -> list[tuple[int, int]]:
    """(word index, src2 word) for every differing 8-byte word."""
    a, b = memoryview(src1), memoryview(src2)
    n = min(len(a), len(b)) // 8 * 8
    out: list[tuple[int, int]] = []
    for base in range(0, n, _CHUNK):
        end = min(base + _CHUNK, n)
        if a[base:end] == b[base:end]:
            continue
        wa = a[base:end].cast("Q")
        wb = b[base:end].cast("Q")
        for i in range(len(wb)):
            if wa[i] != wb[i]:
                out.append((base // 8 + i, wb[i]))
    return out


def pack(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(_ENTRY.pack(idx, word) for idx, word in entries)


def unpack(record: bytes) -> list[tuple[int, int]]:
    return [(int(i), int(w)) for i, w in _ENTRY.iter_unpack(record[: len(record) // 10 * 10])]


def runs(entries: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """Coalesce entries with consecutive word offsets into (word index, bytes)
    runs, so applying a dense record costs a few writes, not one per word."""
    out: list[tuple[int, bytes]] = []
    start = -2
    buf = bytearray()
    last = -2
    for idx, word in entries:
        if idx != last + 1:
            if buf:
                out.append((start, bytes(buf)))
            start, buf = idx, bytearray()
        buf += struct.pack("<Q", word)
        last = idx
    if buf:
        out.append((start, bytes(buf)))
    return out


assert _ENTRY.size == DELTA_ENTRY_SIZE
