"""One access API for every address space (after rust-vmm's ``Bytes<A>``).

Consumers (DSA operations, the guest driver) only read and write; providers
(a bank seen as guest RAM, a device's IOMMU-translated view) decide what an
address means and raise a ``PviommuError`` subclass when it means nothing.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

A = TypeVar("A", bound=int, contravariant=True)


class MemoryAccess(Protocol[A]):
    """Byte access to one address space ``A`` (``Iova``, ``Gpa`` or ``Hpa``)."""

    def read(self, addr: A, length: int) -> bytes:
        """Return ``length`` bytes at ``addr`` or raise; never a short read."""
        ...

    def write(self, addr: A, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``addr`` or raise before writing anything
        the caller was not allowed to write."""
        ...
