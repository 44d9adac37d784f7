"""Scalable-mode root, context, PASID-directory and PASID tables in bank 0.

pviommu proposal, not in the series (docs/proposal-sva.md): with the SVA
proposal on, a request *with* a PASID reaches its PASID entry the VT-d way
(VT-d 3.4.3, 9.4-9.6; reference vtd-nested.md section 3)::

    RTADDR word (bank 0 + RTADDR_OFFSET): bit 10 SMT, bits 63:12 root table HPA
      -> SM root entry of bus 0 (128 bits; lo LP/LCTP for devfn 0-127, hi UP/UCTP for 128-255)
      -> SM context entry of devfn = the device slot (256 bits)
           qw0 bit 0 P, 1 FPD, 2 DTE, 3 PASIDE, 4 PRE, 11:9 PDTS, 63:12 PASIDDIRPTR (HPA)
           qw1 bits 19:0 RID_PASID, bit 20 RID_PRIV; qw2-qw3 reserved
      -> PASID-directory entry PASID[19:6] (64 bits): bit 0 P, 1 FPD, 63:12 PASIDPTPTR (HPA)
      -> PASID-table entry PASID[5:0] (512 bits): the layout of ``context.ContextEntry``

A directory has ``2 ** (PDTS + 7)`` entries, so a device's PASIDs run up to
``2 ** (PDTS + 13) - 1``. Every pointer here is host-physical and must lie in
bank 0 (the hypervisor's private memory; guests never write it). Requests
*without* a PASID, and requests with PASID 0 (RID_PASID), keep using the
flat per-slot context table of ``context`` (the series' path, compiled core
included): the hypervisor mirrors that entry into PASID 0 of the table so
both views agree, and ``RID_PASID`` is always 0.

Faults carry the scalable-mode reason codes of VT-d's table (``SmFault``);
the PASID entry itself is checked exactly as the flat context entry is
(0x59-0x5B).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from pviommu.addr import PAGE_SIZE, Hpa
from pviommu.errors import PviommuError
from pviommu.iommu.context import CONTEXT_ENTRY_SIZE, MAX_SLOTS, ContextEntry
from pviommu.mem.bank import HYPERVISOR_BANK, HostMemory, bank_base, bank_index_of

#: bank-0 offset of the RTADDR word (between the owner table and the invalidation queues)
RTADDR_OFFSET = 0x8000
ROOT_TABLE_OFFSET = 0x9000
#: the two SM context tables of bus 0 (devfn 0-127, 128-255), 128 x 32 bytes each
CONTEXT_TABLES_OFFSET = 0xA000
SM_REGION_END = 0xC000
RTADDR_SMT = 1 << 10
SM_CONTEXT_SIZE = 32
ROOT_ENTRY_SIZE = 16
PASID_DIR_ENTRY_SIZE = 8
PASID_ENTRY_SIZE = CONTEXT_ENTRY_SIZE
PASID_TABLE_ENTRIES = 64
PASID_BITS = 20
MAX_PASID = (1 << PASID_BITS) - 1
#: PASID 0 is RID_PASID: the DMA-API domain (Linux's IOMMU_NO_PASID)
RID_PASID = 0

_PTR = ((1 << 64) - 1) & ~0xFFF
_U64 = struct.Struct("<Q")
_CTX = struct.Struct("<4Q")
_NO_HPA = Hpa(0)


class SmFault(IntEnum):
    """Scalable-mode fault reasons of the structures above (VT-d 7.1.3 table)."""

    ROOT_TABLE_ADDRESS = 0x30  #: RTADDR names no memory / SMT clear for a PASID request
    ROOT_ACCESS = 0x38
    ROOT_NOT_PRESENT = 0x39
    ROOT_RESERVED = 0x3A
    CONTEXT_ACCESS = 0x40
    CONTEXT_NOT_PRESENT = 0x41
    CONTEXT_RESERVED = 0x42
    CONTEXT_PASID_DISABLED = 0x45  #: PASIDE=0 for a request with PASID
    CONTEXT_PASID_TOO_BIG = 0x46  #: PASID beyond the directory (PDTS)
    CONTEXT_PRI_DISABLED = 0x47  #: PRE=0 and the device asks for a page request
    PASID_DIR_ACCESS = 0x50
    PASID_DIR_NOT_PRESENT = 0x51
    PASID_DIR_RESERVED = 0x52
    PASID_TABLE_ACCESS = 0x58  #: the PASID entry could not be read


class PasidFault(PviommuError):
    """A scalable-mode structure stopped the request before the PASID entry."""

    def __init__(self, reason: SmFault, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- entries ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SmContextEntry:
    """One 256-bit scalable-mode context entry (values as stored)."""

    present: bool = False
    fpd: bool = False
    dte: bool = False
    paside: bool = False
    pre: bool = False
    pdts: int = 0
    pasid_dir: Hpa = _NO_HPA
    rid_pasid: int = 0
    rid_priv: bool = False
    reserved_bits: bool = False

    @property
    def dir_entries(self) -> int:
        return 1 << (self.pdts + 7)

    @property
    def max_pasid(self) -> int:
        return min(MAX_PASID, self.dir_entries * PASID_TABLE_ENTRIES - 1)

    def pack(self) -> bytes:
        if not 0 <= self.pdts < 8 or not 0 <= self.rid_pasid <= MAX_PASID:
            raise ValueError(f"PDTS {self.pdts} / RID_PASID {self.rid_pasid:#x} out of range")
        qw0 = (int(self.present) | int(self.fpd) << 1 | int(self.dte) << 2 | int(self.paside) << 3
               | int(self.pre) << 4 | self.pdts << 9 | (self.pasid_dir & _PTR))
        return _CTX.pack(qw0, self.rid_pasid | int(self.rid_priv) << 20, 0, 0)

    @classmethod
    def unpack(cls, data: bytes) -> SmContextEntry:
        qw = _CTX.unpack(data)
        valid0 = 0x1F | 0x7 << 9 | _PTR
        reserved = bool(qw[0] & ~valid0 or qw[1] >> 21 or qw[2] or qw[3])
        return cls(bool(qw[0] & 1), bool(qw[0] & 2), bool(qw[0] & 4), bool(qw[0] & 8), bool(qw[0] & 16),
                   (qw[0] >> 9) & 7, Hpa(qw[0] & _PTR), qw[1] & MAX_PASID, bool(qw[1] >> 20 & 1), reserved)


def pack_dir_entry(table: Hpa | None, fpd: bool = False) -> int:
    """A PASID-directory entry: P with the PASID table's HPA, or 0."""
    return 0 if table is None else 1 | int(fpd) << 1 | (table & _PTR)


