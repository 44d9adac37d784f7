"""map / unmap / lookup, written once, checked once per format configuration
against a model of mapped intervals (generic_pt's kunit_iommu_pt.h)."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest

from pviommu.errors import OutOfFrames, PageTableError
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.common import RW, Perm, PtFeature, PtFormat
from pviommu.pt.fmt import FORMAT_CONFIGS
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import PageTable

CONFIGS = sorted(FORMAT_CONFIGS)
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
_U64 = struct.Struct("<Q")


class ByteMemory:
    """Table memory in a bytearray (addresses = offsets), for format tests."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.reads = self.writes = 0  # entry accesses, for the cost tests

    def read_u64(self, addr: int) -> int:
        self.reads += 1
        return int(_U64.unpack_from(self.buf, addr)[0])

    def write_u64(self, addr: int, value: int) -> None:
        self.writes += 1
        _U64.pack_into(self.buf, addr, value)

    def zero(self, offset: int, length: int) -> None:
        self.buf[offset : offset + length] = bytes(length)


@dataclass
class Env:
    fmt: PtFormat
    mem: ByteMemory
    frames: FrameAllocator[int]
    pt: PageTable[int, int, int]


def make_env(cfg: str, table_bytes: int = 8 << 20) -> Env:
    fmt = FORMAT_CONFIGS[cfg]()
    mem = ByteMemory(table_bytes)
    frames: FrameAllocator[int] = FrameAllocator(0, table_bytes, to_addr=int, from_addr=int, zero=mem.zero)
    pt: PageTable[int, int, int] = PageTable(fmt, mem, frames, table_addr=int, out_addr=int)
    return Env(fmt, mem, frames, pt)


def leaves(pt: PageTable[int, int, int], va: int, length: int) -> list[tuple[int, int]]:
    """(va, size_lg2) of every leaf in the range, by walking lookups."""
    out, pos = [], va
    while pos < va + length:
        tr = pt.lookup(pos)
        if tr is None:
            pos += K4
            continue
        start = pos & ~(tr.size - 1)
        out.append((start, tr.size_lg2))
        pos = start + tr.size
    return out


def high_va(fmt: PtFormat, offset: int) -> int:
    """A VA near the top of the format's space (upper half when sign-extended)."""
    if fmt.features & PtFeature.SIGN_EXTEND:
        return (1 << 64) - (1 << (fmt.vasz_lg2 - 1)) + offset
    return (1 << fmt.vasz_lg2) - (1 << 33) + offset


@pytest.mark.parametrize("cfg", CONFIGS)
def test_map_simple_every_size_gives_one_leaf_and_right_oa(cfg: str) -> None:
    env = make_env(cfg)
    for i, size in enumerate((K4, M2, G1)):
        va, oa = (i + 1) * 4 * G1, (i + 7) * G1
        env.pt.map(va, oa, size, RW)
        assert leaves(env.pt, va, size) == [(va, size.bit_length() - 1)]
        tr = env.pt.lookup(va + size - 8)
        assert tr is not None and tr.oa == oa + size - 8 and tr.perm & RW == RW
    gather: IotlbGather[int] = IotlbGather()
    for i, size in enumerate((K4, M2, G1)):
        assert env.pt.unmap((i + 1) * 4 * G1, size, gather) == size
    for table in gather.freelist:
        env.frames.free(table)
    assert env.pt.table_pages == 1 and env.frames.allocated_frames == 1


@pytest.mark.parametrize("cfg", CONFIGS)
def test_map_uses_largest_fitting_leaves_like_linux(cfg: str) -> None:
    env = make_env(cfg)
    start, end = 0x3FE400000, 0x4C0600000  # generic_pt kunit: 14x2M, 3x1G, 3x2M
    env.pt.map(start, start, end - start, RW)
    sizes = [lg2 for _, lg2 in leaves(env.pt, start, end - start)]
    assert sizes == [21] * 14 + [30] * 3 + [21] * 3
    va, oa = 0xFEF80000, 0x208B95D000
    env.pt.map(va, oa, 0x20000, RW)
    assert [lg2 for _, lg2 in leaves(env.pt, va, 0x20000)] == [12] * 32
    tr = env.pt.lookup(0xFEF9F123)
    assert tr is not None and tr.oa == oa + 0x1F123


