"""Rigs of the isolation / robustness fuzz suites (tests/robustness and fuzz/).

Everything here is the real product: a ``Host`` (banks, stage 2 in bank 0,
context entries), ``Hypercalls`` for the guest's side, a real ``IommuUnit``
over its own mapping of the bank files, and a real ``DsaDevice`` whose every
DMA goes through that unit. The only test-owned pieces are

* ``InProcLink``: the hypervisor's invalidations delivered to the unit
  by a direct call instead of gRPC (same entry points the device service uses);
* ``RefWalker``: an independent, deliberately plain x86-64-over-stage-2 walker
  written from the Intel SDM / VT-d rules (not from ``pviommu.iommu.nested``),
  composed with the partition's stage 2 through the hypervisor's own
  ``PageTable.lookup``; it says, page by page, what the unit must answer and
  which bytes of the guest's RAM a step may change;
* ``RecordingTranslator``: sits between the device and its unit, asks the
  reference walker first, then the unit, and keeps both answers.

The atheris targets in fuzz/ import this module too (as ``tests.kit.robustkit``,
with the repository root on ``sys.path``).
"""

from __future__ import annotations

import collections
import json
import os
import random
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dma_device.dsa import DsaDevice, DsaDeviceConfig
from dma_device.dsa.device import SwError
from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls
from hypervisor_svc.core.model import Device, Partition
from pviommu.abi import hv
from pviommu.abi.dsa import COMP_SIZE, DESC_SIZE, CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode, WqCfg
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import Invalidation, QueueItem
from pviommu.addr import Gpa, Hpa, Iova
from pviommu.errors import HvError
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import HostMemory, bank_base, bank_index_of
from pviommu.mem.dma import DmaRuns, DmaTranslator
from pviommu.pt.common import Perm
from pviommu.units import MiB
from tests.kit.nested import dsa_on, guest_tables, unit_side

PAGE = 4096
U64 = (1 << 64) - 1
SELF = hv.HV_PARTITION_ID_SELF

# -- counts for the report in docs/security.md ----------------------------------------------
COUNTS: collections.Counter[str] = collections.Counter()
_COUNTS_LOCK = threading.Lock()


def count(name: str, n: int = 1) -> None:
    with _COUNTS_LOCK:
        COUNTS[name] += n


def long_mode() -> bool:
    return os.environ.get("PVIOMMU_LONG", "") not in ("", "0")