def pack_root_entry(lower: Hpa | None, upper: Hpa | None) -> bytes:
    lo = 0 if lower is None else 1 | (lower & _PTR)
    hi = 0 if upper is None else 1 | (upper & _PTR)
    return struct.pack("<QQ", lo, hi)


def dir_index(pasid: int) -> int:
    return pasid >> 6


def table_index(pasid: int) -> int:
    return pasid & (PASID_TABLE_ENTRIES - 1)


def sm_context_hpa(slot: int) -> Hpa:
    """Where slot ``slot``'s SM context entry lives (devfn = slot on bus 0)."""
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"device slot {slot} outside 0..{MAX_SLOTS - 1}")
    return Hpa(bank_base(HYPERVISOR_BANK) + CONTEXT_TABLES_OFFSET + slot * SM_CONTEXT_SIZE)


def scalable_mode(host: HostMemory) -> bool:
    """Whether the hypervisor turned scalable mode on (RTADDR.SMT): only then do
    requests carry PASIDs (the SVA proposal; off in the series)."""
    try:
        return bool(host.read_u64(Hpa(bank_base(HYPERVISOR_BANK) + RTADDR_OFFSET)) & RTADDR_SMT)
    except PviommuError:
        return False


# -- the reader (the IOMMU unit's side) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PasidStep:
    """One structure read on the way to a PASID entry, for ``pviommu inspect``."""

    what: str  # "RTADDR", "root", "context", "pasid-dir", "pasid-entry"
    hpa: int
    index: int
    value: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class PasidLookup:
    """The PASID entry of (slot, PASID) and the SM context entry above it."""

    slot: int
    pasid: int
    context: SmContextEntry
    entry: ContextEntry
    reads: int


def _read_u64(host: HostMemory, hpa: int, what: SmFault, name: str) -> int:
    if bank_index_of(Hpa(hpa)) != HYPERVISOR_BANK:
        raise PasidFault(what, f"{name} at {hpa:#x} is outside bank 0")
    try:
        return host.read_u64(Hpa(hpa))
    except PviommuError as exc:
        raise PasidFault(what, f"{name} at {hpa:#x}: {exc}") from exc


def _read(host: HostMemory, hpa: int, length: int, what: SmFault, name: str) -> bytes:
    if bank_index_of(Hpa(hpa)) != HYPERVISOR_BANK or bank_index_of(Hpa(hpa + length - 1)) != HYPERVISOR_BANK:
        raise PasidFault(what, f"{name} at {hpa:#x} is outside bank 0")
    try:
        return host.read(Hpa(hpa), length)
    except PviommuError as exc:
        raise PasidFault(what, f"{name} at {hpa:#x}: {exc}") from exc


