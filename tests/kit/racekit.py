"""Kit of the ownership-race suite: several partitions and devices, DMA running
on every device from every partition (honest and hostile) while a seeded
scheduler changes domains and owners underneath.

Real parts, in one process: ``Host`` and ``Hypercalls`` with the real
invalidation queues in bank 0 (``QueueLink``); per device the pieces the
device service assembles -- an ``IommuUnit``, a ``QueueConsumer`` on its slot,
``dma_device.ownership.Ownership`` and a ``DsaDevice`` with engine threads.
Only gRPC is left out: a submitter does what the servicer does (check the
caller's epoch against the owner record, then submit under it), and
sometimes what a racing servicer could do (submit under an epoch it checked
a moment ago).

The oracle sees every host run the unit hands the device, tagged with the
epoch of the descriptor being executed, and knows who owned each (slot,
epoch) -- recorded *before* the hypervisor publishes it. A run is a
violation when it is outside that owner's RAM bank, in bank 0, or (for a
write) on a page the owner never mapped writable in any of its domains.
After every scheduler step the suite also checks that no partition's
never-mapped RAM changed (canaries).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dma_device.dsa.device import DsaDevice, DsaDeviceConfig
from dma_device.ownership import Ownership
from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls
from hypervisor_svc.core.model import Partition
from hypervisor_svc.rpc.device_client import QueueLink
from pviommu.abi import hv
from pviommu.abi.dsa import DescFlags, Descriptor, Opcode, WqCfg
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import Invalidation, OwnerFence, PasidInvalidation, QueueItem
from pviommu.addr import PAGE_SIZE, Gpa, Iova
from pviommu.errors import AuthError, HvError
from pviommu.mem.bank import bank_index_of
from pviommu.mem.dma import DmaMemory, DmaRuns, DmaTranslator
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.common import Perm
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import PageTable
from pviommu.rpc.auth import Principal
from pviommu.units import MiB
from tests.kit import racepasid
from tests.kit.nested import guest_tables, unit_side
from tests.kit.racepasid import PasidBindings

PAGE = PAGE_SIZE
SELF = hv.HV_PARTITION_ID_SELF
RAM = 8 * MiB
TABLES = (0, 1 * MiB)  # the guest's stage-1 table frames (A/D updates land here)
BUFFERS = (1 * MiB, 3 * MiB)  # what domains map
CANARY = (3 * MiB, RAM)  # never mapped: must never change
IOVA_BASE = 0x10_0000_0000
DOMAIN_IDS = (1, 2, 3, 4)
FLAGS = int(DescFlags.CRAV | DescFlags.RCR)

_running = threading.local()


class TaggingDsa(DsaDevice):
    """A DsaDevice that tells the oracle which epoch the running descriptor belongs to."""

    def _run(self, d: Any, wq: Any, dma: Any, seq: int, pasid: int | None, epoch: int,  # type: ignore[override]
             *, in_batch: bool) -> Any:
        prev = getattr(_running, "epoch", None)
        _running.epoch = epoch
        try:
            return super()._run(d, wq, dma, seq, pasid, epoch, in_batch=in_batch)
        finally:
            _running.epoch = prev


@dataclass
class Oracle:
    #: (slot, epoch) -> owning partition id (0: nobody)
    owners: dict[tuple[int, int], int] = field(default_factory=dict)
    #: partition id -> bank index, and GPA pages it ever mapped writable / at all
    banks: dict[int, int] = field(default_factory=dict)
    writable: dict[int, set[int]] = field(default_factory=dict)
    mapped: dict[int, set[int]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    runs_checked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: PASID bindings (racepasid): a PASID's runs must come from a binding of the owner
    pasids: PasidBindings = field(default_factory=PasidBindings)

    def check(self, slot: int, iova: int, runs: DmaRuns, write: bool, pasid: int | None = None,
              since: int = 0) -> None:
        epoch = getattr(_running, "epoch", None)
        with self.lock:
            owner = self.owners.get((slot, epoch)) if epoch is not None else None
            if pasid and runs.fault is not None:
                self.pasids.faults += 1
            if pasid and runs.runs:
                self.pasids.runs_checked += len(runs.runs)
                if not owner or not self.pasids.bound_during(slot, pasid, owner, since):
                    self.violations.append(f"PASID {pasid} not bound by the owner during the translation: slot "
                                           f"{slot} epoch {epoch} (owner {owner}) IOVA {iova:#x} -> "
                                           f"HPA {int(runs.runs[0].hpa):#x}")
            for run in runs.runs:
                self.runs_checked += 1
                index = bank_index_of(run.hpa)
                where = f"slot {slot} epoch {epoch} (owner {owner}) {'write' if write else 'read'} " \
                        f"IOVA {iova:#x} -> HPA {int(run.hpa):#x}+{run.length:#x}"
                if not owner or index != self.banks.get(owner):
                    self.violations.append(f"outside the owner's bank: {where}")
                    continue
                base = int(run.hpa) - ((index + 1) << 40)
                allowed = self.writable[owner] if write else self.mapped[owner]
                for page in range(base & ~0xFFF, base + run.length, PAGE):
                    if page not in allowed:
                        self.violations.append(f"page {page:#x} never mapped {'writable ' if write else ''}: {where}")
                        break


class OracleTranslator:
    """The device's translator (without PASID, or of one PASID): the real unit, every
    answer shown to the oracle."""

    def __init__(self, inner: DmaTranslator, oracle: Oracle, slot: int, pasid: int | None = None) -> None:
        self.inner, self.oracle, self.slot, self.pasid = inner, oracle, slot, pasid

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        since = self.oracle.pasids.seq
        out = self.inner.translate(iova, length, write)
        self.oracle.check(self.slot, int(iova), out, write, self.pasid, since)
        return out


class RacingDevice:
    """One device as the device service assembles it (minus gRPC)."""

    def __init__(self, memory_dir: Path, slot: int, oracle: Oracle, *, pasid: bool = False) -> None:
        self.slot = slot
        self.pasid = pasid
        self.oracle = oracle
        side = unit_side(memory_dir)
        self.memory, self.unit = side.memory, side.unit
        self.device = side.dsa(slot, DsaDeviceConfig(num_engines=2, num_groups=1, page_request_timeout=0.05),
                               device=TaggingDsa, wrap=lambda unit: OracleTranslator(unit, oracle, slot))
        if pasid:  # one view per PASID, as dma_device.main.pasid_memory gives the device
            plain = DmaMemory(self.memory, OracleTranslator(self.unit.bind(slot), oracle, slot))
            views: dict[int, DmaMemory] = {}

            def memory_for(p: int | None) -> DmaMemory:
                if not p:
                    return plain
                view = views.get(p)
                if view is None:
                    view = views.setdefault(p, DmaMemory(
                        self.memory, OracleTranslator(self.unit.bind(slot, p), oracle, slot, p)))
                return view

            self.device.bind(memory_for)
        self.own = Ownership(self.memory, slot, self.device, reset=self._power_on)
        self._power_on()
        from pviommu.shm.invq import QueueConsumer
        self.queue = QueueConsumer(self.memory, slot, self._handle)
        self.fences = 0

    def _power_on(self) -> None:
        self.device.reset_device()
        wqs = [0, racepasid.SHARED_WQ] if self.pasid else [0]
        self.device.configure_group(0, wqs, [0, 1])
        self.device.configure_wq(0, WqCfg(wq_size=32, dedicated=True, priority=5))
        if self.pasid:
            racepasid.add_shared_wq(self.device)
        self.device.enable_device()
        for wq in wqs:
            self.device.enable_wq(wq)

    def _handle(self, item: QueueItem) -> None:
        if isinstance(item, Invalidation):
            item.apply(self.unit)
        elif isinstance(item, PasidInvalidation):
            item.apply(self.unit)
            if item.cache and item.did is None and item.pasid is None:
                with self.oracle.lock:
                    self.oracle.pasids.flushed(self.slot)
        elif isinstance(item, OwnerFence):
            self.own.fence(item.epoch)
            self.fences += 1
        else:
            self.own.answer(item.request_id, item.code)

    def close(self) -> None:
        self.queue.close()
        self.device.close()


@dataclass
class GuestDomain:
    table: PageTable[Iova, Gpa, Gpa]
    #: IOVA -> (GPA, writable)
    maps: dict[int, tuple[int, bool]] = field(default_factory=dict)


class GuestModel:
    """What one partition's driver knows: its domains and their stage-1 tables."""

    def __init__(self, part: Partition, oracle: Oracle, rng: random.Random) -> None:
        self.part = part
        self.oracle = oracle
        self.rng = rng
        self.guest = guest_tables(part.bank, TABLES)
        self.domains: dict[int, GuestDomain] = {}
        self.lock = threading.Lock()

    def rebooted(self, part: Partition) -> None:
        with self.lock:
            self.part = part
            self.guest = guest_tables(part.bank, TABLES)
            self.domains.clear()

    @property
    def frames(self) -> FrameAllocator[Gpa]:
        return self.guest.frames

    def new_table(self) -> GuestDomain:
        dom = GuestDomain(self.guest.new_table())
        for _ in range(self.rng.randrange(4, 24)):
            self.map_one(dom)
        return dom

    def map_one(self, dom: GuestDomain) -> None:
        page = self.rng.randrange((BUFFERS[1] - BUFFERS[0]) // PAGE)
        iova = IOVA_BASE + self.rng.randrange(64) * PAGE
        if iova in dom.maps:
            return
        gpa = BUFFERS[0] + page * PAGE
        writable = self.rng.random() < 0.7
        pid = self.part.partition_id
        with self.oracle.lock:  # known to the oracle before any device can walk it
            self.oracle.mapped[pid].add(gpa)
            if writable:
                self.oracle.writable[pid].add(gpa)
        dom.table.map(Iova(iova), Gpa(gpa), PAGE, Perm.READ | (Perm.WRITE if writable else Perm.NONE))
        dom.maps[iova] = (gpa, writable)

    def unmap_some(self, dom: GuestDomain) -> IotlbGather[Gpa]:
        gather: IotlbGather[Gpa] = IotlbGather()
        for iova in self.rng.sample(sorted(dom.maps), k=min(len(dom.maps), self.rng.randrange(1, 4))):
            dom.table.unmap(Iova(iova), PAGE, gather)
            del dom.maps[iova]
        return gather

    def iovas(self) -> list[int]:
        with self.lock:
            return [i for d in self.domains.values() for i in d.maps]

    def canary(self) -> bytes:
        return hashlib.sha256(self.part.bank.read(CANARY[0], CANARY[1] - CANARY[0])).digest()


class Submitter(threading.Thread):
    """One partition's DMA: descriptors to every device, under sessions it
    opened (authorised by the owner record), kept stale on purpose sometimes."""

    def __init__(self, guest: GuestModel, devices: list[RacingDevice], stop: threading.Event, seed: int,
                 token: Callable[[], str], *, pasid: bool = False) -> None:
        super().__init__(daemon=True, name=f"submitter-{guest.part.partition_id}")
        self.guest, self.devices, self.stop, self.rng, self.token = guest, devices, stop, random.Random(seed), token
        self.pasid = pasid
        #: PASID-tagged descriptors the shared WQ accepted / turned away (full: ENQCMD's retry)
        self.pasid_submitted = self.pasid_retries = 0
        self.sessions: dict[int, Principal] = {}
        #: every session this partition ever had per device (old ones are replayed, as a late write)
        self.history: dict[int, list[Principal]] = {}
        self.submitted = self.refused = self.stale = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        except BaseException as exc:  # reported by the test thread
            self.errors.append(exc)

    def step(self) -> None:
        dev = self.rng.choice(self.devices)
        session = self.sessions.get(dev.slot)
        if session is None or self.rng.random() < 0.1:
            fresh = dev.own.authorize(self.token())
            if fresh is None and not self.history.get(dev.slot):  # never owned it: try again later
                self.stop.wait(0.002)
                return
            if fresh is not None:
                session = self.sessions[dev.slot] = fresh
                self.history.setdefault(dev.slot, []).append(fresh)
            else:
                session = self.rng.choice(self.history[dev.slot])
        iovas = self.guest.iovas() or [IOVA_BASE]
        pick: Callable[[], int] = lambda: (self.rng.choice(iovas) if self.rng.random() < 0.8  # noqa: E731
                                           else IOVA_BASE + self.rng.randrange(64) * PAGE)
        # any PASID of the pool: bound by this partition, by the device's last owner, or by nobody
        pasid = self.rng.choice(racepasid.POOL) if self.pasid and self.rng.random() < racepasid.SHARE else 0
        desc = Descriptor(opcode=Opcode.MEMMOVE, flags=FLAGS, pasid=pasid, completion_addr=pick() + 0x800,
                          src_addr=pick(), dst_addr=pick(), xfer_size=self.rng.choice([8, 256, PAGE])).pack()
        wq = racepasid.SHARED_WQ if pasid else 0
        if self.rng.random() < 0.25:  # a write that checked its session long ago arrives now
            late = self.rng.choice(self.history.get(dev.slot) or [session])
            accepted = dev.device.submit(wq, desc, epoch=late.epoch)
            self.stale += 1
        else:
            try:
                epoch = dev.own.check(session)
            except AuthError:
                self.refused += 1
                self.sessions.pop(dev.slot, None)
                return
            accepted = dev.device.submit(wq, desc, epoch=epoch)
        if pasid:
            if accepted:
                self.pasid_submitted += 1
            else:
                self.pasid_retries += 1
        self.submitted += 1
        if self.submitted % 16 == 0:
            self.stop.wait(0.001)


class Race:
    """The whole rig; ``step()`` runs one scheduler operation."""

    def __init__(self, tmp: Path, seed: int, partitions: int = 3, devices: int = 2, *,
                 pasid: bool | None = None) -> None:
        self.rng = random.Random(seed)
        self.oracle = Oracle()
        self.pasid = racepasid.enabled() if pasid is None else pasid
        config = HypervisorConfig(bank0_bytes=8 * MiB, flush_timeout_s=0.15, domain_tags=6,
                                  proposal_sva=self.pasid)
        self.host = Host(tmp, "race-admin-" + os.urandom(6).hex(), config)
        self.host.units.link = QueueLink(self.host.memory, config.flush_timeout_s)
        publish = self.host.units.publish

        def recorded(dev: Any, owner: Partition | None, *, quarantined: bool = False) -> None:
            with self.oracle.lock:  # before the record exists: a descriptor of that epoch is judged right
                self.oracle.owners[(dev.slot, dev.epoch + 1)] = owner.partition_id if owner and not quarantined else 0
            publish(dev, owner, quarantined=quarantined)

        self.host.units.publish = recorded  # type: ignore[method-assign]
        self.calls = Hypercalls(self.host)
        self.parts: list[Partition] = []
        self.guests: list[GuestModel] = []
        for i in range(partitions):
            part = self.host.create_partition(f"p{i}", RAM)
            part.bank.write(CANARY[0], random.Random(seed + i).randbytes(CANARY[1] - CANARY[0]))
            self.oracle.banks[part.partition_id] = part.bank.index
            self.oracle.writable[part.partition_id] = set()
            self.oracle.mapped[part.partition_id] = set()
            self.parts.append(part)
            self.guests.append(GuestModel(part, self.oracle, random.Random(seed * 31 + i)))
        self.devices: list[RacingDevice] = []
        for i in range(devices):
            d = self.host.register_device(f"dsa{i}", "in-process", 0x8086, 0x0B25, os.urandom(16), 0)
            self.devices.append(RacingDevice(tmp, d.slot, self.oracle, pasid=self.pasid))
            self.host.assign_device(d.logical_device_id, self.parts[i % partitions].partition_id)
        self.canaries = [g.canary() for g in self.guests]
        self.stop = threading.Event()
        self.submitters = [Submitter(g, self.devices, self.stop, seed * 7 + i,
                                     lambda i=i: self.parts[i].token, pasid=self.pasid)
                           for i, g in enumerate(self.guests)]
        self.counts: dict[str, int] = {}
        self.timers: list[threading.Timer] = []

    # -- scheduler ------------------------------------------------------------------------
    def device_domain(self, domain_id: int) -> hv.DeviceDomain:
        return hv.DeviceDomain(SELF, hv.DeviceDomainId(hv.DeviceDomainType.S1, domain_id))

    def call(self, part: Partition, request: hv.HvRequest) -> int:
        try:
            self.calls.dispatch(part, request)
        except HvError as exc:
            return int(exc.hv_status)
        return int(HvStatus.SUCCESS)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def step(self) -> str:
        op = self._step()
        if self.pasid:  # bindings the host dropped (detach, refused attach, move, reset) end for the oracle
            with self.oracle.lock:
                self.oracle.pasids.sync(self.host)
        return op

    def _step(self) -> str:
        i = self.rng.randrange(len(self.parts))
        part, guest = self.parts[i], self.guests[i]
        devs = [self.host.devices[d] for d in sorted(part.devices) if d in self.host.devices]
        ops, weights = ["create", "attach", "detach", "remap", "reconfigure", "delete", "move", "reset",
                        "stall"], [4, 4, 2, 4, 2, 2, 3, 1, 1]
        if self.pasid:
            ops, weights = [*ops, "pasid"], [*weights, racepasid.WEIGHT]
        op = self.rng.choices(ops, weights=weights)[0]
        if op == "pasid":
            name = racepasid.step(self, part, guest, devs)
            if name != "noop":
                self._count("pasid_refused" if "refused" in name else name)
            return name
        if op == "create":
            free = [d for d in DOMAIN_IDS if d not in guest.domains]
            if free:
                dom_id = self.rng.choice(free)
                with guest.lock:
                    gd = guest.new_table()
                    guest.domains[dom_id] = gd
                if self.call(part, hv.CreateDeviceDomainInput(self.device_domain(dom_id))) == HvStatus.SUCCESS:
                    settings = hv.DeviceDomainSettings(True, False, 0, Gpa(int(gd.table.root)))
                    self.call(part, hv.ConfigureDeviceDomainInput(self.device_domain(dom_id), settings))
                else:
                    with guest.lock:
                        del guest.domains[dom_id]
        elif op == "attach" and devs and guest.domains:
            dom_id = self.rng.choice(sorted(guest.domains))
            dev = self.rng.choice(devs)
            self.call(part, hv.AttachDeviceDomainInput(self.device_domain(dom_id),
                                                       hv.HvDeviceId.logical(dev.logical_device_id)))
        elif op == "detach" and devs:
            dev = self.rng.choice(devs)
            self.call(part, hv.DetachDeviceDomainInput(SELF, hv.HvDeviceId.logical(dev.logical_device_id)))
        elif op == "remap" and guest.domains:
            dom_id = self.rng.choice(sorted(guest.domains))
            with guest.lock:
                gd = guest.domains[dom_id]
                gather = guest.unmap_some(gd) if gd.maps else IotlbGather()
                guest.map_one(gd)
            if self.rng.random() < 0.85:  # sometimes the guest "forgets" the flush: its own hazard only
                self.call(part, hv.FlushDeviceDomainInput(self.device_domain(dom_id)))
            for frame in gather.freelist:
                guest.frames.free_table(frame)
        elif op == "reconfigure" and guest.domains:
            dom_id = self.rng.choice(sorted(guest.domains))
            blocked = self.rng.random() < 0.3
            settings = hv.DeviceDomainSettings(True, blocked, 0, Gpa(int(guest.domains[dom_id].table.root)))
            self.call(part, hv.ConfigureDeviceDomainInput(self.device_domain(dom_id), settings))
        elif op == "delete" and guest.domains:
            dom_id = self.rng.choice(sorted(guest.domains))
            if self.call(part, hv.DeleteDeviceDomainInput(self.device_domain(dom_id))) == HvStatus.SUCCESS:
                with guest.lock:
                    gd = guest.domains.pop(dom_id)
                    gd.table.destroy()
        elif op == "move":
            dev = self.host.devices[self.rng.choice(sorted(self.host.devices))]
            target = self.rng.choice(self.parts)
            try:
                self.host.unassign_device(dev.logical_device_id)
                self.host.assign_device(dev.logical_device_id, target.partition_id)
            except HvError as exc:
                return f"move refused {HvStatus.name_of(exc.hv_status)}"
        elif op == "stall":  # a unit that stops consuming its queue for a while; its engines go on
            stalled = self.rng.choice(self.devices)
            stalled.queue.paused.set()
            timer = threading.Timer(self.rng.uniform(0.1, 0.6), stalled.queue.paused.clear)
            timer.daemon = True
            timer.start()
            self.timers.append(timer)
        elif op == "reset":
            try:
                self.host.reset_partition(part.partition_id)
            except HvError as exc:
                return f"reset refused {HvStatus.name_of(exc.hv_status)}"
            guest.rebooted(part)
            self.canaries[i] = guest.canary()  # the reset zeroed the RAM
        else:
            return "noop"
        self._count(op)
        return op

    def check(self, step: int, op: str) -> None:
        for i, g in enumerate(self.guests):
            assert g.canary() == self.canaries[i], f"step {step} ({op}): never-mapped RAM of {g.part.name} changed"
        with self.oracle.lock:
            assert not self.oracle.violations, f"step {step} ({op}): " + "; ".join(self.oracle.violations[:5])
        for s in self.submitters:
            assert not s.errors, f"submitter failed: {s.errors[0]!r}"

    def close(self) -> None:
        self.stop.set()
        for t in self.timers:
            t.cancel()
        for d in self.devices:
            d.queue.paused.clear()
        for s in self.submitters:
            if s.ident is not None:  # started
                s.join(10)
        for d in self.devices:
            d.close()
        link = self.host.units.link
        self.host.close()
        if isinstance(link, QueueLink):
            link.close()
