"""The stage-1 / descriptor rig of the isolation fuzz suites (tests/robustness, fuzz/).

Everything here is the real product: a ``Host`` (banks, stage 2 in bank 0, context
entries), ``Hypercalls`` for the guest's side, a real ``IommuUnit`` over its own mapping
of the bank files, and a real ``DsaDevice`` whose every DMA goes through that unit. The
only test-owned pieces are ``InProcLink`` (the hypervisor's invalidations delivered to the
unit by a direct call instead of gRPC, same entry points the device service uses) and
``RecordingTranslator`` (between the device and its unit: asks the reference walker of
``tests.kit.refwalk`` first, then the unit, and keeps both answers for ``check_isolation``).
"""

from __future__ import annotations

import collections
import os
import random
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dma_device.dsa import DsaDevice, DsaDeviceConfig
from dma_device.dsa.device import SwError
from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls
from hypervisor_svc.core.model import Device, Partition
from pviommu.abi import hv
from pviommu.abi.dsa import COMP_SIZE, CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode, WqCfg
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import Invalidation, QueueItem
from pviommu.addr import Gpa, Hpa, Iova
from pviommu.errors import HvError
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import bank_index_of
from pviommu.mem.dma import DmaRuns, DmaTranslator
from pviommu.pt.common import Perm
from pviommu.units import MiB
from tests.kit.nested import dsa_on, guest_tables, unit_side
from tests.kit.refwalk import AD, PAGE, RefRange, RefWalker, coalesce
from tests.kit.robustkit import count

SELF = hv.HV_PARTITION_ID_SELF


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
                assert walked and (w & ~o) & ~AD == 0 and w & o == o, (
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