def lookup_context(host: HostMemory, slot: int, trace: list[PasidStep] | None = None) -> SmContextEntry:
    """The present, valid SM context entry of ``slot`` (root table walk), else ``PasidFault``."""
    base = bank_base(HYPERVISOR_BANK)
    rtaddr = _read_u64(host, base + RTADDR_OFFSET, SmFault.ROOT_TABLE_ADDRESS, "RTADDR")
    if trace is not None:
        trace.append(PasidStep("RTADDR", base + RTADDR_OFFSET, 0, rtaddr, "SMT" if rtaddr & RTADDR_SMT else "legacy"))
    if not rtaddr & RTADDR_SMT:
        raise PasidFault(SmFault.ROOT_TABLE_ADDRESS, "scalable mode is off: no request may carry a PASID")
    if not 0 <= slot < MAX_SLOTS:
        raise PasidFault(SmFault.CONTEXT_ACCESS, f"slot {slot} outside bus 0")
    upper = slot >= 128
    root = (rtaddr & _PTR) + 8 * upper  # bus 0: lo then hi quadword
    rent = _read_u64(host, root, SmFault.ROOT_ACCESS, "root entry")
    if trace is not None:
        trace.append(PasidStep("root", root, 0, rent, "UP" if upper else "LP"))
    if not rent & 1:
        raise PasidFault(SmFault.ROOT_NOT_PRESENT, f"root entry of bus 0 ({'UP' if upper else 'LP'}) not present")
    if rent & 0xFFE:
        raise PasidFault(SmFault.ROOT_RESERVED, f"root entry {rent:#x} has reserved bits")
    at = (rent & _PTR) + (slot & 127) * SM_CONTEXT_SIZE
    raw = _read(host, at, SM_CONTEXT_SIZE, SmFault.CONTEXT_ACCESS, "SM context entry")
    ctx = SmContextEntry.unpack(raw)
    if trace is not None:
        trace.append(PasidStep("context", at, slot, _U64.unpack(raw[:8])[0],
                               f"PASIDE={int(ctx.paside)} PRE={int(ctx.pre)} PDTS={ctx.pdts}"))
    if not ctx.present:
        raise PasidFault(SmFault.CONTEXT_NOT_PRESENT, f"slot {slot}: SM context entry not present")
    if ctx.reserved_bits:
        raise PasidFault(SmFault.CONTEXT_RESERVED, f"slot {slot}: SM context entry has reserved bits")
    return ctx


def lookup(host: HostMemory, slot: int, pasid: int, trace: list[PasidStep] | None = None) -> PasidLookup:
    """Walk to the PASID entry of (``slot``, ``pasid``); ``PasidFault`` on the
    way (the entry's own checks are the unit's, as for flat contexts)."""
    if not 0 <= pasid <= MAX_PASID:
        raise PasidFault(SmFault.CONTEXT_PASID_TOO_BIG, f"PASID {pasid:#x} does not fit {PASID_BITS} bits")
    ctx = lookup_context(host, slot, trace)
    if not ctx.paside:
        raise PasidFault(SmFault.CONTEXT_PASID_DISABLED, f"slot {slot}: PASIDE=0, requests with PASID refused")
    if pasid > ctx.max_pasid:
        raise PasidFault(SmFault.CONTEXT_PASID_TOO_BIG, f"slot {slot}: PASID {pasid:#x} beyond {ctx.max_pasid:#x}")
    at = int(ctx.pasid_dir) + dir_index(pasid) * PASID_DIR_ENTRY_SIZE
    pde = _read_u64(host, at, SmFault.PASID_DIR_ACCESS, "PASID-directory entry")
    if trace is not None:
        trace.append(PasidStep("pasid-dir", at, dir_index(pasid), pde))
    if not pde & 1:
        raise PasidFault(SmFault.PASID_DIR_NOT_PRESENT, f"slot {slot}: no PASID table for PASID {pasid:#x}")
    if pde & 0xFFC:
        raise PasidFault(SmFault.PASID_DIR_RESERVED, f"PASID-directory entry {pde:#x} has reserved bits")
    at = (pde & _PTR) + table_index(pasid) * PASID_ENTRY_SIZE
    raw = _read(host, at, PASID_ENTRY_SIZE, SmFault.PASID_TABLE_ACCESS, "PASID entry")
    entry = ContextEntry.unpack(raw)
    if trace is not None:
        trace.append(PasidStep("pasid-entry", at, table_index(pasid), _U64.unpack(raw[:8])[0],
                               f"P={int(entry.present)} PGTT={entry.pgtt} DID={entry.did}"))
    return PasidLookup(slot, pasid, ctx, entry, 4)


