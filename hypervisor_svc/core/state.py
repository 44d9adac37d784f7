"""The host's state declared once (maps, pools, locks, components), so every host module sees it typed.

``Host`` (host.py) and its operation mixins, ``DeviceOwnership`` (ownership.py) and ``DomainOps``
(domains.py), derive from ``HostState``."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from hypervisor_svc.core import stage2
from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.counters import Counters
from hypervisor_svc.core.model import Device, Partition
from hypervisor_svc.core.sva import SvaState
from hypervisor_svc.core.trace import TraceWriter
from hypervisor_svc.core.units import NullLink, UnitLink, Units
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError
from pviommu.iommu.context import MAX_SLOTS
from pviommu.mem.bank import HYPERVISOR_BANK, HostMemory

MAX_TAG = 0xFFFF


class HostState:
    """The host's state. Locks, in this order (host.py, docs/ownership.md):
    ``admin_lock`` (admin changes), the partition locks by id (a partition's
    calls and unit waits), ``lock`` (the maps and pools; never held across a
    unit wait)."""

    def __init__(self, memory_dir: Path, admin_token: str, config: HypervisorConfig | None = None,
                 link: UnitLink | None = None) -> None:
        if not admin_token:
            raise ValueError("an admin token is required (PVIOMMU_ADMIN_TOKEN or --admin-token-file)")
        self.config = config or HypervisorConfig()
        self.memory = HostMemory(Path(memory_dir))
        self.admin_token = admin_token
        self.lock = threading.RLock()
        self.admin_lock = threading.RLock()
        for p in Path(memory_dir).glob("bank-*.mem"):  # a previous hypervisor's banks: its guests are gone
            p.unlink()
        self.bank0 = self.memory.create_bank(HYPERVISOR_BANK, self.config.bank0_bytes)
        self.tables = stage2.HostTables(self.memory, self.bank0)
        self.counters = Counters()
        self.units = Units(link or NullLink(), self.tables, self.memory, self.counters)
        #: the SVA proposal's PASID tables (None: the series' interface only; Host sets them)
        self.sva: SvaState | None = None
        self.partitions: dict[int, Partition] = {}
        self.devices: dict[int, Device] = {}
        self._next_partition = 1
        #: FIFO pools: a freed tag or slot is reused as late as possible
        self._free_tags: deque[int] = deque(range(1, min(self.config.domain_tags, MAX_TAG) + 1))
        self._free_slots: deque[int] = deque(range(MAX_SLOTS))
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

    def partition(self, pid: int) -> Partition:
        part = self.partitions.get(pid)
        if part is None:
            raise HvError(HvStatus.INVALID_PARTITION_ID, f"no partition {pid}")
        return part

    def device(self, logical: int) -> Device:
        dev = self.devices.get(logical)
        if dev is None:
            raise HvError(HvStatus.INVALID_DEVICE_ID, f"no device {logical:#x}")
        return dev

    def devices_of(self, part: Partition) -> list[Device]:
        return [self.devices[d] for d in sorted(part.devices) if d in self.devices]
