"""The host's one channel to the devices' IOMMU units: their queues (tell, announce) and owner records.

A component given the link, the tables, bank 0 and the counters, never the host's maps or locks:
waiting for a unit cannot hold the host lock (docs/ownership.md, "Slow and dead units")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from hypervisor_svc.core import stage2
from hypervisor_svc.core.counters import Counters
from hypervisor_svc.core.model import Device, Partition, Sync
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.invq import Invalidation, OwnerFence, QueueItem
from pviommu.errors import HvError, UnitGone, UnitStalled
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.owner import FLAG_QUARANTINED, OwnerRecord, write_owner
from pviommu.log import get_logger
from pviommu.mem.bank import HostMemory
from pviommu.rpc.auth import token_digest

log = get_logger("hypervisor")


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


class Units:
    """Tells units (waiting for their confirmation), announces epochs to them
    (no wait), publishes owner records and marks a device LOST or UNSYNCED
    from what its unit did. Callers hold the device's partition lock."""

    def __init__(self, link: UnitLink, tables: stage2.HostTables, memory: HostMemory,
                 counters: Counters) -> None:
        #: replaced by the service once the units' queues exist (``QueueLink``)
        self.link = link
        self.tables = tables
        self.memory = memory
        self.counters = counters

    def publish(self, dev: Device, owner: Partition | None, *, quarantined: bool = False) -> None:
        """A new ownership epoch for ``dev``'s slot, effective at once in every
        unit and device service (they read the record from bank 0)."""
        dev.epoch += 1
        if owner is None:
            record = OwnerRecord(dev.epoch, flags=FLAG_QUARANTINED if quarantined else 0)
        else:
            record = OwnerRecord(dev.epoch, owner.partition_id, owner.bank.index,
                                 FLAG_QUARANTINED if quarantined else 0, token_digest(owner.token))
        write_owner(self.memory, dev.slot, record)

    @staticmethod
    def fence_items(dev: Device) -> list[QueueItem]:
        return [Invalidation.context(dev.slot), Invalidation.everything(), OwnerFence(dev.epoch)]

    @staticmethod
    def synced(dev: Device, part: Partition | None) -> None:
        """The unit confirmed a global invalidation: it holds only what it
        walks from now on, i.e. at most the current domain's tag."""
        dev.sync = Sync.SYNCED
        dom = part.domains.get(dev.domain_id) if part is not None and dev.domain_id else None
        dev.tags = {dom.tag} if dom is not None else set()

    def announce(self, dev: Device) -> None:
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
            self.lose(dev, str(exc))
            return False
        except UnitStalled as exc:
            if dev.sync is not Sync.UNSYNCED:
                self.counters.count("devices_unsynced")
            dev.sync = Sync.UNSYNCED
            log.warning("device.unsynced", device=dev.logical_device_id, name=dev.name, error=str(exc))
            raise HvError(HvStatus.TIME_OUT, f"device {dev.name or hex(dev.logical_device_id)}: {exc}") from exc
        self.counters.count("unit_messages")
        return True

    def tell_all(self, units: Sequence[Device], items: Sequence[QueueItem]) -> None:
        """``items`` to every unit in ``units``, each confirmed (a gone unit is
        skipped: it holds nothing); TIME_OUT when a live one did not confirm."""
        for dev in units:
            self.tell(dev, items)

    def lose(self, dev: Device, why: str) -> None:
        """No process serves ``dev``'s unit: block and quarantine its slot."""
        dev.sync = Sync.LOST
        dev.tags.clear()
        self.tables.write_context(dev.slot, ContextEntry.blocked())
        self.publish(dev, None, quarantined=True)
        self.counters.count("devices_lost")
        log.warning("device.lost", device=dev.logical_device_id, name=dev.name, error=why)
