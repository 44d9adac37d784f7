"""Devices and who owns them: registration, assignment, resync and the all-or-nothing ownership move.

A ``Host`` mixin, not a component: these read and write the host's partition and device maps, slot pool
and both host locks (docs/ownership.md's order); a component would hold back-references to nearly all of it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

from hypervisor_svc.core.model import Device, Partition, Sync
from hypervisor_svc.core.state import HostState
from pviommu.abi.hv import build_logical_device_id
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError, UnitGone, UnitStalled
from pviommu.iommu.context import MAX_SLOTS, ContextEntry
from pviommu.iommu.owner import OwnerRecord, read_owner, write_owner
from pviommu.log import get_logger
from pviommu.rpc.auth import new_token
from pviommu.shm.invq import reset_queue

log = get_logger("hypervisor")


class DeviceOwnership(HostState):
    """Host operations on devices (admin calls, heartbeats, partition ends)."""

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
        self.counters.count("devices_registered")
        log.info("device.registered", device=logical, name=name, slot=slot, address=control_address)
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
            self.units.publish(dev, None, quarantined=True)
            if self.sva is not None:
                self.sva.remove_device(dev, part)
            if dev.sync is not Sync.LOST:
                try:
                    self.units.link.post(dev, self.units.fence_items(dev))
                except (UnitGone, UnitStalled) as exc:
                    log.info("device.forget_unannounced", device=dev.logical_device_id, error=str(exc))
            self.units.link.forget(dev)
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
                    if not self.units.tell(dev, self.units.fence_items(dev)):
                        raise HvError(HvStatus.INVALID_DEVICE_STATE, f"device {logical:#x} is gone")
                    self.units.synced(dev, part)
                    self.counters.count("devices_resynced")
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

    # ------------------------------------------------------------------ the ownership move
    @contextmanager
    def _partition_locks(self, parts: Iterable[Partition | None]) -> Iterator[None]:
        with ExitStack() as stack:
            for p in sorted({p.partition_id: p for p in parts if p is not None}.values(),
                            key=lambda p: p.partition_id):
                stack.enter_context(p.lock)
            yield

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
                self.units.publish(d, owner)
            stalled: list[str] = []
            for d in devs:
                try:
                    self.units.tell(d, self.units.fence_items(d))  # False: gone (now LOST), which holds nothing
                except HvError as exc:
                    stalled.append(f"{d.name or hex(d.logical_device_id)}: {exc}")
            if stalled:
                for (d, raw), old in zip(saved, olds, strict=True):
                    self.units.publish(d, old)
                    self.tables.write_context_raw(d.slot, raw)
                    self.units.announce(d)
                self.counters.count("moves_timed_out")
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
                    self.units.synced(d, owner)
                self.counters.count("ownership_changes")
