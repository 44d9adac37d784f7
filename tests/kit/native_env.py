"""Random nested worlds for the differential tests of the compiled core
(tests/core/test_native_*.py): the Python implementation is the reference,
the compiled one must give the same answers and leave the same bytes.

A world is host memory with bank 0 (context and owner tables + stage-2
tables), the owner's bank 1 and another partition's bank 2, a stage 2 of 3, 4
or 5 levels over bank 1 and a stage 1 of 4 or 5 levels in bank 1, built from a
seed. Its contexts are plain VT-d entries; the owner bank that fences stage-2
output comes from the slot's owner record (``World.install`` writes both for
the tests that go through a unit), and is an argument of the walks:

* stage 2 (GPA -> HPA): 4 KiB leaves over the guest's table pages (some of them
  read-only or write-only), a 2 MiB leaf, 4 KiB pages of random rights (some
  holes), a hole, a read-only 2 MiB leaf, read-write 2 MiB leaves, a 1 GiB leaf
  that runs past the bank, and a page of another partition's bank (the fence);
* stage 1 (IOVA -> GPA): random 4 KiB runs, 2 MiB and 1 GiB leaves, low and
  high half, to data, holes, the MSI window, the GPA width's edge, its own
  table pages; random rights (read-only, supervisor); Accessed/Dirty bits
  cleared at random so walks must set them;
* optionally hostile bytes scribbled into stage-1 (and stage-2) table pages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pviommu.addr import SZ_1G, SZ_2M, SZ_4K, Gpa, Hpa, Iova
from pviommu.errors import PageTableError
from pviommu.iommu.context import ContextEntry, Pgtt
from pviommu.mem.bank import bank_base
from pviommu.pt.common import RW, EntryType, Perm, PtFormat
from pviommu.pt.walk import TableIterator
from pviommu.units import MiB
from tests.kit.nested import Nested, build_nested

U64 = (1 << 64) - 1
BANK0 = 1 * MiB
RAM = 16 * MiB
OTHER = 64 * 1024
TABLES = (0, 1 * MiB)  # guest table frames (GPA)
MIXED = (4 * MiB, 4 * MiB + 64 * SZ_4K)  # 4 KiB pages of random stage-2 rights
HOLE = (6 * MiB, 8 * MiB)
RO = (8 * MiB, 10 * MiB)
FOREIGN_GPA = 16 * MiB  # stage 2 sends this page into bank 2
BIG_GPA = SZ_1G  # a 1 GiB stage-2 leaf over bank 1 (and past its end)
MSI_GPA = 0xFEE0_0000
DID = 5
#: the world's partition: its RAM is bank 1
OWNER = 1
#: a context with the owner bank its walks are fenced into
Owned = tuple[ContextEntry, int]


@dataclass(kw_only=True)
class World(Nested):
    #: stage-1 mappings made: (iova, length)
    mapped: list[tuple[int, int]] = field(default_factory=list)
    #: GPAs of stage-1 table pages, HPAs of stage-2 table pages
    s1_tables: list[int] = field(default_factory=list)
    s2_tables: list[int] = field(default_factory=list)

    def nested(self, **over: int) -> ContextEntry:
        return _replace(self.context(DID), over)

    def s2_only(self, **over: int) -> ContextEntry:
        return _replace(self.identity(DID), over)


class Kept(dict[tuple[int, ...], tuple[World, list[bytes]]]):
    """Worlds by configuration, each with its pristine bytes (short repr:
    hypothesis prints the fixtures of a failing example)."""

    def __repr__(self) -> str:
        return f"<{len(self)} worlds: {sorted(self)}>"

    def close(self) -> None:
        for world, _ in self.values():
            world.close()


def _replace(ctx: ContextEntry, over: dict[str, int]) -> ContextEntry:
    fields = {name: getattr(ctx, name) for name in ContextEntry.__slots__}
    fields.update(over)
    return ContextEntry(**fields)


def _table_pages(fmt: PtFormat, read_u64: Callable[[int], int], root: int) -> list[int]:
    """The root and every table page linked below it."""
    items = TableIterator(fmt, read_u64, root)
    return sorted({root, *(it.oa for it in items if it.type is EntryType.TABLE)})


def build_world(directory: Path, seed: int, *, s2_levels: int = 4, fs_levels: int = 4,
                mappings: int = 14, clear_ad: float = 0.4, odd_tables: float = 0.03) -> World:
    rnd = random.Random(seed)
    base = build_nested(directory, bank0=BANK0, rams=(RAM, OTHER), tables=TABLES, s2_levels=s2_levels,
                        fs_levels=fs_levels, mark=OTHER)
    host, ram, s1, s2 = base.host, base.ram, base.s1, base.s2
    h = base.hpa

    # -- stage 2 --------------------------------------------------------------------
    odd_rights = [Perm.READ, Perm.WRITE]
    for gpa in range(TABLES[0], 2 * MiB, SZ_4K):  # table pages: mostly RW, a few odd
        s2.map(Gpa(gpa), h(gpa), SZ_4K, rnd.choice(odd_rights) if rnd.random() < odd_tables else RW)
    s2.map(Gpa(2 * MiB), h(2 * MiB), SZ_2M, RW)
    for gpa in range(*MIXED, SZ_4K):
        choice = rnd.choice(["rw", "rw", "r", "w", "hole"])
        if choice != "hole":
            s2.map(Gpa(gpa), h(gpa), SZ_4K, {"rw": RW, "r": Perm.READ, "w": Perm.WRITE}[choice])
    s2.map(Gpa(RO[0]), h(RO[0]), RO[1] - RO[0], Perm.READ)
    s2.map(Gpa(RO[1]), h(RO[1]), RAM - RO[1], RW)
    s2.map(Gpa(FOREIGN_GPA), bank_base(2), SZ_4K, RW)
    s2.map(Gpa(BIG_GPA), h(0), SZ_1G, RW)

    # -- stage 1 --------------------------------------------------------------------
    fs = s1.fmt
    targets = [2 * MiB, MIXED[0], MIXED[0] + 17 * SZ_4K, HOLE[0], RO[0], RO[1], 12 * MiB, FOREIGN_GPA, BIG_GPA,
               BIG_GPA + 15 * MiB, BIG_GPA + RAM, MSI_GPA, 0, SZ_4K * 3, (1 << 39) - SZ_2M, 1 << 40, 1 << 47]
    made: list[tuple[int, int]] = []
    for _ in range(mappings):
        size = rnd.choice([SZ_4K, SZ_4K, 4 * SZ_4K, SZ_2M, SZ_2M, SZ_1G])
        gpa = rnd.choice(targets) & ~(min(size, SZ_1G) - 1)
        if rnd.random() < 0.5:
            gpa = (gpa + rnd.randrange(0, 8) * size) if size < SZ_1G else gpa
        half = 1 << (fs.vasz_lg2 - 1)
        iova = rnd.randrange(0, half // size) * size
        if rnd.random() < 0.3:  # the high half (sign-extended)
            iova = (iova | half) | (U64 & ~((1 << fs.vasz_lg2) - 1))
        perm = rnd.choice([RW, RW, RW, Perm.READ, RW | Perm.PRIV, Perm.READ | Perm.EXEC])
        try:
            s1.map(Iova(iova), Gpa(gpa), size, perm)
        except PageTableError:
            continue
        made.append((iova, size))
    # a dense neighbourhood for the translation loop: contiguous 4K pages and a 2M leaf
    for iova, gpa, size in ((0x40_0000_0000, 12 * MiB, 16 * SZ_4K), (0x40_0020_0000, 14 * MiB, SZ_2M)):
        try:
            s1.map(Iova(iova), Gpa(gpa), size, RW)
            made.append((iova, size))
        except PageTableError:
            pass

    world = World.extend(base, mapped=made)
    world.s1_tables = _table_pages(s1.fmt, lambda gpa: ram.read_u64(Gpa(gpa)), int(s1.root))
    world.s2_tables = _table_pages(s2.fmt, lambda hpa: host.read_u64(Hpa(hpa)), int(s2.root))
    if clear_ad:  # a guest that leaves A/D to the hardware
        for table in world.s1_tables:
            for idx in range(512):
                entry = ram.read_u64(Gpa(table + 8 * idx))
                if entry & 1 and rnd.random() < clear_ad:
                    ram.write_u64(Gpa(table + 8 * idx), entry & ~0x60)
    return world


def hostile_entry(rnd: random.Random, world: World) -> int:
    """Random u64s, plus the nasty ones: loops into its own tables, pointers
    past RAM, into holes and other banks, reserved bits, present garbage."""
    addrs = [*world.s1_tables, *[t - int(world.banks[0].base) for t in world.s2_tables], HOLE[0], RAM, RAM - SZ_4K,
             FOREIGN_GPA, BIG_GPA, MSI_GPA, 1 << 40, 1 << 47, (1 << 52) - SZ_4K, int(bank_base(0)), int(bank_base(2))]
    flags = [0x27, 0x67, 0xA7, 0xE7, 0x07, 0x25, 0x23, 0x21, 0x01, 0x03, 0x02, 0x83, 0x803, 0x8000_0000_0000_0027,
             0x27 | 1 << 13, 0xA7 | 1 << 20, 0x27 | 1 << 51, 0x27 | 1 << 48, 0x4000_0000_0000_0003]
    if rnd.random() < 0.25:
        return rnd.getrandbits(64)
    return (rnd.choice(addrs) | rnd.choice(flags)) & U64


def scribble(rnd: random.Random, world: World, n: int, *, stage2: bool) -> None:
    """Write ``n`` hostile entries into live stage-1 table pages (and, with
    ``stage2``, stage-2 table pages in bank 0)."""
    for _ in range(n):
        idx = rnd.choice([0, 1, 255, 256, 511, rnd.randrange(512)])
        if stage2 and rnd.random() < 0.3:
            hpa = rnd.choice(world.s2_tables) + 8 * idx
            world.host.write_u64(Hpa(hpa), hostile_entry(rnd, world))
        else:
            world.ram.write_u64(Gpa(rnd.choice(world.s1_tables) + 8 * idx), hostile_entry(rnd, world))


def iovas(rnd: random.Random, world: World, n: int) -> list[int]:
    """IOVAs to walk: starts, insides and ends of what was mapped, neighbours,
    and odd ones (non-canonical, the top, the MSI window, random)."""
    out: list[int] = []
    for iova, size in world.mapped:
        out += [iova, iova + rnd.randrange(size), iova + size - 1, (iova + size) & U64]
    out += [0, SZ_4K, U64, U64 & ~0xFFF, 1 << 47, (1 << 47) - SZ_4K, 0xFFFF_8000_0000_0000, 1 << 56, 1 << 63,
            (1 << 57) - SZ_4K, MSI_GPA, HOLE[0], RAM, BIG_GPA]
    out += [rnd.getrandbits(64) for _ in range(4)]
    rnd.shuffle(out)
    return out[:n]


def contexts(rnd: random.Random, world: World) -> list[Owned]:
    """The world's nested and stage-2-only contexts, plus hostile variants:
    roots at odd places, unsupported field values the walker must survive,
    and an owner bank that is not the tables' (the fence), each with its owner bank."""
    out = [world.nested(), world.s2_only()]
    roots = [*world.s1_tables[:3], HOLE[0], RO[0], MIXED[0] + rnd.randrange(64) * SZ_4K, FOREIGN_GPA,
             BIG_GPA + 2 * MiB, RAM + SZ_4K, 1 << 40, (1 << 52) - SZ_4K, MSI_GPA]
    out.append(world.nested(fsptptr=rnd.choice(roots)))
    out.append(world.nested(ssptptr=rnd.choice([int(world.banks[0].base) + BANK0, int(bank_base(1)),
                                                 rnd.choice(world.s2_tables), int(world.banks[0].base)])))
    out.append(world.nested(aw=rnd.choice([0, 4, 7]), fspm=rnd.choice([2, 3])))
    out.append(world.nested(pgtt=rnd.choice([int(Pgtt.FS_ONLY), int(Pgtt.PASS_THROUGH), 0, 7])))
    return [*((ctx, OWNER) for ctx in out), (world.nested(), rnd.choice([2, 9])), (world.s2_only(), 2)]
