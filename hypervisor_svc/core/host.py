"""The host: memory banks, partitions, devices and who owns them.

``Host`` owns every piece of hypervisor state and is the only writer of
stage-2 tables, context entries and owner records (bank 0). It is plain
Python: gRPC servicers call it, and a ``UnitLink`` (the invalidation queue of
``pviommu.shm.invq``) carries invalidations, ownership fences and page
responses to the devices' IOMMU units and waits for their confirmation.

Locking (docs/ownership.md):

* ``Partition.lock`` serialises one partition's hypercalls and the admin
  changes concerning it; unit waits happen under it, so a stalled unit stalls
  only the partitions it belongs to;
* ``admin_lock`` serialises admin changes (ownership moves, resyncs,
  registrations) and their trace lines;
* ``lock`` guards the maps, pools and counters and is never held across a
  unit wait. Order: ``admin_lock`` -> partition locks (by id) -> ``lock``.

Ownership (``pviommu.iommu.owner``): a device changes owner only after its
unit confirmed an ownership fence (global invalidation, then every session
and in-flight descriptor of the old epoch ended). A fence that is not
confirmed rolls the move back and answers TIME_OUT, and the device stays
UNSYNCED until a resync is confirmed: no context of a new owner is ever
written for a device the hypervisor could not synchronise.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from hypervisor_svc.core import stage2
from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.faults import FaultLog
from hypervisor_svc.core.model import Device, Domain, Partition, Sync
from hypervisor_svc.core.sva import SvaState
from hypervisor_svc.core.trace import TraceWriter
from pviommu.abi.hv import build_logical_device_id
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import Invalidation, OwnerFence, PageResponse, PageResponseCode, QueueItem
from pviommu.addr import SZ_2M, Gpa, Iova
from pviommu.errors import HvError, UnitGone, UnitStalled
from pviommu.iommu.context import MAX_SLOTS, ContextEntry, context_hpa
from pviommu.iommu.owner import FLAG_QUARANTINED, OwnerRecord, read_owner, write_owner
from pviommu.log import get_logger
from pviommu.mem.bank import BANK_WINDOW_LG2, HYPERVISOR_BANK, HostMemory
from pviommu.mem.placement import check_capacity
from pviommu.rpc.auth import Principal, new_token, token_digest, tokens_equal
from pviommu.shm.invq import reset_queue

log = get_logger("hypervisor")

MAX_TAG = 0xFFFF


class UnitLink(Protocol):
    """Carries queue items to one device's IOMMU unit. ``submit`` returns once
    the unit confirmed them; it raises ``UnitStalled`` when the unit is alive
    but did not confirm in time, ``UnitGone`` when no process serves it."""

    def submit(self, device: Device, items: Sequence[QueueItem]) -> None: ...

    def post(self, device: Device, items: Sequence[QueueItem]) -> None: ...

    def forget(self, device: Device) -> None: ...


class NullLink:
    """For a host with no remote units (unit tests of the core): records."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, QueueItem]] = []

    def submit(self, device: Device, items: Sequence[QueueItem]) -> None:
        self.calls.extend((device.slot, i) for i in items)

    def post(self, device: Device, items: Sequence[QueueItem]) -> None:
        self.submit(device, items)

    def forget(self, device: Device) -> None:
        pass


