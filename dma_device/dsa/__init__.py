"""Intel DSA device model: work queues, engines, operations, completion records.

No transport here (STYLE.md convention 8): the gRPC portal calls
``DsaDevice.submit`` and the hooks; every byte the device touches goes through a
``pviommu.mem.dma.DmaAccess`` (a ``DmaMemory`` bound to its IOMMU unit, or
``BlockedDma`` while unbound), under the block-on-fault policy of ``access``.
"""

from dma_device.dsa.access import PageRequestOutcome
from dma_device.dsa.device import Counters, DsaDevice, DsaDeviceConfig, MemoryProvider, Portal, SwError

__all__ = [
    "Counters",
    "DsaDevice",
    "DsaDeviceConfig",
    "MemoryProvider",
    "PageRequestOutcome",
    "Portal",
    "SwError",
]