@pytest.mark.parametrize("cfg", CONFIGS)
def test_leaf_sizes_equal_greedy_best_size_reference(cfg: str) -> None:
    env = make_env(cfg)
    rng = random.Random(cfg)
    for _ in range(20):
        va = rng.randrange(0, 1 << 37, K4) | (rng.choice([0, 0, 1]) * M2)
        oa = (va + rng.choice([0, K4, M2, G1])) & ((1 << 40) - 1) & ~(K4 - 1)
        length = rng.choice([K4, 5 * K4, M2, M2 + 3 * K4, 3 * M2, G1 + M2])
        if length > G1 and (va - oa) % M2:
            length = 3 * M2  # 1 GiB of 4 KiB leaves would only make the test slow
        try:
            env.pt.map(va, oa, length, RW)
        except PageTableError:
            continue
        expected, pos, o, left = [], va, oa, length
        while left:
            lg2 = max(s for s in (12, 21, 30) if (pos | o) % (1 << s) == 0 and (1 << s) <= left)
            expected.append((pos, lg2))
            pos, o, left = pos + (1 << lg2), o + (1 << lg2), left - (1 << lg2)
        assert leaves(env.pt, va, length) == expected


@pytest.mark.parametrize("cfg", CONFIGS)
def test_random_map_unmap_agrees_with_interval_model(cfg: str) -> None:
    env = make_env(cfg)
    fmt = env.fmt
    rng = random.Random(f"model-{cfg}")
    model: dict[int, tuple[int, int, Perm]] = {}  # va -> (length, oa, perm)

    def model_lookup(va: int) -> tuple[int, Perm] | None:
        for start, (length, oa, perm) in model.items():
            if start <= va < start + length:
                return oa + va - start, perm
        return None

    def overlaps(va: int, length: int) -> bool:
        return any(s < va + length and va < s + n for s, (n, _, _) in model.items())

    bases = [0, 1 << 30, high_va(fmt, 0)]
    for step in range(250):
        if model and rng.random() < 0.3:
            va = rng.choice(list(model))
            length, _, _ = model.pop(va)
            gather: IotlbGather[int] = IotlbGather()
            before = env.frames.allocated_frames
            assert env.pt.unmap(va, length, gather) == length
            assert env.frames.allocated_frames == before  # nothing freed behind our back
            for table in gather.freelist:
                env.frames.free(table)
        else:
            va = rng.choice(bases) + rng.randrange(0, 1 << 31, K4)
            length = rng.choice([K4, 3 * K4, M2, 2 * M2 + K4, 600 * K4])
            oa = rng.randrange(0, 1 << 44, K4) if rng.random() < 0.5 else (va & ((1 << 44) - 1))
            perm = rng.choice([Perm.READ, RW, RW | Perm.EXEC])
            if overlaps(va, length):
                snapshot = bytes(env.mem.buf)
                with pytest.raises(PageTableError):
                    env.pt.map(va, oa, length, perm)
                assert bytes(env.mem.buf) == snapshot  # nothing changed
            else:
                env.pt.map(va, oa, length, perm)
                model[va] = (length, oa, perm)
        if step % 10 == 0:
            probes = [rng.choice(bases) + rng.randrange(0, 1 << 31, 8) for _ in range(20)]
            for s, (n, _, _) in model.items():
                probes += [s, s + n - 8, s + n]
            for va in probes:
                got, want = env.pt.lookup(va), model_lookup(va)
                if want is None:
                    assert got is None, hex(va)
                else:
                    assert got is not None and got.oa == want[0], hex(va)
                    assert got.perm & fmt.supported_perm & RW == want[1] & RW
    gather = IotlbGather()
    for va, (length, _, _) in model.items():
        assert env.pt.unmap(va, length, gather) == length
    assert env.pt.table_pages == 1 + 0 and len(set(gather.freelist)) == len(gather.freelist)
    for table in gather.freelist:
        env.frames.free(table)
    assert env.frames.allocated_frames == 1  # only the root: no leaked table pages