class Host:
    def __init__(self, memory_dir: Path, admin_token: str, config: HypervisorConfig | None = None,
                 link: UnitLink | None = None) -> None:
        if not admin_token:
            raise ValueError("an admin token is required (PVIOMMU_ADMIN_TOKEN or --admin-token-file)")
        self.config = config or HypervisorConfig()
        self.memory = HostMemory(Path(memory_dir))
        self.admin_token = admin_token
        self.link: UnitLink = link or NullLink()
        self.lock = threading.RLock()
        self.admin_lock = threading.RLock()
        for p in Path(memory_dir).glob("bank-*.mem"):  # a previous hypervisor's banks: its guests are gone
            p.unlink()
        self.bank0 = self.memory.create_bank(HYPERVISOR_BANK, self.config.bank0_bytes)
        self.tables = stage2.HostTables(self.memory, self.bank0)
        #: the SVA proposal's PASID tables (None: the series' interface only)
        self.sva: SvaState | None = SvaState(self) if self.config.proposal_sva else None
        self.partitions: dict[int, Partition] = {}
        self.devices: dict[int, Device] = {}
        self._next_partition = 1
        #: FIFO pools: a freed tag or slot is reused as late as possible
        self._free_tags: deque[int] = deque(range(1, min(self.config.domain_tags, MAX_TAG) + 1))
        self._free_slots: deque[int] = deque(range(MAX_SLOTS))
        self.stats: dict[str, int] = {}
        self.hypercalls: dict[tuple[str, str], int] = {}
        self.faults_by_reason: dict[str, int] = {}
        self._counters_lock = threading.Lock()
        #: True when the service created the bank folder (and removes it on exit).
        self.owns_memory_dir = False
        #: the Prometheus registry of the service (main registers its collectors; empty in tests)
        self.metrics_registry = CollectorRegistry()
        #: ``--trace FILE``: hypercalls, admin changes and faults as JSON lines (None: off).
        self.trace: TraceWriter | None = None
        #: why the banks are not where they were asked to be (set by main; "" when they are)
        self.bank_note = ""
        #: called with a partition once it was reset or destroyed: its data-plane sessions end
        self.on_partition_end: list[Callable[[Partition], None]] = []
        #: called first by ``close`` (the data-plane session servers stop)
        self.on_close: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ identity
    def resolve(self, token: str) -> Principal | None:
        if tokens_equal(token, self.admin_token):
            return Principal("admin")
        with self.lock:
            for p in self.partitions.values():
                if tokens_equal(token, p.token):
                    return Principal("partition", p.partition_id, p.name)
            for d in self.devices.values():
                if tokens_equal(token, d.token):
                    return Principal("device", d.logical_device_id, d.name)
        return None

    def count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def count_call(self, call: str, status: int) -> None:
        key = (call, HvStatus.name_of(status))
        with self._counters_lock:
            self.hypercalls[key] = self.hypercalls.get(key, 0) + 1

    def count_fault(self, reason_name: str) -> None:
        with self._counters_lock:
            self.faults_by_reason[reason_name] = self.faults_by_reason.get(reason_name, 0) + 1

    def metrics(self) -> dict[str, object]:
        """What the Prometheus endpoint exports (see pviommu.rpc.metrics)."""
        with self.lock, self._counters_lock:
            return {
                **self.stats,
                "hypercalls": dict(self.hypercalls),
                "faults_by_reason": dict(self.faults_by_reason),
                "partitions": len(self.partitions),
                "devices": len(self.devices),
                "devices_unsynced": sum(d.sync is Sync.UNSYNCED for d in self.devices.values()),
                "domains": sum(len(p.domains) for p in self.partitions.values()),
                "stage2_table_frames": self.tables.allocated_frames(),
            }

    # ------------------------------------------------------------------ partitions
    def create_partition(self, name: str, memory_bytes: int, holes: Iterable[tuple[int, int]] = (),
                         read_only: Iterable[tuple[int, int]] = ()) -> Partition:
        if memory_bytes <= 0 or memory_bytes % SZ_2M or memory_bytes >= 1 << BANK_WINDOW_LG2:
            raise HvError(HvStatus.INVALID_PARAMETER,
                          f"memory size {memory_bytes:#x} must be a positive multiple of 2 MiB below "
                          f"{1 << BANK_WINDOW_LG2:#x} (one bank window)")
        holes, read_only = list(holes), list(read_only)
        for gpa, size in [*holes, *read_only]:
            if gpa % 4096 or size % 4096 or size <= 0 or gpa + size > memory_bytes:
                raise HvError(HvStatus.INVALID_PARAMETER, f"GPA range {gpa:#x}+{size:#x} is not page aligned in RAM")
        with self.lock:
            if (room := check_capacity(self.memory.directory, memory_bytes,  # refuse what a tmpfs cannot back
                                       [(p.bank.path, p.memory_bytes) for p in self.partitions.values()])):
                log.warning("partition.overcommit", detail=room)
            pid = self._next_partition
            self._next_partition += 1
            bank = self.memory.create_bank(pid, memory_bytes)
            frames = self.tables.partition_frames(self.config.table_quota_frames, f"partition {pid}")
            try:
                table = self.tables.build_partition_stage2(bank, memory_bytes, holes, read_only, frames)
            except Exception:
                self.memory.destroy_bank(pid)
                raise
            part = Partition(pid, name or f"partition{pid}", new_token(), bank, memory_bytes, table,
                             holes, read_only, faults=FaultLog(self.config.fault_log_size), frames=frames)
            self.partitions[pid] = part
        self.count("partitions_created")
        log.info("partition.created", partition=pid, name=part.name, memory=memory_bytes,
                 bank=str(bank.path), stage2_pages=self.tables.table_pages(table))
        return part

    def partition(self, pid: int) -> Partition:
        part = self.partitions.get(pid)
        if part is None:
            raise HvError(HvStatus.INVALID_PARTITION_ID, f"no partition {pid}")
        return part

    def partition_by_name(self, name: str) -> Partition | None:
        with self.lock:
            return next((p for p in self.partitions.values() if p.name == name), None)

    def devices_of(self, part: Partition) -> list[Device]:
        return [self.devices[d] for d in sorted(part.devices) if d in self.devices]

    def destroy_partition(self, pid: int) -> None:
        """Take its devices back (fenced), free its domains, tables and RAM.
        TIME_OUT (and nothing changed) when a device's unit cannot be fenced."""
        with self.admin_lock:
            part = self.partition(pid)
            with part.lock:
                self._move(self.devices_of(part), None)
                for dom in list(part.domains.values()):
                    self._free_domain(part, dom)
                self.tables.free_table(part.stage2)
                if part.faults is not None:
                    part.faults.close()
                with self.lock:
                    del self.partitions[pid]
                self.memory.destroy_bank(pid)
            # Its devices were fenced while the bank file still existed, and devices it never held
            # may still map it (a previous owner's): a fence for the current epoch, posted to every
            # unit, makes each process unmap the banks whose files are gone (Ownership.fence).
            for dev in list(self.devices.values()):
                self._announce(dev)
        self.count("partitions_destroyed")
        log.info("partition.destroyed", partition=pid)
        self._ended(part)

    def reset_partition(self, pid: int) -> Partition:
        """A reboot of the guest: every session of its old credential ends (its
        devices are fenced under a new epoch), everything it set up is
        reclaimed, its RAM is zeroed and it gets a new token. Assignments stay.
        TIME_OUT (and nothing changed) when a device's unit cannot be fenced."""
        with self.admin_lock:
            part = self.partition(pid)
            with part.lock:
                old_token = part.token
                part.token = new_token()
                devs = self.devices_of(part)
                try:
                    self._move(devs, part)
                except HvError:
                    part.token = old_token
                    for d in devs:  # the rolled-back records named the new token
                        self._publish(d, part)
                    raise
                for dom in list(part.domains.values()):
                    self._free_domain(part, dom)
                part.bank.discard()
                if part.faults is not None:
                    part.faults.close()
                part.faults = FaultLog(self.config.fault_log_size)
        self.count("partitions_reset")
        log.info("partition.reset", partition=pid)
        self._ended(part)
        return part

    def _ended(self, part: Partition) -> None:
        for listener in self.on_partition_end:
            try:
                listener(part)
            except Exception:
                log.exception("partition.end_listener_failed", partition=part.partition_id)

    # ------------------------------------------------------------------ devices
    def register_device(self, name: str, control_address: str, vendor: int, device_id: int,
                        instance_guid: bytes, function: int) -> Device:
        with self.admin_lock:
            for dev in list(self.devices.values()):  # a restarted device re-registers under its name
                if dev.name == name and name:
                    self._forget_device(dev)
                    break
            with self.lock:
                if not self._free_slots:
                    raise HvError(HvStatus.NO_RESOURCES, f"all {MAX_SLOTS} device slots are in use")
                slot = self._free_slots.popleft()
                guid = instance_guid if len(instance_guid) == 16 else os.urandom(16)
                logical = build_logical_device_id(guid, function & 7)
                while logical in self.devices or logical == 0:
                    guid = os.urandom(16)
                    logical = build_logical_device_id(guid, function & 7)
                # epochs stay monotonic per slot across the devices that use it
                epoch = read_owner(self.memory, slot).epoch + 1
                dev = Device(logical, name, control_address, slot, new_token(), vendor or 0x8086,
                             device_id or 0x0B25, epoch=epoch)
                reset_queue(self.memory, slot)  # a new unit starts with an empty invalidation queue
                self.tables.write_context(slot, ContextEntry.blocked())
                write_owner(self.memory, slot, OwnerRecord(epoch))
                if self.sva is not None:
                    self.sva.add_device(dev)
                self.devices[logical] = dev
        self.count("devices_registered")
        log.info("device.registered", device=logical, name=name, slot=slot, address=control_address)
        return dev

    def device(self, logical: int) -> Device:
        dev = self.devices.get(logical)
        if dev is None:
            raise HvError(HvStatus.INVALID_DEVICE_ID, f"no device {logical:#x}")
        return dev

    def unregister_device(self, logical: int) -> None:
        with self.admin_lock:
            self._forget_device(self.device(logical))

    def _forget_device(self, dev: Device) -> None:
        """Stop knowing ``dev``: its slot is blocked and quarantined at once
        (whatever its unit does, the slot serves nobody), its unit is told
        without waiting, and the slot goes to the back of the pool."""
        part = self.partitions.get(dev.partition_id) if dev.partition_id else None
        with self._partition_locks([part]):
            if part is not None:
                dom = part.domains.get(dev.domain_id)
                if dom is not None:
                    dom.devices.discard(dev.logical_device_id)
                part.devices.discard(dev.logical_device_id)
            self.tables.write_context(dev.slot, ContextEntry.blocked())
            self._publish(dev, None, quarantined=True)
            if self.sva is not None:
                self.sva.remove_device(dev, part)
            if dev.sync is not Sync.LOST:
                try:
                    self.link.post(dev, self._fence_items(dev))
                except (UnitGone, UnitStalled) as exc:
                    log.info("device.forget_unannounced", device=dev.logical_device_id, error=str(exc))
            self.link.forget(dev)
            with self.lock:
                del self.devices[dev.logical_device_id]
                self._free_slots.append(dev.slot)
        log.info("device.forgotten", device=dev.logical_device_id, name=dev.name)

    def assign_device(self, logical: int, pid: int) -> None:
        with self.admin_lock:
            dev = self.device(logical)
            part = self.partition(pid)
            if dev.partition_id == pid:
                return
            if dev.partition_id:
                raise HvError(HvStatus.INVALID_DEVICE_STATE,
                              f"device {logical:#x} is assigned to partition {dev.partition_id}; unassign it first")
            self._move([dev], part)
        log.info("device.assigned", device=logical, partition=pid, epoch=dev.epoch)

    def unassign_device(self, logical: int) -> None:
        with self.admin_lock:
            dev = self.device(logical)
            if not dev.partition_id:
                return
            self._move([dev], None)
        log.info("device.unassigned", device=logical, epoch=dev.epoch)

    def resync_device(self, logical: int) -> Device:
        """Bring an UNSYNCED device back: global invalidation plus a fence of
        its current epoch, confirmed. TIME_OUT if still not confirmed;
        INVALID_DEVICE_STATE for a lost one (it must re-register)."""
        with self.admin_lock:
            dev = self.device(logical)
            if dev.sync is Sync.LOST:
                raise HvError(HvStatus.INVALID_DEVICE_STATE, f"device {logical:#x} is lost: it must re-register")
            part = self.partitions.get(dev.partition_id) if dev.partition_id else None
            with self._partition_locks([part]):
                if dev.sync is Sync.UNSYNCED:
                    if not self.tell(dev, self._fence_items(dev)):
                        raise HvError(HvStatus.INVALID_DEVICE_STATE, f"device {logical:#x} is gone")
                    self._synced(dev, part)
                    self.count("devices_resynced")
                    log.info("device.resynced", device=logical, epoch=dev.epoch)
        return dev

    def heartbeat(self, logical: int) -> None:
        """A device says it is alive: an UNSYNCED one is resynchronised now."""
        dev = self.device(logical)
        if dev.sync is Sync.UNSYNCED:
            try:
                self.resync_device(logical)
            except HvError as exc:
                log.info("device.resync_failed", device=logical, error=str(exc))

    # ------------------------------------------------------------------ ownership
    @contextmanager
    def _partition_locks(self, parts: Iterable[Partition | None]) -> Iterator[None]:
        with ExitStack() as stack:
            for p in sorted({p.partition_id: p for p in parts if p is not None}.values(),
                            key=lambda p: p.partition_id):
                stack.enter_context(p.lock)
            yield

    def _publish(self, dev: Device, owner: Partition | None, *, quarantined: bool = False) -> None:
        """A new ownership epoch for ``dev``'s slot, effective at once in every
        unit and device service (they read the record from bank 0)."""
        dev.epoch += 1
        if owner is None:
            record = OwnerRecord(dev.epoch, flags=FLAG_QUARANTINED if quarantined else 0)
        else:
            record = OwnerRecord(dev.epoch, owner.partition_id, owner.bank.index,
                                 FLAG_QUARANTINED if quarantined else 0, token_digest(owner.token))
        write_owner(self.memory, dev.slot, record)

    def _fence_items(self, dev: Device) -> list[QueueItem]:
        return [Invalidation.context(dev.slot), Invalidation.everything(), OwnerFence(dev.epoch)]

    def _synced(self, dev: Device, part: Partition | None) -> None:
        """The unit confirmed a global invalidation: it holds only what it
        walks from now on, i.e. at most the current domain's tag."""
        dev.sync = Sync.SYNCED
        dom = part.domains.get(dev.domain_id) if part is not None and dev.domain_id else None
        dev.tags = {dom.tag} if dom is not None else set()

    def _move(self, devs: Sequence[Device], owner: Partition | None) -> None:
        """Give ``devs`` to ``owner`` (None: nobody), detached, under a new
        epoch, all or nothing: every unit must confirm its fence before
        anything is committed; otherwise everything is put back and the call
        answers TIME_OUT (the stalled units stay UNSYNCED)."""
        if not devs:
            return
        olds = [self.partitions.get(d.partition_id) if d.partition_id else None for d in devs]
        with self._partition_locks([*olds, owner]):
            saved = [(d, self.tables.read_context_raw(d.slot)) for d in devs]
            for d in devs:
                self.tables.write_context(d.slot, ContextEntry.blocked())
                self._publish(d, owner)
            stalled: list[str] = []
            for d in devs:
                try:
                    self.tell(d, self._fence_items(d))  # False: gone (now LOST), which holds nothing
                except HvError as exc:
                    stalled.append(f"{d.name or hex(d.logical_device_id)}: {exc}")
            if stalled:
                for (d, raw), old in zip(saved, olds, strict=True):
                    self._publish(d, old)
                    self.tables.write_context_raw(d.slot, raw)
                    self._announce(d)
                self.count("moves_timed_out")
                raise HvError(HvStatus.TIME_OUT, "ownership change not confirmed, nothing changed: "
                                                 + "; ".join(stalled))
            for d, old in zip(devs, olds, strict=True):
                if old is not None:
                    dom = old.domains.get(d.domain_id)
                    if dom is not None:
                        dom.devices.discard(d.logical_device_id)
                    old.devices.discard(d.logical_device_id)
                d.partition_id = owner.partition_id if owner is not None else 0
                d.domain_id = 0
                d.page_requests.clear()
                if self.sva is not None:
                    self.sva.reset_device(d, old)
                if owner is not None:
                    owner.devices.add(d.logical_device_id)
                if d.sync is not Sync.LOST:
                    self._synced(d, owner)
                self.count("ownership_changes")

    # ------------------------------------------------------------------ units
    def _announce(self, dev: Device) -> None:
        """Best effort, no wait: let the unit end sessions of other epochs as
        soon as it runs (it refuses them per call anyway)."""
        if dev.sync is Sync.LOST:
            return
        try:
            self.link.post(dev, [OwnerFence(dev.epoch)])
        except (UnitGone, UnitStalled) as exc:
            log.info("device.fence_unannounced", device=dev.logical_device_id, error=str(exc))

    def tell(self, dev: Device, items: Sequence[QueueItem]) -> bool:
        """Deliver ``items`` to ``dev``'s unit and wait for its confirmation.
        True: confirmed. False: no process serves the unit (it holds nothing;
        the device is now LOST, its slot blocked). A live unit that did not
        confirm in time becomes UNSYNCED and the call raises HvError(TIME_OUT)."""
        if dev.sync is Sync.LOST:
            return False
        try:
            self.link.submit(dev, items)
        except UnitGone as exc:
            self._lose(dev, str(exc))
            return False
        except UnitStalled as exc:
            if dev.sync is not Sync.UNSYNCED:
                self.count("devices_unsynced")
            dev.sync = Sync.UNSYNCED
            log.warning("device.unsynced", device=dev.logical_device_id, name=dev.name, error=str(exc))
            raise HvError(HvStatus.TIME_OUT, f"device {dev.name or hex(dev.logical_device_id)}: {exc}") from exc
        self.count("unit_messages")
        return True

    def _lose(self, dev: Device, why: str) -> None:
        dev.sync = Sync.LOST
        dev.tags.clear()
        self.tables.write_context(dev.slot, ContextEntry.blocked())
        self._publish(dev, None, quarantined=True)
        self.count("devices_lost")
        log.warning("device.lost", device=dev.logical_device_id, name=dev.name, error=why)

    def device_lost(self, dev: Device, why: str = "reported lost") -> None:
        with self.admin_lock:
            part = self.partitions.get(dev.partition_id) if dev.partition_id else None
            with self._partition_locks([part]):
                if dev.logical_device_id in self.devices and dev.sync is not Sync.LOST:
                    self._lose(dev, why)

    def tell_units(self, units: Sequence[Device], items: Sequence[QueueItem]) -> None:
        """``items`` to every unit in ``units``, each confirmed (a gone unit is
        skipped: it holds nothing); TIME_OUT when a live one did not confirm."""
        for dev in units:
            self.tell(dev, items)

    def units_holding(self, part: Partition, tag: int) -> list[Device]:
        """The partition's devices whose units may cache entries of ``tag``
        (after an ownership fence a device holds none of its old owner's)."""
        return [d for d in self.devices_of(part) if tag in d.tags]

    # ------------------------------------------------------------------ domains (caller holds part.lock)
    def alloc_tag(self) -> int:
        with self.lock:
            if not self._free_tags:
                raise HvError(HvStatus.INSUFFICIENT_DEVICE_DOMAINS, "the host ran out of domain tags")
            return self._free_tags.popleft()

    def free_tag(self, tag: int) -> None:
        """Back of the FIFO: a tag is reused only after every other free one."""
        with self.lock:
            self._free_tags.append(tag)

    def context_for(self, part: Partition | None, dom: Domain | None) -> ContextEntry:
        """The context entry a device in ``dom`` gets (blocked when none)."""
        if part is None or dom is None or not dom.configured or dom.blocked:
            return ContextEntry.blocked()
        s2_root = self.tables.root_of(part.stage2)
        if dom.table is not None:  # baseline: IOVA -> HPA in the domain's own table
            return ContextEntry.s2_only(dom.tag, self.tables.root_of(dom.table), stage2.S2_LEVELS)
        if not dom.translation_enabled:
            return ContextEntry.identity(dom.tag, s2_root, stage2.S2_LEVELS)
        fs_levels = 5 if dom.five_level else 4
        return ContextEntry.nested(dom.tag, Gpa(dom.root), fs_levels, s2_root, stage2.S2_LEVELS)

    def set_device_domain(self, part: Partition, dev: Device, dom: Domain | None) -> None:
        """Point ``dev`` at ``dom`` (None = blocked) in one step: the new context
        is written over the old one (no window where DMA uses neither) and the
        unit confirms it dropped the old context and the old domain's
        translations before the records change. TIME_OUT: the old context is
        back and nothing changed."""
        old = part.domains.get(dev.domain_id) if dev.domain_id else None
        if dev.sync is not Sync.LOST:  # a lost device's slot stays blocked and quarantined: bookkeeping only
            saved = self.tables.read_context_raw(dev.slot)
            self.tables.write_context(dev.slot, self.context_for(part, dom))
            items: list[QueueItem] = [Invalidation.context(dev.slot)]
            if old is not None:
                items.append(Invalidation.domain(old.tag))
            try:
                self.tell(dev, items)
            except HvError:
                self.tables.write_context_raw(dev.slot, saved)
                raise
        if old is not None:
            old.devices.discard(dev.logical_device_id)
            if old is not dom:
                dev.tags.discard(old.tag)
        dev.domain_id = dom.domain_id if dom is not None else 0
        if dom is not None:
            dom.devices.add(dev.logical_device_id)
            dev.tags.add(dom.tag)

    def reconfigure_domain(self, part: Partition, dom: Domain, apply: Callable[[Domain], object]) -> None:
        """Change ``dom``'s settings with ``apply(dom)`` and give its devices the
        new context, every unit holding its tag confirming; TIME_OUT: the old
        settings and contexts are back."""
        saved_fields = {k: getattr(dom, k) for k in ("configured", "translation_enabled", "blocked",
                                                    "five_level", "root")}
        attached = [d for d in self.devices_of(part) if d.logical_device_id in dom.devices]
        saved_ctx = [(d, self.tables.read_context_raw(d.slot)) for d in attached]
        apply(dom)
        for d in attached:
            if d.sync is not Sync.LOST:
                self.tables.write_context(d.slot, self.context_for(part, dom))
        units = {d.logical_device_id: d for d in [*attached, *self.units_holding(part, dom.tag)]}
        try:
            for logical, d in sorted(units.items()):
                items: list[QueueItem] = [Invalidation.domain(dom.tag)]
                if logical in dom.devices:
                    items.insert(0, Invalidation.context(d.slot))
                self.tell(d, items)
        except HvError:
            for k, v in saved_fields.items():
                setattr(dom, k, v)
            for d, raw in saved_ctx:
                self.tables.write_context_raw(d.slot, raw)
            raise

    def delete_domain(self, part: Partition, dom: Domain) -> None:
        """Flush ``dom``'s tag everywhere it may be cached, then free it (its
        devices must be detached). TIME_OUT: the domain stays."""
        self.tell_units(self.units_holding(part, dom.tag), [Invalidation.domain(dom.tag)])
        self._free_domain(part, dom)

    def _free_domain(self, part: Partition, dom: Domain) -> None:
        """Free a domain no unit can cache any more (its tag was flushed, or
        every unit that held it was fenced)."""
        for d in self.devices_of(part):
            d.tags.discard(dom.tag)
        if dom.table is not None:
            self.tables.free_table(dom.table)
        del part.domains[dom.domain_id]
        self.free_tag(dom.tag)

    def flush_domain(self, part: Partition, dom: Domain) -> None:
        """Domain-wide flush on every unit that may cache ``dom``'s tag."""
        self.tell_units(self.units_holding(part, dom.tag), [Invalidation.domain(dom.tag)])
        self.count("flushes_domain")

    def flush_pages(self, part: Partition, dom: Domain, blocks: Sequence[tuple[Iova, int]]) -> None:
        """Page-selective flushes of ``(address, mask)`` blocks: one batch and
        one wait per unit."""
        items: list[QueueItem] = [Invalidation.pages(dom.tag, a, m) for a, m in blocks]
        self.tell_units(self.units_holding(part, dom.tag), items)
        self.count("flushes_pages")

    # ------------------------------------------------------------------ faults and page requests
    def fault_owner(self, dev: Device, epoch: int, page_request: bool = False,
                    request_id: int = 0) -> Partition | None:
        """The partition a unit's fault report belongs to: the device's owner
        if the fault's descriptor ran in the current epoch, else nobody (a
        previous owner's fault never reaches the next one). A page request is
        remembered so that only that owner, once, may answer it."""
        with self.lock:
            part = self.partitions.get(dev.partition_id) if dev.partition_id else None
            if part is None or epoch != dev.epoch:
                self.count("faults_stale_epoch" if part is not None else "faults_unowned")
                return None
            if page_request:
                if len(dev.page_requests) >= self.config.max_page_requests_per_device:
                    self.count("page_requests_over_quota")
                    return None
                dev.page_requests[request_id] = (part.partition_id, epoch)
            return part

    def answer_page_request(self, caller: Partition, logical: int, request_id: int, success: bool) -> None:
        """The guest's page response, to the unit's queue (no wait: the engine
        that asked is blocked on it). Refused for another partition's device
        (ACCESS_DENIED) and for a request that is not pending for the caller in
        the current epoch -- unknown, answered already, or from before an
        ownership change (PAGE_REQUEST_INVALID)."""
        with caller.lock:
            dev = self.devices.get(logical)
            if dev is None or dev.partition_id != caller.partition_id:
                raise HvError(HvStatus.ACCESS_DENIED, f"device {logical:#x} is not the caller's")
            pending = dev.page_requests.get(request_id)
            if self.sva is not None and (logical, request_id) in self.sva.request_pasids:
                raise HvError(HvStatus.PAGE_REQUEST_INVALID, f"page request {request_id} carries a PASID: answer it "
                                                             "with ProcessIommuPrq (0x00C3)")
            if pending is None or pending != (caller.partition_id, dev.epoch):
                raise HvError(HvStatus.PAGE_REQUEST_INVALID,
                              f"no page request {request_id} of device {logical:#x} is pending for this partition")
            del dev.page_requests[request_id]
            code = PageResponseCode.SUCCESS if success else PageResponseCode.INVALID
            try:
                self.link.post(dev, [PageResponse(dev.slot, request_id, code)])
            except (UnitGone, UnitStalled) as exc:
                raise HvError(HvStatus.PAGE_REQUEST_INVALID, f"device {logical:#x}: {exc}") from exc

    # ------------------------------------------------------------------ shutdown, inspection
    def close(self) -> None:
        for stop in self.on_close:
            stop()
        self.on_close.clear()
        with self.admin_lock:
            for part in list(self.partitions.values()):
                try:
                    self.destroy_partition(part.partition_id)
                except Exception as exc:
                    log.warning("partition.destroy_failed", partition=part.partition_id, error=str(exc))
            self.memory.destroy_bank(HYPERVISOR_BANK)
            self.memory.close()

    def snapshot(self) -> dict[str, object]:
        """A comparable picture of the state (tests check refusals change nothing)."""
        with self.lock:
            return {
                "partitions": {
                    p.partition_id: {
                        "devices": sorted(p.devices),
                        "domains": {
                            d.domain_id: (d.domain_type, d.tag, d.configured, d.translation_enabled, d.blocked,
                                          d.five_level, int(d.root), sorted(d.devices), d.mapped_pages)
                            for d in p.domains.values()
                        },
                    }
                    for p in self.partitions.values()
                },
                "devices": {d.logical_device_id: (d.partition_id, d.domain_id) for d in self.devices.values()},
                "table_frames": self.tables.allocated_frames(),
                "contexts": {d.slot: self.tables.read_context_raw(d.slot) for d in self.devices.values()},
            }


__all__ = ["Host", "NullLink", "UnitLink", "context_hpa"]