# -- the writer (the hypervisor's side) ------------------------------------------------------
class PasidTables:
    """Builds and edits the structures above in bank 0. ``alloc`` returns a
    zeroed 4 KiB bank-0 frame, ``free`` gives one back (the hypervisor's
    frame allocator). Writes are ordered as ``context.write_context``: the
    present word last when installing, first when clearing; the caller then
    invalidates context, PASID cache and IOTLB as VT-d 6.5.3 orders it."""

    def __init__(self, host: HostMemory, alloc: Callable[[], Hpa], free: Callable[[Hpa], None]) -> None:
        self.host = host
        self._alloc = alloc
        self._free = free
        self._base = bank_base(HYPERVISOR_BANK)
        #: slot -> (directory HPA, PDTS, {directory index: PASID table HPA})
        self._devices: dict[int, tuple[Hpa, int, dict[int, Hpa]]] = {}

    def enable(self) -> None:
        """Zero the root and context tables and turn scalable mode on."""
        b = self._base
        self.host.write(Hpa(b + ROOT_TABLE_OFFSET), bytes(SM_REGION_END - ROOT_TABLE_OFFSET))
        self.host.write(Hpa(b + ROOT_TABLE_OFFSET), pack_root_entry(
            Hpa(b + CONTEXT_TABLES_OFFSET), Hpa(b + CONTEXT_TABLES_OFFSET + 128 * SM_CONTEXT_SIZE)))
        self.host.write_u64(Hpa(b + RTADDR_OFFSET), b + ROOT_TABLE_OFFSET | RTADDR_SMT)

    def add_device(self, slot: int, *, pdts: int = 0, pri: bool = False) -> SmContextEntry:
        """Give ``slot`` a PASID directory (``2 ** (pdts + 7)`` entries) and a present SM context entry."""
        if slot in self._devices:
            self.remove_device(slot)
        if (1 << (pdts + 7)) * PASID_DIR_ENTRY_SIZE > PAGE_SIZE:
            raise ValueError(f"PDTS {pdts}: this model's directories are one 4 KiB page (PDTS <= 2)")
        directory = self._alloc()
        self._devices[slot] = (directory, pdts, {})
        ctx = SmContextEntry(True, False, False, True, pri, pdts, directory, RID_PASID)
        self._write_context(slot, ctx)
        return ctx

    def remove_device(self, slot: int) -> None:
        """Clear ``slot``'s SM context entry, then free its directory and tables."""
        self._write_context(slot, SmContextEntry())
        directory, _, tables = self._devices.pop(slot, (None, 0, {}))
        for table in tables.values():
            self._free(table)
        if directory is not None:
            self._free(directory)

    def set_entry(self, slot: int, pasid: int, entry: ContextEntry) -> None:
        """Store ``entry`` as the PASID entry of (``slot``, ``pasid``), making its PASID table if needed."""
        directory, pdts, tables = self._device(slot)
        if not 0 <= pasid < (1 << (pdts + 7)) * PASID_TABLE_ENTRIES:
            raise ValueError(f"PASID {pasid:#x} beyond slot {slot}'s directory (PDTS {pdts})")
        table = tables.get(dir_index(pasid))
        if table is None:
            if not entry.present:
                return
            table = tables[dir_index(pasid)] = self._alloc()
            self.host.write_u64(Hpa(directory + dir_index(pasid) * PASID_DIR_ENTRY_SIZE), pack_dir_entry(table))
        data, at = entry.pack(), Hpa(table + table_index(pasid) * PASID_ENTRY_SIZE)
        if entry.present:
            self.host.write(Hpa(at + 8), data[8:])
            self.host.write(at, data[:8])
        else:
            self.host.write(at, data[:8])
            self.host.write(Hpa(at + 8), data[8:])

    def clear_entry(self, slot: int, pasid: int) -> None:
        self.set_entry(slot, pasid, ContextEntry.blocked())

    def entry(self, slot: int, pasid: int) -> ContextEntry:
        return lookup(self.host, slot, pasid).entry

    def devices(self) -> list[int]:
        return sorted(self._devices)

    def table_pages(self) -> int:
        return sum(1 + len(t) for _, _, t in self._devices.values())

    def _device(self, slot: int) -> tuple[Hpa, int, dict[int, Hpa]]:
        try:
            return self._devices[slot]
        except KeyError:
            raise ValueError(f"slot {slot} has no PASID directory") from None

    def _write_context(self, slot: int, ctx: SmContextEntry) -> None:
        data, at = ctx.pack(), sm_context_hpa(slot)
        if ctx.present:
            self.host.write(Hpa(at + 8), data[8:])
            self.host.write(at, data[:8])
        else:
            self.host.write(at, data[:8])
            self.host.write(Hpa(at + 8), data[8:])