#: PVIOMMU_LONG=1 multiplies every fuzz test's examples by this
LONG_FACTOR = 20
settings.register_profile(
    "robustness-ci", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile(
    "robustness-long", settings.get_profile("robustness-ci"), max_examples=100 * LONG_FACTOR,
)
#: the hypothesis profile robust_settings(n) starts from (n scaled by LONG_FACTOR in long mode)
PROFILE = "robustness-long" if long_mode() else "robustness-ci"


def robust_settings(examples: int) -> settings:
    """Hypothesis settings of one fuzz test: ``examples`` in CI, ``LONG_FACTOR`` times
    that with PVIOMMU_LONG=1; deadline off (a DMA step is milliseconds, a walk of
    a 2 MiB transfer through the reference walker much more)."""
    base = settings.get_profile(PROFILE)
    return settings(base, max_examples=examples * (LONG_FACTOR if long_mode() else 1), deadline=None,
                    suppress_health_check=list(HealthCheck))


def dump_counts(path: str | os.PathLike[str] | None = None) -> dict[str, int]:
    data = dict(sorted(COUNTS.items()))
    target = path or os.environ.get("PVIOMMU_FUZZ_COUNTS")
    if target:
        Path(target).write_text(json.dumps(data, indent=2) + "\n")
    return data


# ==========================================================================================
# The reference walker (independent of pviommu.iommu.nested)
# ==========================================================================================
# x86-64 paging-structure entry bits (Intel SDM vol. 3 4.5, VT-d 3.6 first stage)
_P, _RW, _US, _A, _D, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
_ADDR = ((1 << 52) - 1) & ~0xFFF
#: the unit's first-stage output width (MGAW 48): bits 51:48 of an address are reserved
_FS_OA_BITS = 48
_RSVD_ADDR = ((1 << 52) - 1) & ~((1 << _FS_OA_BITS) - 1)
#: XD (bit 63) means execute-disable only under NXE, which no context entry here enables: reserved (SDM 4.5)
_XD = 1 << 63
_RSVD_2M = ((1 << 21) - 1) & ~((1 << 13) - 1)
_RSVD_1G = ((1 << 30) - 1) & ~((1 << 13) - 1)
_MSI_FIRST, _MSI_LAST = 0xFEE0_0000, 0xFEEF_FFFF
_S2_WIDTH = 48


@dataclass
class RefPage:
    """What one 4 KiB page of a DMA must do: ``hpa`` (page start) or a fault."""

    hpa: int | None
    why: str
    #: HPAs of u64 entries whose A (and D) bits the unit may set on this walk
    ad_entries: list[int] = field(default_factory=list)
    #: HPAs of the table pages this walk read
    tables: list[int] = field(default_factory=list)


@dataclass
class RefRange:
    """The reference answer for ``translate(iova, length, write)``."""

    runs: list[tuple[int, int]]
    faulted: bool
    ad_entries: list[int]
    tables: list[int]

    @property
    def done(self) -> int:
        return sum(n for _, n in self.runs)


def coalesce(pieces: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for hpa, n in pieces:
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == hpa:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((hpa, n))
    return out


class RefWalker:
    """Nested walk of one partition's domain: x86-64 stage 1 (4 or 5 levels,
    rooted at a GPA) over the hypervisor's stage 2 (``Partition.stage2.lookup``)."""

    def __init__(self, memory: HostMemory, part: Partition, root: int, levels: int = 4) -> None:
        self.memory = memory
        self.part = part
        self.root = root
        self.levels = levels
        self.bank_lo = int(bank_base(part.bank.index))
        self.bank_hi = self.bank_lo + part.memory_bytes

    def s2(self, gpa: int) -> tuple[int, bool, bool] | None:
        """(HPA, readable, writable) of ``gpa`` by the partition's stage 2."""
        if gpa < 0 or gpa >> _S2_WIDTH:
            return None
        tr = self.part.stage2.lookup(Gpa(gpa))
        if tr is None:
            return None
        hpa = int(tr.oa)
        # what the hypervisor built must stay inside the partition's bank
        assert self.bank_lo <= hpa < self.bank_hi, f"stage 2 maps GPA {gpa:#x} to {hpa:#x} outside the bank"
        return hpa, bool(tr.perm & Perm.READ), bool(tr.perm & Perm.WRITE)

    def canonical(self, iova: int) -> bool:
        width = 12 + 9 * self.levels
        top = iova >> (width - 1)
        return top == 0 or top == (1 << (64 - width + 1)) - 1

    def page(self, iova: int, write: bool) -> RefPage:
        out = RefPage(None, "")
        if not self.canonical(iova):
            out.why = "non-canonical"
            return out
        table = self.root
        gpa = -1
        for level in range(self.levels - 1, -1, -1):
            s = self.s2(table)
            if s is None or not s[1]:
                out.why = f"table GPA {table:#x} not readable through stage 2"
                return out
            table_hpa, _, table_w = s
            out.tables.append(table_hpa)
            slot = table_hpa + ((iova >> (12 + 9 * level)) & 511) * 8
            entry = self.memory.read_u64(Hpa(slot))
            if not entry & _P:
                out.why = f"P=0 at level {level}"
                return out
            if not entry & _US:
                out.why = f"supervisor entry at level {level}"
                return out
            if write and not entry & _RW:
                out.why = f"read-only entry at level {level}"
                return out
            leaf = level == 0 or (level <= 2 and bool(entry & _PS))
            reserved = _RSVD_ADDR | _XD
            if not leaf and level >= 3:
                reserved |= _PS
            if leaf and level == 1:
                reserved |= _RSVD_2M
            if leaf and level == 2:
                reserved |= _RSVD_1G
            if entry & reserved:
                out.why = f"reserved bits at level {level}"
                return out
            need = _A | (_D if leaf and write else 0)
            if entry & need != need:
                if not table_w:
                    out.why = f"A/D update denied by stage 2 at level {level}"
                    return out
                out.ad_entries.append(slot)
            if leaf:
                shift = 12 + 9 * level
                gpa = (entry & _ADDR & ~((1 << shift) - 1)) | (iova & ((1 << shift) - 1))
                break
            table = entry & _ADDR
        page_gpa = gpa & ~0xFFF
        if _MSI_FIRST <= page_gpa <= _MSI_LAST:
            out.why = "MSI window"
            return out
        s = self.s2(page_gpa)
        if s is None:
            out.why = f"GPA {page_gpa:#x} not backed"
            return out
        if (write and not s[2]) or (not write and not s[1]):
            out.why = f"stage 2 denies {'write' if write else 'read'} of GPA {page_gpa:#x}"
            return out
        out.hpa = s[0]
        return out

    def translate(self, iova: int, length: int, write: bool) -> RefRange:
        res = RefRange([], False, [], [])
        if length <= 0:
            return res
        if iova < 0 or iova + length > 1 << 64:
            res.faulted = True
            return res
        pos, end = iova, iova + length
        pieces: list[tuple[int, int]] = []
        while pos < end:
            p = self.page(pos & ~0xFFF, write)
            res.ad_entries += p.ad_entries
            res.tables += p.tables
            if p.hpa is None:
                res.faulted = True
                break
            n = min(end, (pos & ~0xFFF) + PAGE) - pos
            pieces.append((p.hpa + (pos & 0xFFF), n))
            pos += n
        res.runs = coalesce(pieces)
        return res


# ==========================================================================================
# In-process invalidation and the recording translator
# ==========================================================================================
class InProcLink:
    """The host's ``UnitLink`` delivered straight to one ``IommuUnit``
    (ownership fences are counted; this rig's device has one owner)."""

    def __init__(self) -> None:
        self.unit: IommuUnit | None = None
        self.calls: collections.Counter[str] = collections.Counter()

    def submit(self, device: Device, items: Sequence[QueueItem]) -> None:
        for item in items:
            self.calls[item.scope.name.lower() if isinstance(item, Invalidation) else type(item).__name__] += 1
            if self.unit is not None and isinstance(item, Invalidation):
                item.apply(self.unit)

    def post(self, device: Device, items: Sequence[QueueItem]) -> None:
        self.submit(device, items)

    def forget(self, device: Device) -> None:
        pass


@dataclass
class Call:
    iova: int
    length: int
    write: bool
    ref: RefRange | None
    out: DmaRuns


class RecordingTranslator:
    """The device's translator: reference walk first (on the same memory, at
    the same moment), then the real unit; both answers are kept."""

    def __init__(self, inner: DmaTranslator) -> None:
        self.inner = inner
        self.ref: RefWalker | None = None
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        ref = self.ref.translate(int(iova), length, write) if self.ref is not None else None
        out = self.inner.translate(iova, length, write)
        with self._lock:
            self.calls.append(Call(int(iova), length, write, ref, out))
        return out

    def take(self) -> list[Call]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


# ==========================================================================================
# The stage-1 / descriptor rig: Host + Hypercalls + IommuUnit + DsaDevice, in process
# ==========================================================================================
# Partition A's GPA map (12 MiB):
A_RAM = 12 * MiB
TABLES = (0, 1 * MiB)          # guest stage-1 table frames
DATA_GPA = 4 * MiB             # RW data buffers (256 KiB)
RO1_GPA = DATA_GPA + 256 * 1024  # mapped read-only by the guest's stage 1 (64 KiB)
COMP_GPA = 5 * MiB             # completion records
LIST_GPA = 5 * MiB + PAGE      # batch descriptor lists (2 pages)
UNMAPPED_GPA = 6 * MiB         # RAM the guest never maps (64 KiB)
HOLE = (8 * MiB, 2 * MiB)      # MMIO hole: stage 2 maps nothing
RO = (10 * MiB, 1 * MiB)       # stage 2 maps it without W
B_RAM = 4 * MiB
BANK0 = 4 * MiB

# IOVAs of the benign stage 1
DATA_IOVA = 0x4000_0000
RO1_IOVA = 0x4010_0000
COMP_IOVA = 0x4020_0000
LIST_IOVA = 0x4030_0000
S2RO_IOVA = 0x4040_0000     # guest maps S2-read-only GPAs writable: stage 2 must win
HOLE_IOVA = 0x4050_0000     # guest maps hole GPAs
HUGE_IOVA = 0x8000_0000     # a 2 MiB leaf over GPA [2M, 4M) (tables' neighbours)
GIANT_IOVA = 0x40_0000_0000  # a 1 GiB leaf over GPA [0, 1G): RAM, hole, RO, and far past RAM
DATA_SIZE = 256 * 1024
DOMAIN = 1
WQ = 0


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class DsaRig:
    """Host with partitions A (owner of the device) and B (bystander); the
    device's DMA goes DsaDevice -> RecordingTranslator -> IommuUnit -> banks."""

    def __init__(self, tmp: Path, *, five_level: bool = False, wq_bof: bool = True, large: bool = True) -> None:
        self.inval = InProcLink()
        self.host = Host(tmp, "robustness-admin-" + os.urandom(6).hex(),
                         HypervisorConfig(five_level=five_level, bank0_bytes=BANK0,
                                          max_iova_width=57 if five_level else 48), self.inval)
        self.calls = Hypercalls(self.host)
        self.A = self.host.create_partition("A", A_RAM, holes=[HOLE], read_only=[RO])
        self.B = self.host.create_partition("B", B_RAM)
        self.B.bank.write(0, _pattern(B_RAM, 2))
        self.dev = self.host.register_device("dsa0", "in-process", 0x8086, 0x0B25, os.urandom(16), 0)
        self.host.assign_device(self.dev.logical_device_id, self.A.partition_id)
        # the device side: its own mapping of the bank files, its own unit
        side = unit_side(tmp)
        self.dev_memory, self.unit = side.memory, side.unit
        self.inval.unit = self.unit
        self.recorder = RecordingTranslator(self.unit.bind(self.dev.slot))
        self.device = dsa_on(self.dev_memory, self.recorder, DsaDeviceConfig(page_request_timeout=0.05),
                             on_page_request=lambda fault: False)
        #: every software error (SWERR) the device raised, in order
        self.swerrs: list[SwError] = []
        self.device.on_error = self.swerrs.append
        self.device.configure_wq(WQ, WqCfg(wq_size=16, dedicated=True, bof=wq_bof, priority=5))
        self.device.configure_group(0, [WQ], [0])
        assert self.device.enable_device() == 0
        assert self.device.enable_wq(WQ) == 0
        # the guest side: its CPU view of its RAM and its stage-1 table
        self.levels = 5 if five_level else 4
        guest = guest_tables(self.A.bank, TABLES, self.levels)
        self.ram, self.frames, self.s1 = guest.ram, guest.frames, guest.s1
        rw, ro = Perm.READ | Perm.WRITE, Perm.READ
        for iova, gpa, size, perm in (
            (DATA_IOVA, DATA_GPA, DATA_SIZE, rw), (RO1_IOVA, RO1_GPA, 64 * 1024, ro),
            (COMP_IOVA, COMP_GPA, PAGE, rw), (LIST_IOVA, LIST_GPA, 2 * PAGE, rw),
            (S2RO_IOVA, RO[0], 64 * 1024, rw), (HOLE_IOVA, HOLE[0], 64 * 1024, rw),
            *(((HUGE_IOVA, 2 * MiB, 2 * MiB, rw), (GIANT_IOVA, 0, 1 << 30, rw)) if large else ()),
        ):
            self.s1.map(Iova(iova), Gpa(gpa), size, perm)
        self.benign_iovas = [DATA_IOVA, RO1_IOVA, COMP_IOVA, LIST_IOVA, S2RO_IOVA, HOLE_IOVA]
        if large:
            self.benign_iovas += [HUGE_IOVA, GIANT_IOVA]
        #: table page GPA -> (level, IOVA prefix that leads to it)
        self.table_pages: dict[int, tuple[int, int]] = {}
        for iova in self.benign_iovas:
            for step in self.s1.walk(Iova(iova)):
                prefix = iova & ~((1 << (12 + 9 * (step.level + 1))) - 1) if step.level < self.levels - 1 else 0
                self.table_pages.setdefault(int(step.table), (step.level, prefix))
        # fill data and S2-RO pages with something recognisable
        self.ram.write(Gpa(DATA_GPA), _pattern(DATA_SIZE + 64 * 1024, 1))
        self.ram.write(Gpa(UNMAPPED_GPA), _pattern(64 * 1024, 3))
        self.ram.write(Gpa(RO[0]), _pattern(RO[1], 4))
        # the guest's domain, through the hypercall handlers
        self.root = int(self.s1.root)
        self.ok(hv.CreateDeviceDomainInput(self.ddom()))
        assert self.configure(self.root, five=five_level) == HvStatus.SUCCESS
        self.ok(hv.AttachDeviceDomainInput(self.ddom(), hv.HvDeviceId.logical(self.dev.logical_device_id)))
        self.recorder.ref = RefWalker(self.dev_memory, self.A, self.root, self.levels)
        self.pristine_a = self.A.bank.read(0, A_RAM)
        self.comp_slot = 0
        self.list_used = 0

    # -- hypercalls -------------------------------------------------------------------------
    def ddom(self, domain_id: int = DOMAIN) -> hv.DeviceDomain:
        return hv.DeviceDomain(SELF, hv.DeviceDomainId(hv.DeviceDomainType.S1, domain_id))

    def hypercall(self, request: hv.HvRequest, caller: Partition | None = None) -> int:
        try:
            self.calls.dispatch(caller or self.A, request)
        except HvError as exc:
            count("stage1_hypercalls")
            return int(exc.hv_status)
        count("stage1_hypercalls")
        return int(HvStatus.SUCCESS)

    def ok(self, request: hv.HvRequest) -> None:
        status = self.hypercall(request)
        assert status == HvStatus.SUCCESS, HvStatus.name_of(status)

    def configure(self, root: int, five: bool = False) -> int:
        settings = hv.DeviceDomainSettings(True, False, int(five), Gpa(root))
        return self.hypercall(hv.ConfigureDeviceDomainInput(self.ddom(), settings))

    def flush(self) -> None:
        self.ok(hv.FlushDeviceDomainInput(self.ddom()))

    def point_at(self, root: int) -> None:
        """Reconfigure the domain's stage-1 root (a live context change)."""
        assert self.configure(root, five=self.levels == 5) == HvStatus.SUCCESS
        assert self.recorder.ref is not None
        self.recorder.ref.root = root

    # -- state ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Pristine guest RAM and root, an empty IOTLB, no leftover records."""
        self.device.drain_wq(WQ)
        if self.recorder.ref is not None and self.recorder.ref.root != self.root:
            self.point_at(self.root)
        now = self.A.bank.read(0, A_RAM)
        for page in changed_pages(self.pristine_a, now):
            self.A.bank.write(page, self.pristine_a[page : page + PAGE])
        self.flush()
        self.recorder.take()
        self.comp_slot = 0
        self.list_used = 0

    def take_list(self, nbytes: int) -> int:
        """Offset of room for a descriptor list of ``nbytes`` in the list pages (64-byte aligned)."""
        start = self.list_used
        if start + nbytes > 2 * PAGE:
            start = 0
        self.list_used = (start + nbytes + 63) & ~63
        return start

    def banks(self) -> tuple[bytes, bytes, bytes]:
        return (self.host.bank0.read(0, BANK0), self.A.bank.read(0, A_RAM), self.B.bank.read(0, B_RAM))

    def next_comp(self) -> int:
        """A fresh, zeroed 32-byte record slot in the benign completion page."""
        slot = self.comp_slot % (PAGE // COMP_SIZE)
        self.comp_slot += 1
        self.ram.write(Gpa(COMP_GPA + slot * COMP_SIZE), bytes(COMP_SIZE))
        return COMP_IOVA + slot * COMP_SIZE

    def record_at(self, iova: int) -> CompletionRecord | None:
        if COMP_IOVA <= iova < COMP_IOVA + PAGE:
            return CompletionRecord.unpack(self.ram.read(Gpa(COMP_GPA + iova - COMP_IOVA), COMP_SIZE))
        return None

    def read_record(self, iova: int) -> CompletionRecord | None:
        """The 32-byte record at ``iova`` if the guest's tables map it writable (reference walk)."""
        ref = self.recorder.ref
        assert ref is not None
        if iova % COMP_SIZE:
            return None
        tr = ref.translate(iova, COMP_SIZE, True)  # a record exists only where the device may write
        if tr.faulted:
            return None
        return CompletionRecord.unpack(b"".join(self.dev_memory.read(Hpa(h), n) for h, n in tr.runs))

    def run(self, desc: Descriptor) -> None:
        """Submit one descriptor and wait until the engine is done with it."""
        assert self.device.submit(WQ, desc)
        assert self.device.drain_wq(WQ) == 0

    def known_good_memmove(self) -> None:
        """After anything: restore, then a plain copy must still work."""
        self.restore()
        comp = self.next_comp()
        src, dst, n = DATA_IOVA, DATA_IOVA + 128 * 1024, 8192
        self.run(Descriptor(opcode=Opcode.MEMMOVE, flags=DescFlags.CRAV | DescFlags.RCR, completion_addr=comp,
                            src_addr=src, dst_addr=dst, xfer_size=n))
        rec = self.record_at(comp)
        assert rec is not None and rec.code == DsaStatus.SUCCESS, rec
        off = DATA_GPA - DATA_IOVA
        assert self.ram.read(Gpa(dst + off), n) == self.ram.read(Gpa(src + off), n)
        self.recorder.take()

    def close(self) -> None:
        self.device.close()
        self.host.close()
        self.dev_memory.close()


# ==========================================================================================
# The invariant checked after every step
# ==========================================================================================
_AD = _A | _D


def changed_pages(before: bytes, after: bytes) -> list[int]:
    out = []
    chunk = 64 * 1024
    for c in range(0, len(before), chunk):
        if before[c : c + chunk] != after[c : c + chunk]:
            for p in range(c, min(c + chunk, len(before)), PAGE):
                if before[p : p + PAGE] != after[p : p + PAGE]:
                    out.append(p)
    return out


def check_isolation(rig: DsaRig, before: tuple[bytes, bytes, bytes], calls: list[Call]) -> dict[str, int]:
    """No byte of B and of bank 0 changed; bytes of A changed only in pages a
    write translation reached (checked against the reference walk and stage 2)
    or in the A/D bits of entries the walks read; the unit answered what the
    reference walker answers. Returns a few numbers for events/counts."""
    b0, ba, bb = before
    n0, na, nb = rig.banks()
    assert nb == bb, "a byte of partition B's RAM changed"
    assert n0 == b0, "a byte of bank 0 (stage-2 tables / context entries) changed"
    a_lo = int(rig.A.bank.base)
    ref = rig.recorder.ref
    assert ref is not None
    allowed: set[int] = set()
    ad: set[int] = set()
    tables: set[int] = set()
    for c in calls:
        # every run the unit gave lies in A's bank, and in RAM stage 2 lets it use
        for run in c.out.runs:
            assert bank_index_of(run.hpa) == rig.A.bank.index, f"run {run} outside partition A"
            lo, hi = int(run.hpa) - a_lo, int(run.hpa) - a_lo + run.length
            assert 0 <= lo < hi <= A_RAM, f"run {run} outside A's RAM"
            for page in range(lo & ~0xFFF, hi, PAGE):
                s = ref.s2(page)
                assert s is not None and (s[2] if c.write else s[1]), (
                    f"unit gave GPA {page:#x} for a {'write' if c.write else 'read'} stage 2 does not allow")
                if c.write:
                    allowed.add(page)
        if c.ref is not None:
            ad.update(e - a_lo for e in c.ref.ad_entries)
            tables.update(t - a_lo for t in c.ref.tables)
            if c.write:
                for hpa, n in c.ref.runs:
                    for page in range((hpa - a_lo) & ~0xFFF, hpa - a_lo + n, PAGE):
                        allowed.add(page)
    changed = changed_pages(ba, na)
    self_modified = any(page in allowed and page in tables for page in changed)
    for page in changed:
        if page in allowed:
            continue
        old = struct.unpack_from("<512Q", ba, page)
        new = struct.unpack_from("<512Q", na, page)
        for i, (o, w) in enumerate(zip(old, new, strict=True)):
            if o != w:
                addr = page + i * 8
                # After the device rewrote a table it walked, the unit may walk a
                # path from its paging-structure caches that the reference no
                # longer takes (no flush came: as stale IOTLB entries) and set A/D
                # there: still only A/D bits, only in table pages walked this step.
                walked = addr in ad or (self_modified and page in tables)
                assert walked and (w & ~o) & ~_AD == 0 and w & o == o, (
                    f"A changed at GPA {addr:#x} ({o:#x} -> {w:#x}): not a writable-mapped page, not an A/D update")
    # differential: the unit answered what the reference answers (unless the
    # device rewrote a table page it walked, when cached translations may differ)
    mismatches = 0
    if not self_modified:
        for c in calls:
            assert c.ref is not None
            got = coalesce((int(r.hpa), r.length) for r in c.out.runs)
            assert got == c.ref.runs and (c.out.fault is not None) == c.ref.faulted, (
                f"unit vs reference for {c.iova:#x}+{c.length:#x} {'W' if c.write else 'R'}: "
                f"unit {got} fault={c.out.fault}, reference {c.ref.runs} faulted={c.ref.faulted}")
            if c.out.fault is not None:
                assert c.out.fault.reason in FaultReason._value2member_map_, c.out.fault
    else:
        mismatches = 1
    return {"self_modified": mismatches, "writes_allowed_pages": len(allowed)}


def check_device_statuses(device: DsaDevice) -> None:
    """Every completion the device produced is a defined DsaStatus, never
    HW_ERR1 (an exception inside an operation)."""
    snap = device.counters.snapshot()
    for name in snap["completions"]:
        assert name in DsaStatus.__members__, f"undefined completion status {name}"
    assert "HW_ERR1" not in snap["completions"], snap["completions"]


# ==========================================================================================
# Descriptors
# ==========================================================================================
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
