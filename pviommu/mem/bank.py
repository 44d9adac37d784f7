"""Host physical memory as banks of shared memory.

Each bank is a file mapped with ``mmap(MAP_SHARED)``: a tmpfs file under
/dev/shm, a temporary folder or a volume shared between containers. Every
process that maps the same file sees the same bytes, which is how the
hypervisor (stage-2 tables), the guests (their RAM) and the devices (DMA)
share one "physical memory".

HPA layout: bank ``i`` occupies ``[bank_base(i), bank_base(i) + size)`` with
``bank_base(i) = (i + 1) << 40``. No bank starts at 0, so a GPA used as an HPA
by mistake never lands in RAM: code that confuses the spaces fails loudly.

Bank 0 is the hypervisor's private memory (stage-2 tables, device context
entries); bank ``n`` is partition ``n``'s RAM, where GPA = offset.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import threading
from pathlib import Path

from pviommu.addr import Gpa, Hpa
from pviommu.errors import GpaOutOfRange, HpaOutOfRange

BANK_WINDOW_LG2 = 40
HYPERVISOR_BANK = 0
_U64 = struct.Struct("<Q")
assert sys.byteorder == "little", "banks hold little-endian structures, read as native words"


def bank_base(index: int) -> Hpa:
    """First HPA of bank ``index`` (never 0)."""
    return Hpa((index + 1) << BANK_WINDOW_LG2)


def bank_index_of(hpa: Hpa) -> int:
    """Bank number whose HPA window holds ``hpa`` (-1 below bank 0)."""
    return (hpa >> BANK_WINDOW_LG2) - 1


def bank_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"bank-{index:05d}.mem"


class Bank:
    """One mapped bank: a window of HPAs backed by a shared file."""

    def __init__(self, path: Path, index: int, size: int) -> None:
        self.path = Path(path)
        self.index = index
        self.size = size
        self.base = bank_base(index)
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._inode = os.fstat(fd).st_ino
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        #: Zero-copy view of the whole bank, for memmove-speed slices.
        self.view = memoryview(self._map)
        #: The bank as aligned 8-byte words: a page-table entry, queue index or owner
        #: record word is read and written in one access, never torn across CPUs (struct
        #: with an explicit byte order would move it one byte at a time).
        self._words = self.view.cast("Q")

    # -- life cycle -------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, index: int, size: int) -> Bank:
        """Create (sparse, zero-filled) and map bank ``index`` of ``size`` bytes."""
        if size <= 0 or size % mmap.PAGESIZE or size >= 1 << BANK_WINDOW_LG2:
            raise ValueError(f"bank size {size:#x} must be a positive multiple of the page size")
        path = bank_path(directory, index)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return cls(path, index, size)

    @classmethod
    def open(cls, directory: Path, index: int) -> Bank:
        """Map an existing bank created by another process."""
        path = bank_path(directory, index)
        return cls(path, index, path.stat().st_size)

    def is_stale(self) -> bool:
        """True when the file was removed or replaced since it was mapped."""
        try:
            return self.path.stat().st_ino != self._inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        try:
            self._words.release()
            self.view.release()
            self._map.close()
        except BufferError:  # a caller still holds a sub-view; the OS unmaps at exit
            pass

    def unlink(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    # -- addresses ----------------------------------------------------------
    def hpa_of(self, offset: int) -> Hpa:
        return Hpa(self.base + offset)

    def offset_of(self, hpa: Hpa, length: int = 1) -> int:
        offset = hpa - self.base
        if offset < 0 or length < 0 or offset + length > self.size:
            raise HpaOutOfRange(
                f"HPA {hpa:#x}+{length:#x} outside bank {self.index}", addr=hpa, length=length
            )
        return offset

    # -- bytes ----------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise HpaOutOfRange(
                f"offset {offset:#x}+{length:#x} outside bank {self.index} (size {self.size:#x})",
                addr=self.base + offset,
                length=length,
            )

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.view[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        self.view[offset : offset + len(data)] = data

    def read_u64(self, offset: int) -> int:
        self._check(offset, 8)
        if offset & 7:
            return int(_U64.unpack_from(self._map, offset)[0])
        return int(self._words[offset >> 3])

    def write_u64(self, offset: int, value: int) -> None:
        self._check(offset, 8)
        if offset & 7:
            _U64.pack_into(self._map, offset, value)
        else:
            self._words[offset >> 3] = value

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        """Zero a page-aligned range and give its memory back (punch a hole:
        MADV_REMOVE on tmpfs/ext4), so a reset guest does not pin its RAM."""
        length = self.size - offset if length is None else length
        self._check(offset, length)
        try:
            self._map.madvise(mmap.MADV_REMOVE, offset, length)
        except (AttributeError, OSError):  # no hole punching here: write zeros
            self.fill(offset, length, 0)

    def fill(self, offset: int, length: int, byte: int = 0) -> None:
        self._check(offset, length)
        self.view[offset : offset + length] = bytes([byte]) * length


class HostMemory:
    """Every bank of one host, addressed by HPA (the hypervisor's and the
    devices' view). Banks created by another process are mapped on first use;
    a bank whose file was removed is dropped, so a destroyed partition's RAM
    is never reachable again."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._banks: dict[int, Bank] = {}
        self._lock = threading.Lock()

    def add(self, bank: Bank) -> None:
        with self._lock:
            self._banks[bank.index] = bank

    def create_bank(self, index: int, size: int) -> Bank:
        bank = Bank.create(self.directory, index, size)
        self.add(bank)
        return bank

    def destroy_bank(self, index: int) -> None:
        with self._lock:
            bank = self._banks.pop(index, None)
        if bank is not None:
            bank.unlink()
        else:
            bank_path(self.directory, index).unlink(missing_ok=True)

    def drop_stale(self) -> list[int]:
        """Unmap every partition bank whose file was removed or replaced (its
        partition was destroyed): a device keeps no destroyed RAM mapped."""
        with self._lock:
            stale = [i for i, b in self._banks.items() if i != 0 and b.is_stale()]
        for index in stale:
            self.forget(index)
        return stale

    def forget(self, index: int) -> None:
        """Unmap bank ``index`` in this process (its owner destroyed it)."""
        with self._lock:
            bank = self._banks.pop(index, None)
        if bank is not None:
            bank.close()

    def bank(self, index: int) -> Bank:
        bank = self._banks.get(index)
        if bank is not None:
            return bank
        with self._lock:
            bank = self._banks.get(index)
            if bank is None:
                try:
                    bank = Bank.open(self.directory, index)
                except (FileNotFoundError, ValueError) as exc:
                    raise HpaOutOfRange(
                        f"no bank {index} in {self.directory}", addr=bank_base(index)
                    ) from exc
                self._banks[index] = bank
            return bank

    def resolve(self, hpa: Hpa, length: int) -> tuple[Bank, int]:
        """The bank and offset of ``[hpa, hpa + length)``, which must lie in one bank."""
        index = bank_index_of(hpa)
        if index < 0:
            raise HpaOutOfRange(f"HPA {hpa:#x} is below every bank", addr=hpa, length=length)
        bank = self.bank(index)
        return bank, bank.offset_of(hpa, length)

    def read(self, addr: Hpa, length: int) -> bytes:
        bank, offset = self.resolve(addr, length)
        return bank.read(offset, length)

    def write(self, addr: Hpa, data: bytes | bytearray | memoryview) -> None:
        bank, offset = self.resolve(addr, len(data))
        bank.write(offset, data)

    def read_u64(self, addr: Hpa) -> int:
        bank, offset = self.resolve(addr, 8)
        return bank.read_u64(offset)

    def write_u64(self, addr: Hpa, value: int) -> None:
        bank, offset = self.resolve(addr, 8)
        bank.write_u64(offset, value)

    def close(self) -> None:
        with self._lock:
            banks, self._banks = list(self._banks.values()), {}
        for bank in banks:
            bank.close()


class GuestRam:
    """A partition's RAM as the guest's CPU sees it: GPA = offset in its bank.
    The guest maps only this bank, so it can reach no other memory by CPU."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank
        self.size = bank.size

    def _offset(self, gpa: Gpa, length: int) -> int:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GpaOutOfRange(
                f"GPA {gpa:#x}+{length:#x} outside guest RAM of {self.size:#x} bytes",
                addr=gpa,
                length=length,
            )
        return int(gpa)

    def read(self, addr: Gpa, length: int) -> bytes:
        return self.bank.read(self._offset(addr, length), length)

    def write(self, addr: Gpa, data: bytes | bytearray | memoryview) -> None:
        self.bank.write(self._offset(addr, len(data)), data)

    def read_u64(self, addr: Gpa) -> int:
        return self.bank.read_u64(self._offset(addr, 8))

    def write_u64(self, addr: Gpa, value: int) -> None:
        self.bank.write_u64(self._offset(addr, 8), value)

    def view(self, addr: Gpa, length: int) -> memoryview:
        offset = self._offset(addr, length)
        return self.bank.view[offset : offset + length]
