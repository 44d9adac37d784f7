"""The host: memory banks, partitions, devices and device domains.

``Host`` owns every piece of hypervisor state and is the only writer of
stage-2 tables and context entries. It is plain Python: gRPC servicers call
it, and an ``Invalidator`` (implemented over gRPC by ``rpc/device_client``)
carries IOTLB invalidations to the IOMMU units of the devices, synchronously.

Locking: one re-entrant lock guards all state. Hypercalls are short (table
and context updates in shared memory); the invalidation round trip to the
devices happens inside the lock so that no two hypercalls interleave a
half-done attach or flush (the guest sees each hypercall as atomic).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from hypervisor_svc.core import stage2
from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.faults import FaultLog
from hypervisor_svc.core.model import Device, Domain, Partition
from hypervisor_svc.core.trace import TraceWriter
from pviommu.abi.hv import build_logical_device_id
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import SZ_2M, Gpa
from pviommu.errors import HvError, PviommuError
from pviommu.iommu.context import CONTEXT_ENTRY_SIZE, ContextEntry, context_hpa
from pviommu.iommu.invq import reset_queue
from pviommu.log import get_logger
from pviommu.mem.bank import BANK_WINDOW_LG2, HYPERVISOR_BANK, HostMemory
from pviommu.mem.placement import check_capacity
from pviommu.rpc.auth import Principal, new_token, tokens_equal

log = get_logger("hypervisor")

MAX_SLOTS = 256
MAX_TAG = 0xFFFF


class Invalidator(Protocol):
    """Carries invalidations to one device's IOMMU unit; returns when the
    unit has dropped the entries, raises ``DeviceUnavailable`` otherwise."""

    def invalidate(self, device: Device, scope: str, tag: int = 0, address: int = 0, mask: int = 0) -> None: ...

    def assign(self, device: Device, partition_id: int, token: str | None) -> None: ...


class NullInvalidator:
    """For a host with no remote units (unit tests of the core)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, int, int, int]] = []

    def invalidate(self, device: Device, scope: str, tag: int = 0, address: int = 0, mask: int = 0) -> None:
        self.calls.append((device.slot, scope, tag, address, mask))

    def assign(self, device: Device, partition_id: int, token: str | None) -> None:
        self.calls.append((device.slot, "assign", partition_id, 0, 0))


