"""Buddy allocator of page-table frames and large aligned blocks in one bank.

Both sides of the nested IOMMU build page tables in memory they own: the guest
in its RAM (frames named by ``Gpa``), the hypervisor in bank 0 (frames named
by ``Hpa``). The algorithm is the same, so ``FrameAllocator`` is generic over
the address type it hands back and takes the two conversions (offset -> address
and back) from its creator; ``guest_frames`` and ``host_frames`` are the thin
wrappers each side uses, so neither ever builds the other's address type.

Why a buddy allocator: besides 4 KiB table frames, the hypervisor backs guest
RAM with 2 MiB / 1 GiB stage-2 leaves and the guest wants 2 MiB-aligned DMA
buffers to show large stage-1 pages; a buddy keeps such blocks naturally
aligned (alignment is taken on the bank offset, which equals the address
alignment because bank bases are 2^40-aligned and GPA = offset).

Every block is zeroed on allocation: a page-table page must start with every
entry empty, or a walker would follow leftovers of a previous owner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from pviommu.addr import PAGE_SHIFT, Gpa, Hpa
from pviommu.errors import OutOfFrames
from pviommu.mem.bank import Bank, GuestRam

A = TypeVar("A", bound=int)

#: Largest block: 2^18 frames = 1 GiB, the largest x86-64 / VT-d leaf.
MAX_ORDER = 18
_ZERO_CHUNK = bytes(1 << 21)


def order_of_lg2(size_lg2: int) -> int:
    """Buddy order of a block of ``2**size_lg2`` bytes (>= one frame)."""
    if size_lg2 < PAGE_SHIFT or size_lg2 - PAGE_SHIFT > MAX_ORDER:
        raise ValueError(f"block size 2^{size_lg2} outside 4 KiB..1 GiB")
    return size_lg2 - PAGE_SHIFT


class FrameAllocator(Generic[A]):
    """Buddy allocator over bank offsets ``[start, start + size)``.

    ``to_addr``/``from_addr`` convert between bank offsets and the address
    space ``A`` the owner works in; ``zero(offset, length)`` clears a block.
    Thread-safe (one lock): hypervisor request threads allocate concurrently.
    """

    def __init__(
        self,
        start: int,
        size: int,
        *,
        to_addr: Callable[[int], A],
        from_addr: Callable[[A], int],
        zero: Callable[[int, int], None],
    ) -> None:
        frame = 1 << PAGE_SHIFT
        if start % frame or size % frame or size <= 0 or start < 0:
            raise ValueError(f"frame range {start:#x}+{size:#x} must be 4 KiB aligned and non-empty")
        self.start = start
        self.size = size
        self._to_addr = to_addr
        self._from_addr = from_addr
        self._zero = zero
        self._free: list[set[int]] = [set() for _ in range(MAX_ORDER + 1)]
        self._allocated: dict[int, int] = {}  # offset -> order
        self._allocated_frames = 0
        self._lock = threading.Lock()
        pos, end = start, start + size
        while pos < end:
            order = MAX_ORDER
            while order and (pos % (frame << order) or pos + (frame << order) > end):
                order -= 1
            self._free[order].add(pos)
            pos += frame << order

    # -- allocation ---------------------------------------------------------
    def alloc(self, order: int = 0, *, zero: bool = True) -> A:
        """A naturally aligned block of ``2**order`` frames, zeroed unless
        ``zero=False``. Raises ``OutOfFrames`` when no block is large enough."""
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order {order} outside 0..{MAX_ORDER}")
        with self._lock:
            k = order
            while k <= MAX_ORDER and not self._free[k]:
                k += 1
            if k > MAX_ORDER:
                raise OutOfFrames(
                    f"no free block of order {order} in {self.start:#x}+{self.size:#x} "
                    f"({self.free_frames} frames free, fragmented)"
                )
            offset = min(self._free[k]) if len(self._free[k]) < 64 else self._free[k].pop()
            self._free[k].discard(offset)
            while k > order:  # split, keeping the lower half
                k -= 1
                self._free[k].add(offset + ((1 << PAGE_SHIFT) << k))
            self._allocated[offset] = order
            self._allocated_frames += 1 << order
        if zero:
            self._zero(offset, (1 << PAGE_SHIFT) << order)
        return self._to_addr(offset)

    def alloc_lg2(self, size_lg2: int, *, zero: bool = True) -> A:
        """A block of ``2**size_lg2`` bytes aligned to its size."""
        return self.alloc(order_of_lg2(size_lg2), zero=zero)

    def free(self, addr: A) -> None:
        """Return a block obtained from ``alloc``; coalesces with its buddy."""
        offset = self._from_addr(addr)
        with self._lock:
            order = self._allocated.pop(offset, None)
            if order is None:
                raise ValueError(f"{addr:#x} is not an allocated block of this allocator")
            self._allocated_frames -= 1 << order
            while order < MAX_ORDER:
                buddy = offset ^ ((1 << PAGE_SHIFT) << order)
                if buddy not in self._free[order]:
                    break
                self._free[order].discard(buddy)
                offset = min(offset, buddy)
                order += 1
            self._free[order].add(offset)

    # -- the PageTable's FrameSource protocol -------------------------------
    def alloc_table(self) -> A:
        """One zeroed 4 KiB frame for a page-table page."""
        return self.alloc(0)

    def free_table(self, addr: A) -> None:
        self.free(addr)

    # -- accounting ---------------------------------------------------------
    @property
    def allocated_frames(self) -> int:
        """4 KiB frames currently handed out (leak checks compare this)."""
        return self._allocated_frames

    @property
    def allocated_blocks(self) -> int:
        return len(self._allocated)

    @property
    def free_frames(self) -> int:
        return (self.size >> PAGE_SHIFT) - self._allocated_frames

    def owns(self, addr: A) -> bool:
        """True when ``addr`` is the start of a block currently allocated here."""
        return self._from_addr(addr) in self._allocated


def _bank_zeroer(bank: Bank) -> Callable[[int, int], None]:
    def zero(offset: int, length: int) -> None:
        view = bank.view
        while length > 0:
            n = min(length, len(_ZERO_CHUNK))
            view[offset : offset + n] = _ZERO_CHUNK[:n]
            offset += n
            length -= n

    return zero


def guest_frames(ram: GuestRam, start: int, size: int) -> FrameAllocator[Gpa]:
    """Frames of a guest's RAM, named by GPA (GPA = offset in its bank)."""
    if start + size > ram.size:
        raise ValueError(f"frame range {start:#x}+{size:#x} exceeds guest RAM {ram.size:#x}")
    return FrameAllocator(start, size, to_addr=Gpa, from_addr=int, zero=_bank_zeroer(ram.bank))


def host_frames(bank: Bank, start: int, size: int) -> FrameAllocator[Hpa]:
    """Frames of one host bank (the hypervisor's bank 0), named by HPA."""
    if start + size > bank.size:
        raise ValueError(f"frame range {start:#x}+{size:#x} exceeds bank {bank.index}")
    return FrameAllocator(start, size, to_addr=bank.hpa_of, from_addr=bank.offset_of, zero=_bank_zeroer(bank))
