"""Guest page allocator: page-table frames and DMA buffers from the guest's RAM.

One buddy allocator (``guest_frames``) over the RAM the agent may use: the
first ``reserved_low`` bytes are left alone (like x86's low 1 MiB, and so
that no buffer or table ever has GPA 0). Page tables and buffers share it, as the kernel's page allocator backs both.
"""

from __future__ import annotations

import threading

from guest_agent.errors import InvalidRequest, NotFound
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE, Gpa
from pviommu.errors import GpaOutOfRange
from pviommu.mem.bank import GuestRam
from pviommu.mem.frames import MAX_ORDER, FrameAllocator, guest_frames
from pviommu.units import MiB

RESERVED_LOW = MiB


class GuestMemory:
    """The guest's RAM (CPU view) and its page allocator."""

    def __init__(self, ram: GuestRam, *, reserved_low: int = RESERVED_LOW) -> None:
        self.ram = ram
        if reserved_low >= ram.size:
            raise InvalidRequest(f"RAM of {ram.size:#x} bytes leaves nothing above {reserved_low:#x}")
        self.frames: FrameAllocator[Gpa] = guest_frames(ram, reserved_low, ram.size - reserved_low)
        self._buffers: dict[int, int] = {}  # gpa -> bytes requested
        self._lock = threading.Lock()

    # -- buffers ---------------------------------------------------------------------
    def alloc(self, size: int, *, zero: bool = True) -> Gpa:
        """A physically contiguous, naturally aligned buffer of at least ``size`` bytes."""
        if size <= 0:
            raise InvalidRequest(f"cannot allocate {size} bytes")
        pages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        order = (pages - 1).bit_length()
        if order > MAX_ORDER:
            raise InvalidRequest(f"{size:#x} bytes exceed the largest contiguous block (1 GiB)")
        gpa = self.frames.alloc(order, zero=zero)
        with self._lock:
            self._buffers[int(gpa)] = size
        return gpa

    def free(self, gpa: Gpa) -> None:
        with self._lock:
            if self._buffers.pop(int(gpa), None) is None:
                raise NotFound(f"GPA {gpa:#x} is not a buffer allocated by this agent")
        self.frames.free(gpa)

    def buffer_size(self, gpa: Gpa) -> int:
        with self._lock:
            return self._buffers.get(int(gpa), 0)

    @property
    def buffers(self) -> int:
        with self._lock:
            return len(self._buffers)

    # -- CPU access ------------------------------------------------------------------
    def check(self, gpa: int, size: int) -> None:
        if gpa < 0 or size < 0 or gpa + size > self.ram.size:
            raise GpaOutOfRange(f"GPA {gpa:#x}+{size:#x} is outside this guest's RAM (0..{self.ram.size:#x})",
                                addr=gpa, length=size)

    def read(self, gpa: int, size: int) -> bytes:
        self.check(gpa, size)
        return self.ram.read(Gpa(gpa), size)

    def write(self, gpa: int, data: bytes) -> None:
        self.check(gpa, len(data))
        self.ram.write(Gpa(gpa), data)