class Host:
    def __init__(self, memory_dir: Path, admin_token: str, config: HypervisorConfig | None = None,
                 invalidator: Invalidator | None = None) -> None:
        if not admin_token:
            raise ValueError("an admin token is required (PVIOMMU_ADMIN_TOKEN or --admin-token-file)")
        self.config = config or HypervisorConfig()
        self.memory = HostMemory(Path(memory_dir))
        self.admin_token = admin_token
        self.invalidator: Invalidator = invalidator or NullInvalidator()
        self.lock = threading.RLock()
        for p in Path(memory_dir).glob("bank-*.mem"):  # a previous hypervisor's banks: its guests are gone
            p.unlink()
        self.bank0 = self.memory.create_bank(HYPERVISOR_BANK, self.config.bank0_bytes)
        self.tables = stage2.HostTables(self.memory, self.bank0, context_bytes=MAX_SLOTS * CONTEXT_ENTRY_SIZE)
        self.partitions: dict[int, Partition] = {}
        self.devices: dict[int, Device] = {}
        self._next_partition = 1
        self._free_tags = list(range(MAX_TAG, 0, -1))
        self.stats: dict[str, int] = {}
        self.hypercalls: dict[tuple[str, str], int] = {}
        self.faults_by_reason: dict[str, int] = {}
        #: True when the service created the bank folder (and removes it on exit).
        self.owns_memory_dir = False
        #: The Prometheus registry of the service (set by main; None in unit tests).
        self.metrics_registry: Any = None
        #: ``--trace FILE``: hypercalls, admin changes and faults as JSON lines (None: off).
        self.trace: TraceWriter | None = None

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
        self.stats[name] = self.stats.get(name, 0) + n

    def count_call(self, call: str, status: int) -> None:
        key = (call, HvStatus.name_of(status))
        self.hypercalls[key] = self.hypercalls.get(key, 0) + 1

    def count_fault(self, reason_name: str) -> None:
        self.faults_by_reason[reason_name] = self.faults_by_reason.get(reason_name, 0) + 1

    def metrics(self) -> dict[str, object]:
        """What the Prometheus endpoint exports (see pviommu.rpc.metrics)."""
        with self.lock:
            return {
                **self.stats,
                "hypercalls": dict(self.hypercalls),
                "faults_by_reason": dict(self.faults_by_reason),
                "partitions": len(self.partitions),
                "devices": len(self.devices),
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
            try:
                table = self.tables.build_partition_stage2(bank, memory_bytes, holes, read_only)
            except Exception:
                self.memory.destroy_bank(pid)
                raise
            part = Partition(pid, name or f"partition{pid}", new_token(), bank, memory_bytes, table,
                             holes, read_only, faults=FaultLog(self.config.fault_log_size))
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

    def destroy_partition(self, pid: int) -> None:
        with self.lock:
            part = self.partition(pid)
            for dev_id in sorted(part.devices):
                dev = self.devices[dev_id]
                self._set_device_domain(dev, None)
                dev.partition_id = 0
                self._tell_assignment(dev, 0, None)
            for dom in list(part.domains.values()):
                self._drop_domain(part, dom)
            self.tables.free_table(part.stage2)
            part.devices.clear()
            if part.faults is not None:
                part.faults.close()
            del self.partitions[pid]
            self.memory.destroy_bank(pid)
            self.count("partitions_destroyed")
            log.info("partition.destroyed", partition=pid)

    def reset_partition(self, pid: int) -> Partition:
        """A reboot of the guest: everything it set up is reclaimed, its RAM
        is zeroed and its old credential stops working. Assignments stay."""
        with self.lock:
            part = self.partition(pid)
            for dev_id in sorted(part.devices):
                self._set_device_domain(self.devices[dev_id], None)
            for dom in list(part.domains.values()):
                self._drop_domain(part, dom)
            part.bank.discard()
            part.token = new_token()
            if part.faults is not None:
                part.faults.close()
            part.faults = FaultLog(self.config.fault_log_size)
            for dev_id in sorted(part.devices):
                self._tell_assignment(self.devices[dev_id], pid, part.token)
            self.count("partitions_reset")
            log.info("partition.reset", partition=pid)
            return part

    def partition_by_name(self, name: str) -> Partition | None:
        with self.lock:
            return next((p for p in self.partitions.values() if p.name == name), None)

    # ------------------------------------------------------------------ devices
    def register_device(self, name: str, control_address: str, vendor: int, device_id: int,
                        instance_guid: bytes, function: int) -> Device:
        with self.lock:
            for dev in self.devices.values():  # a restarted device re-registers under its name
                if dev.name == name and name:
                    self._forget_device(dev)
                    break
            used = {d.slot for d in self.devices.values()}
            slot = next((s for s in range(MAX_SLOTS) if s not in used), None)
            if slot is None:
                raise HvError(HvStatus.NO_RESOURCES, f"all {MAX_SLOTS} device slots are in use")
            guid = instance_guid if len(instance_guid) == 16 else os.urandom(16)
            logical = build_logical_device_id(guid, function & 7)
            while logical in self.devices or logical == 0:
                guid = os.urandom(16)
                logical = build_logical_device_id(guid, function & 7)
            dev = Device(logical, name, control_address, slot, new_token(), vendor or 0x8086, device_id or 0x0B25)
            reset_queue(self.memory, slot)  # a new unit starts with an empty invalidation queue
            self.devices[logical] = dev
            self._write_context(dev, None)
            self.count("devices_registered")
            log.info("device.registered", device=logical, name=name, slot=slot, address=control_address)
            return dev

    def device(self, logical: int) -> Device:
        dev = self.devices.get(logical)
        if dev is None:
            raise HvError(HvStatus.INVALID_DEVICE_ID, f"no device {logical:#x}")
        return dev

    def unregister_device(self, logical: int) -> None:
        with self.lock:
            self._forget_device(self.device(logical))

    def _forget_device(self, dev: Device) -> None:
        if dev.partition_id:
            part = self.partitions.get(dev.partition_id)
            if part is not None:
                dom = part.domains.get(dev.domain_id)
                if dom is not None:
                    dom.devices.discard(dev.logical_device_id)
                part.devices.discard(dev.logical_device_id)
        self.tables.write_context(dev.slot, ContextEntry.blocked())
        # A live unit still caches the old context and the domain's translations: make it drop
        # them, or the forgotten device keeps DMA access (best effort: a gone unit caches nothing).
        for scope, tag in [("context", 0), *(("domain", t) for t in sorted(dev.tags))]:
            try:
                self._invalidate(dev, scope, tag)
            except PviommuError as exc:
                log.warning("device.forget_unacknowledged", device=dev.logical_device_id, error=str(exc))
                break
        del self.devices[dev.logical_device_id]
        log.info("device.forgotten", device=dev.logical_device_id, name=dev.name)

    def device_lost(self, dev: Device) -> None:
        """A unit that cannot be reached any more caches nothing: block its
        context and keep going (it must re-register to come back)."""
        with self.lock:
            if dev.logical_device_id in self.devices and dev.reachable:
                dev.reachable = False
                self.tables.write_context(dev.slot, ContextEntry.blocked())
                self.count("devices_lost")
                log.warning("device.lost", device=dev.logical_device_id, name=dev.name)

    def assign_device(self, logical: int, pid: int) -> None:
        with self.lock:
            dev = self.device(logical)
            part = self.partition(pid)
            if dev.partition_id == pid:
                return
            if dev.partition_id:
                raise HvError(HvStatus.INVALID_DEVICE_STATE,
                              f"device {logical:#x} is assigned to partition {dev.partition_id}; unassign it first")
            dev.partition_id = pid
            part.devices.add(logical)
            self._write_context(dev, None)
            self._tell_assignment(dev, pid, part.token)
            log.info("device.assigned", device=logical, partition=pid)

    def unassign_device(self, logical: int) -> None:
        with self.lock:
            dev = self.device(logical)
            if not dev.partition_id:
                return
            part = self.partitions.get(dev.partition_id)
            self._set_device_domain(dev, None)
            if part is not None:
                part.devices.discard(logical)
            dev.partition_id = 0
            self._tell_assignment(dev, 0, None)

    def _tell_assignment(self, dev: Device, pid: int, token: str | None) -> None:
        if not dev.reachable:
            return
        try:
            self.invalidator.assign(dev, pid, token)
        except Exception as exc:  # the device is gone; its context is blocked anyway
            log.warning("device.assign_failed", device=dev.logical_device_id, error=str(exc))
            self.device_lost(dev)

    # ------------------------------------------------------------------ domains
    def alloc_tag(self) -> int:
        if not self._free_tags:
            raise HvError(HvStatus.INSUFFICIENT_DEVICE_DOMAINS, "the host ran out of domain tags")
        return self._free_tags.pop()

    def _drop_domain(self, part: Partition, dom: Domain) -> None:
        for logical in sorted(dom.devices):
            self._set_device_domain(self.devices[logical], None)
        self.flush_tag(dom.tag)
        if dom.table is not None:
            self.tables.free_table(dom.table)
        del part.domains[dom.domain_id]
        self._free_tags.append(dom.tag)

    def context_for(self, part: Partition | None, dom: Domain | None) -> ContextEntry:
        """The context entry a device in ``dom`` gets (blocked when none)."""
        if part is None or dom is None or not dom.configured or dom.blocked:
            return ContextEntry.blocked()
        s2_root = self.tables.root_of(part.stage2)
        bank = part.bank.index
        if dom.table is not None:  # baseline: IOVA -> HPA in the domain's own table
            return ContextEntry.s2_only(dom.tag, self.tables.root_of(dom.table), stage2.S2_LEVELS, bank)
        if not dom.translation_enabled:
            return ContextEntry.identity(dom.tag, s2_root, stage2.S2_LEVELS, bank)
        fs_levels = 5 if dom.five_level else 4
        return ContextEntry.nested(dom.tag, Gpa(dom.root), fs_levels, s2_root, stage2.S2_LEVELS, bank)

    def _write_context(self, dev: Device, dom: Domain | None) -> None:
        part = self.partitions.get(dev.partition_id) if dev.partition_id else None
        self.tables.write_context(dev.slot, self.context_for(part, dom))

    def _set_device_domain(self, dev: Device, dom: Domain | None) -> None:
        """Point ``dev`` at ``dom`` (None = blocked), then make its unit forget
        the old context and the old domain's translations."""
        part = self.partitions.get(dev.partition_id) if dev.partition_id else None
        old = part.domains.get(dev.domain_id) if part is not None and dev.domain_id else None
        if old is not None:
            old.devices.discard(dev.logical_device_id)
        dev.domain_id = dom.domain_id if dom is not None else 0
        if dom is not None:
            dom.devices.add(dev.logical_device_id)
            dev.tags.add(dom.tag)
        self._write_context(dev, dom)
        self._invalidate(dev, "context")
        if old is not None:
            self._invalidate(dev, "domain", old.tag)
            if old is not dom:
                dev.tags.discard(old.tag)

    def refresh_domain_contexts(self, part: Partition, dom: Domain) -> None:
        for logical in sorted(dom.devices):
            dev = self.devices[logical]
            self._write_context(dev, dom)
            self._invalidate(dev, "context")
        self.flush_tag(dom.tag)

    # ------------------------------------------------------------------ invalidation
    def _invalidate(self, dev: Device, scope: str, tag: int = 0, address: int = 0, mask: int = 0) -> None:
        if not dev.reachable:
            return
        from pviommu.errors import DeviceUnavailable

        try:
            self.invalidator.invalidate(dev, scope, tag, address, mask)
            self.count(f"invalidations_{scope}")
        except DeviceUnavailable:
            raise
        except Exception as exc:
            log.warning("device.invalidate_failed", device=dev.logical_device_id, error=str(exc))
            self.device_lost(dev)

    def flush_tag(self, tag: int) -> None:
        """Domain-wide flush on every unit that may cache ``tag``."""
        for dev in list(self.devices.values()):
            if tag in dev.tags:
                self._invalidate(dev, "domain", tag)
        self.count("flushes_domain")

    def flush_pages(self, tag: int, address: int, mask: int) -> None:
        for dev in list(self.devices.values()):
            if tag in dev.tags:
                self._invalidate(dev, "pages", tag, address, mask)
        self.count("flushes_pages")

    def close(self) -> None:
        with self.lock:
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


__all__ = ["Host", "Invalidator", "NullInvalidator", "context_hpa"]
