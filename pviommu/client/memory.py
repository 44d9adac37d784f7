"""Guest memory as a script holds it: buffers (GPA ranges of the guest's RAM)
and mappings (a buffer made visible to a device at an IOVA).

Both are handles: they remember their guest, so ``buf.read()``,
``mapping.unmap(skip_flush=True)`` and ``buf.free()`` need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pviommu.addr import Gpa, Iova
from pviommu.client.fmt import hex_repr
from pviommu.client.types import Direction, UnmapResult

if TYPE_CHECKING:
    from pviommu.client.guest import Guest


@dataclass(eq=False, repr=False)
class Buffer:
    """``size`` bytes of guest RAM at ``gpa`` (physically contiguous, page aligned)."""

    gpa: Gpa
    size: int
    guest: Guest = field(repr=False)
    freed: bool = False

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        n = self.size - offset if size is None else size
        return self.guest.read(self.gpa + offset, n)

    def write(self, data: bytes, offset: int = 0) -> None:
        if offset + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes at offset {offset:#x} do not fit a buffer of {self.size:#x}")
        self.guest.write(self.gpa + offset, data)

    def fill(self, byte: int) -> None:
        self.write(bytes([byte & 0xFF]) * self.size)

    def free(self) -> None:
        self.guest.free(self)

    def __repr__(self) -> str:
        return hex_repr(self, ("size",))


@dataclass(eq=False, repr=False)
class Mapping:
    """A buffer mapped for a device: the device reaches ``[iova, iova+size)``.

    Made by ``Guest.map`` / ``Device.map`` / ``Device.alloc_map``; read and
    write go to the buffer (the guest's CPU view), ``unmap`` removes the
    IOVA range (``skip_flush=True`` leaves the IOTLB stale on purpose)."""

    iova: Iova
    size: int
    gpa: Gpa
    direction: Direction
    guest: Guest = field(repr=False)
    device_id: int = 0
    domain_id: int = 0
    buffer: Buffer | None = field(default=None, repr=False)
    unmapped: bool = False
    #: Free the buffer when the mapping goes (alloc_map made both).
    owns_buffer: bool = field(default=False, repr=False)

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        n = self.size - offset if size is None else size
        return self.guest.read(self.gpa + offset, n)

    def write(self, data: bytes, offset: int = 0) -> None:
        if offset + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes at offset {offset:#x} do not fit a mapping of {self.size:#x}")
        self.guest.write(self.gpa + offset, data)

    def fill(self, byte: int) -> None:
        self.write(bytes([byte & 0xFF]) * self.size)

    def unmap(self, *, skip_flush: bool = False) -> UnmapResult:
        return self.guest.unmap(self, skip_flush=skip_flush)

    def __repr__(self) -> str:
        return hex_repr(self, ("size",))
