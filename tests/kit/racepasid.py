"""The PASID part of the ownership-race suite (SVA proposal, not in the series).

The race's host runs with ``proposal_sva``; every device gets a shared WQ whose
descriptors carry a PASID from a small pool that every partition uses (so a
partition also sends PASIDs it never bound, or that a device's previous owner
bound), and each PASID has its own translator (as ``dma_device.main.pasid_memory``
builds it) that shows the oracle what the unit answered. The scheduler binds and
unbinds PASIDs (AttachDevicePasid / DetachDevicePasid) to the guest's S1 domains.

``PasidBindings`` is what the oracle knows of them: a PASID translation that
reached memory must come from a PASID the descriptor's owner had bound on that
slot at some moment of the translation (bound before the attach is called,
unbound once a detach returned or the host dropped the binding: a move or reset).
The owner + epoch + bank + mapped-page checks of every run stay as they are.
PVIOMMU_RACE_PASID=0 leaves all of it out (the race as it was before).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hypervisor_svc.core.model import Sync
from pviommu.abi import hv
from pviommu.abi.dsa import WqCfg
from pviommu.abi.hv.sva import AttachDevicePasidInput, DetachDevicePasidInput
from pviommu.abi.hv_status import HvStatus

if TYPE_CHECKING:
    from dma_device.dsa.device import DsaDevice
    from hypervisor_svc.core.host import Host
    from hypervisor_svc.core.model import Device, Partition
    from tests.kit.racekit import GuestModel, Race

#: the PASIDs every partition binds and sends (small: owners and bindings collide often)
POOL = (1, 2, 3)
SHARED_WQ = 1
#: share of a submitter's descriptors that are PASID-tagged (on the shared WQ)
SHARE = 0.25
#: scheduler weight of a bind/unbind step
WEIGHT = 6


def enabled() -> bool:
    return os.environ.get("PVIOMMU_RACE_PASID", "1") != "0"


def add_shared_wq(device: DsaDevice) -> None:
    """The shared WQ (group 0, after the dedicated WQ 0): descriptors name their own PASID."""
    device.configure_wq(SHARED_WQ, WqCfg(wq_size=16, dedicated=False, priority=5))


@dataclass
class PasidBindings:
    """Who bound each (slot, PASID), as the scheduler did it; callers hold the oracle's lock."""

    #: (slot, PASID) -> (partition that bound it, the device's epoch and ``flushes`` then)
    live: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    #: (slot, PASID, partition) -> event number at which that partition's binding ended
    ended: dict[tuple[int, int, int], int] = field(default_factory=dict)
    #: bindings a move or reset dropped: they end once the unit applied the global PASID-cache
    #: invalidation the host posts for them (posted, not waited for: sva.reset_device)
    pending: set[tuple[int, int]] = field(default_factory=set)
    #: slot -> global PASID-cache invalidations its unit applied
    flushes: dict[int, int] = field(default_factory=dict)
    #: event counter: a translator reads it before translating
    seq: int = 0
    binds: int = 0
    unbinds: int = 0
    runs_checked: int = 0
    #: PASID translations the unit refused (not bound, another owner's entry fenced, ...)
    faults: int = 0

    def bind(self, slot: int, pasid: int, pid: int, epoch: int) -> None:
        """Called before the attach: from now on its translations may succeed."""
        self.seq += 1
        prev = self.live.get((slot, pasid))
        if prev is not None and prev[0] != pid:
            self.ended[(slot, pasid, prev[0])] = self.seq
        self.live[(slot, pasid)] = (pid, epoch, self.flushes.get(slot, 0))
        self.pending.discard((slot, pasid))

    def unbind(self, slot: int, pasid: int) -> None:
        """The binding is gone and the unit holds nothing of it any more."""
        self.seq += 1
        self.pending.discard((slot, pasid))
        prev = self.live.pop((slot, pasid), None)
        if prev is not None:
            self.ended[(slot, pasid, prev[0])] = self.seq

    def bound_during(self, slot: int, pasid: int, pid: int, since: int) -> bool:
        """Was (slot, PASID) bound by ``pid`` at some moment since event ``since``?"""
        live = self.live.get((slot, pasid))
        return (live is not None and live[0] == pid) or self.ended.get((slot, pasid, pid), -1) >= since

    def sync(self, host: Host) -> None:
        """After every scheduler step: forget what the host dropped. A detach was confirmed
        and a refused attach changed nothing: they end now; a move or reset (a new epoch)
        ends them once the unit applied the host's posted PASID-cache flush (``flushed``);
        an UNSYNCED unit may still hold an entry it read before a timed-out attach."""
        by_slot = {d.slot: d for d in host.devices.values()}
        for (slot, pasid), (pid, epoch, flushes) in list(self.live.items()):
            dev = by_slot.get(slot)
            if dev is None:
                self.unbind(slot, pasid)
            elif (dev.partition_id == pid and pasid in dev.pasids) or dev.sync is Sync.UNSYNCED:
                continue
            elif dev.epoch != epoch and self.flushes.get(slot, 0) == flushes:  # not flushed yet
                self.pending.add((slot, pasid))
            else:
                self.unbind(slot, pasid)

    def flushed(self, slot: int) -> None:
        """The unit of ``slot`` applied a global PASID-cache invalidation."""
        self.flushes[slot] = self.flushes.get(slot, 0) + 1
        for slot_, pasid in [k for k in self.pending if k[0] == slot]:
            self.unbind(slot_, pasid)


def step(race: Race, part: Partition, guest: GuestModel, devs: list[Device]) -> str:
    """One bind or unbind of a PASID of one of ``part``'s devices to one of its domains
    (any domain: the host refuses those a PASID cannot walk); returns the op's name."""
    rng = race.rng
    if not devs:
        return "noop"
    dev = rng.choice(devs)
    pasid = rng.choice(POOL)
    device_id = hv.HvDeviceId.logical(dev.logical_device_id)
    domains = sorted(guest.domains)
    if pasid in dev.pasids and (rng.random() < 0.3 or not domains):
        status = race.call(part, DetachDevicePasidInput(hv.HV_PARTITION_ID_SELF, device_id, pasid))
        if status != HvStatus.SUCCESS:
            return f"pasid_unbind refused {HvStatus.name_of(status)}"
        with race.oracle.lock:
            race.oracle.pasids.unbinds += 1
        return "pasid_unbind"
    if not domains:
        return "noop"
    with race.oracle.lock:
        race.oracle.pasids.bind(dev.slot, pasid, part.partition_id, dev.epoch)
    status = race.call(part, AttachDevicePasidInput(race.device_domain(rng.choice(domains)), device_id, pasid))
    if status != HvStatus.SUCCESS:
        return f"pasid_bind refused {HvStatus.name_of(status)}"
    with race.oracle.lock:
        race.oracle.pasids.binds += 1
    return "pasid_bind"
