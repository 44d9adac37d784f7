"""Address spaces of the system, as distinct types.

Three spaces meet in a nested IOMMU and confusing them is the classic bug:

* ``Iova`` -- what a device puts on the bus; translated by stage 1.
* ``Gpa``  -- guest-physical; the offset inside the partition's RAM bank.
* ``Hpa``  -- host-physical; bank base + offset in the shared memory banks.

They are ``NewType``s over ``int`` so ``mypy --strict`` rejects passing one
where another is expected; crossing spaces happens only in named functions
(``Bank.hpa_of``, stage-2 translation, the nested walk).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NewType

Iova = NewType("Iova", int)
Gpa = NewType("Gpa", int)
Hpa = NewType("Hpa", int)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SZ_4K = 1 << 12
SZ_2M = 1 << 21
SZ_1G = 1 << 30

#: The x86 MSI window: never handed out as IOVA, never a valid DMA target.
MSI_WINDOW_START = 0xFEE0_0000
MSI_WINDOW_LAST = 0xFEEF_FFFF


class PageSize(IntEnum):
    """Leaf sizes the x86-64 and VT-d second-stage formats can map, as log2."""

    SZ_4K = 12
    SZ_2M = 21
    SZ_1G = 30

    @property
    def bytes(self) -> int:
        return 1 << int(self)


def align_down(value: int, alignment: int) -> int:
    """Round ``value`` down to a power-of-two ``alignment``."""
    return value & ~(alignment - 1)


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a power-of-two ``alignment``."""
    return (value + alignment - 1) & ~(alignment - 1)


def is_aligned(value: int, alignment: int) -> bool:
    return value & (alignment - 1) == 0


def page_count(start: int, length: int) -> int:
    """Number of 4 KiB pages touched by ``[start, start + length)``."""
    if length <= 0:
        return 0
    return ((start + length - 1) >> PAGE_SHIFT) - (start >> PAGE_SHIFT) + 1
