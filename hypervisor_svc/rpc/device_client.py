"""The hypervisor's side of the wire to each device's IOMMU unit: the unit's
invalidation queue in bank 0 (``pviommu.shm.invq``), the one way the host
reaches a unit. ``submit`` returns once the unit confirmed the items (its
invalidation-wait status write); a live unit that does not confirm within
the flush timeout raises ``UnitStalled``, a unit no process serves any more
raises ``UnitGone``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hypervisor_svc.core.model import Device
from pviommu.abi.invq import QueueItem
from pviommu.mem.bank import HostMemory
from pviommu.shm.invq import QueueHost, QueueWriter, served

#: how long a unit that never served its queue yet may take to start serving it
STARTUP_WAIT_S = 1.0


class QueueLink:
    """``hypervisor_svc.core.units.UnitLink`` over the units' queues."""

    def __init__(self, memory: HostMemory, timeout_s: float) -> None:
        self.queues = QueueHost(memory)
        self.timeout = timeout_s

    def _writer(self, device: Device) -> QueueWriter:
        """The slot's writer; a unit that registered but has not started its
        queue yet gets a moment (``STARTUP_WAIT_S``) before it counts as gone."""
        deadline = time.monotonic() + STARTUP_WAIT_S
        while not served(self.queues.memory, device.slot) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.queues.writer(device.slot)

    def submit(self, device: Device, items: Sequence[QueueItem]) -> None:
        self._writer(device).submit(items, self.timeout)

    def post(self, device: Device, items: Sequence[QueueItem]) -> None:
        self._writer(device).post(items, self.timeout)

    def forget(self, device: Device) -> None:
        self.queues.forget(device.slot)

    def close(self) -> None:
        self.queues.close()