@pytest.mark.parametrize("cfg", CONFIGS)
def test_unmap_returns_leaf_sizes_and_leaves_nothing_reachable(cfg: str) -> None:
    env = make_env(cfg)
    va = 3 * G1 - 2 * K4
    env.pt.map(va, va, 2 * K4 + M2 + G1, RW)  # 2x4K, 2M .. up to 1G boundary, then 1G
    pages_before = env.pt.table_pages
    gather: IotlbGather[int] = IotlbGather()
    done = env.pt.unmap(va, 2 * K4 + M2 + G1, gather)
    assert done == 2 * K4 + M2 + G1
    assert all(env.pt.lookup(a) is None for a in range(va, va + done, M2 // 2))
    assert gather.start == va and gather.last == va + done - 1
    assert gather.pgsize_lg2 >= 21
    # every emptied table is on the freelist and still allocated
    assert len(gather.freelist) == pages_before - env.pt.table_pages
    assert all(env.frames.owns(t) for t in gather.freelist)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_small_unmap_of_large_leaf_removes_whole_leaf(cfg: str) -> None:
    env = make_env(cfg)
    env.pt.map(M2, 4 * M2, M2, RW)
    gather: IotlbGather[int] = IotlbGather()
    assert env.pt.unmap(M2, K4, gather) == M2
    assert env.pt.lookup(M2 + M2 - K4) is None


@pytest.mark.parametrize("cfg", CONFIGS)
def test_unmap_starting_inside_a_leaf_is_refused_and_changes_nothing(cfg: str) -> None:
    env = make_env(cfg)
    env.pt.map(M2, 4 * M2, M2, RW)
    snapshot = bytes(env.mem.buf)
    with pytest.raises(PageTableError, match="never split"):
        env.pt.unmap(M2 + K4, K4, IotlbGather())
    assert bytes(env.mem.buf) == snapshot


@pytest.mark.parametrize("cfg", CONFIGS)
def test_map_rejects_bad_arguments(cfg: str) -> None:
    env = make_env(cfg)
    fmt = env.fmt
    with pytest.raises(PageTableError):
        env.pt.map(K4 + 1, 0, K4, RW)  # unaligned
    with pytest.raises(PageTableError):
        env.pt.map(0, 0, K4, Perm.EXEC)  # neither read nor write
    with pytest.raises(PageTableError):
        env.pt.map(1 << fmt.vasz_lg2, 0, K4, RW)  # beyond / non-canonical
    with pytest.raises(PageTableError):
        env.pt.map(0, (1 << fmt.oasz_lg2) - K4, 2 * K4, RW)  # OA beyond width
    if fmt.features & PtFeature.SIGN_EXTEND:
        with pytest.raises(PageTableError):  # crossing the canonical hole
            env.pt.map((1 << (fmt.vasz_lg2 - 1)) - K4, 0, 2 * K4, RW)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_out_of_frames_midway_rolls_back_everything(cfg: str) -> None:
    env = make_env(cfg, table_bytes=3 * K4)  # the root and two more tables
    snapshot = bytes(env.mem.buf)
    # two 4K pages in different leaf tables: needs more than two new tables
    # at every depth (3-level formats map the first page, then run out)
    with pytest.raises(OutOfFrames):
        env.pt.map(M2 - K4, M2 - K4, 2 * K4, RW)
    assert bytes(env.mem.buf) == snapshot
    assert env.frames.allocated_frames == 1 and env.pt.table_pages == 1


@pytest.mark.parametrize("cfg", CONFIGS)
def test_mapping_2mib_as_512_pages_writes_each_entry_once_and_reads_only_the_two_paths(cfg: str) -> None:
    """The cost of a map in entry accesses (not seconds): one write per leaf and per new table,
    and reads only down the two paths to the two leaf tables -- never a rescan per page."""
    env = make_env(cfg)
    env.pt.map(K4, M2 + K4, M2, RW)  # unaligned: 512 4K leaves, in two leaf tables
    reads, writes, levels = env.mem.reads, env.mem.writes, env.fmt.top_level + 1
    assert len(leaves(env.pt, K4, M2)) == 512
    assert writes == 512 + (env.pt.table_pages - 1)  # the leaves, and each new table's link
    assert reads <= 2 * levels


@pytest.mark.parametrize("cfg", CONFIGS)
def test_walk_reports_every_level_down_to_the_leaf(cfg: str) -> None:
    env = make_env(cfg)
    env.pt.map(G1 + K4, K4, K4, RW)
    steps = env.pt.walk(G1 + K4)
    assert [s.level for s in steps] == list(range(env.fmt.top_level, -1, -1))
    assert steps[-1].entry == env.fmt.make_leaf(K4, 0, RW)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_page_size_bitmap_restricts_leaf_sizes(cfg: str) -> None:
    fmt = FORMAT_CONFIGS[cfg]()
    mem = ByteMemory(1 << 20)
    frames: FrameAllocator[int] = FrameAllocator(0, 1 << 20, to_addr=int, from_addr=int, zero=mem.zero)
    pt: PageTable[int, int, int] = PageTable(
        fmt, mem, frames, table_addr=int, out_addr=int, page_sizes=K4 | M2
    )  # e.g. no CAP.FS1GP: never a 1 GiB leaf
    pt.map(G1, G1, G1, RW)
    assert {lg2 for _, lg2 in leaves(pt, G1, G1)} == {21}
