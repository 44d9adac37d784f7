"""The host: memory banks, partitions, devices and who owns them.

``Host`` owns every piece of hypervisor state and is the only writer of
stage-2 tables, context entries and owner records (bank 0). It is plain
Python: gRPC servicers call it, and its ``Units`` (units.py), over a
``UnitLink`` (the invalidation queue of ``pviommu.shm.invq``), carry
invalidations, ownership fences and page responses to the devices' IOMMU
units and wait for their confirmation.

Where the pieces live: the state and locks in state.py (``HostState``), the
counters in counters.py, the units in units.py, devices and ownership moves in
ownership.py, domains in domains.py; here identity, partitions, faults and page
requests, shutdown and inspection.

Locking (docs/ownership.md):

* ``Partition.lock`` serialises one partition's hypercalls and the admin
  changes concerning it; unit waits happen under it, so a stalled unit stalls
  only the partitions it belongs to;
* ``admin_lock`` serialises admin changes (ownership moves, resyncs,
  registrations) and their trace lines;
* ``lock`` guards the maps and pools and is never held across a unit wait
  (the counters have their own). Order: ``admin_lock`` -> partition locks
  (by id) -> ``lock``.

Ownership (``pviommu.iommu.owner``): a device changes owner only after its
unit confirmed an ownership fence (global invalidation, then every session
and in-flight descriptor of the old epoch ended). A fence that is not
confirmed rolls the move back and answers TIME_OUT, and the device stays
UNSYNCED until a resync is confirmed: no context of a new owner is ever
written for a device the hypervisor could not synchronise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.domains import DomainOps
from hypervisor_svc.core.faults import FaultLog
from hypervisor_svc.core.model import Device, Partition, Sync
from hypervisor_svc.core.ownership import DeviceOwnership
from hypervisor_svc.core.sva import SvaState
from hypervisor_svc.core.units import UnitLink
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import PageResponse, PageResponseCode
from pviommu.addr import SZ_2M
from pviommu.errors import HvError, UnitGone, UnitStalled
from pviommu.log import get_logger
from pviommu.mem.bank import BANK_WINDOW_LG2, HYPERVISOR_BANK
from pviommu.mem.placement import check_capacity
from pviommu.rpc.auth import Principal, new_token, tokens_equal

log = get_logger("hypervisor")


class Host(DeviceOwnership, DomainOps):
    """The hypervisor's state (``HostState``) with every operation on it."""

    def __init__(self, memory_dir: Path, admin_token: str, config: HypervisorConfig | None = None,
                 link: UnitLink | None = None) -> None:
        super().__init__(memory_dir, admin_token, config, link)
        self.sva = SvaState(self) if self.config.proposal_sva else None

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

    def metrics(self) -> dict[str, object]:
        """What the Prometheus endpoint exports (see pviommu.rpc.metrics)."""
        with self.lock:
            return {
                **self.counters.snapshot(),
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
        self.counters.count("partitions_created")
        log.info("partition.created", partition=pid, name=part.name, memory=memory_bytes,
                 bank=str(bank.path), stage2_pages=self.tables.table_pages(table))
        return part

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
                self.units.announce(dev)
        self.counters.count("partitions_destroyed")
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
                        self.units.publish(d, part)
                    raise
                for dom in list(part.domains.values()):
                    self._free_domain(part, dom)
                part.bank.discard()
                if part.faults is not None:
                    part.faults.close()
                part.faults = FaultLog(self.config.fault_log_size)
        self.counters.count("partitions_reset")
        log.info("partition.reset", partition=pid)
        self._ended(part)
        return part

    def _ended(self, part: Partition) -> None:
        for listener in self.on_partition_end:
            try:
                listener(part)
            except Exception:
                log.exception("partition.end_listener_failed", partition=part.partition_id)

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
                self.counters.count("faults_stale_epoch" if part is not None else "faults_unowned")
                return None
            if page_request:
                if len(dev.page_requests) >= self.config.max_page_requests_per_device:
                    self.counters.count("page_requests_over_quota")
                    return None
                dev.page_requests[request_id] = (part.partition_id, epoch)
            return part

    def page_request_timed_out(self, dev: Device, request_id: int, epoch: int) -> bool:
        """The device gave up waiting for ``request_id`` (reported under ``epoch``): it is pending no
        more, so a late answer is refused. False when it was not pending (answered meanwhile)."""
        with self.lock:
            pending = dev.page_requests.get(request_id)
            if pending is None or pending[1] != epoch:
                return False
            del dev.page_requests[request_id]
            if self.sva is not None:
                self.sva.request_pasids.pop((dev.logical_device_id, request_id), None)
            self.counters.count("page_requests_timed_out")
            return True

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
                self.units.link.post(dev, [PageResponse(dev.slot, request_id, code)])
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


__all__ = ["Host"]
