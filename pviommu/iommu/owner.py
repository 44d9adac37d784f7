"""Device ownership records in bank 0: the software bookkeeping beside the
hardware-shaped context entries (``context``), one 64-byte record per slot.

The hypervisor is their only writer; IOMMU units and device services read
them from shared memory, so a change of owner is authoritative the moment it
is written -- no message has to reach a device before its old owner loses it:

* the unit checks the record's ``epoch`` on every translation and drops its
  context cache, IOTLB and paging-structure caches when it moved (nothing
  walked under an old owner is used under a new one);
* the device service checks submissions, sessions and page-request answers
  against the record's owner and token digest (per call, not once per stream);
* ``owner_bank`` fences stage-2 output into the owner's RAM bank, a second
  fence behind the hypervisor's own tables.

Layout (little-endian; offsets from the record's start)::

    +0   u64 seq           seqlock: odd while the hypervisor writes the record
    +8   u64 epoch         ownership epoch, bumped on every change of owner
    +16  u64 partition_id  owner (0 = none)
    +24  u32 owner_bank    bank index of the owner's RAM (0 = none)
    +28  u32 flags         bit 0 QUARANTINED: not synchronised, served to nobody
    +32  u8[32] token_sha256  SHA-256 of the owner's credential (zeros = none)

Readers take a consistent copy with the seqlock (``read_owner``); the unit's
hot path reads the epoch word alone (``OwnerTable.epoch``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pviommu.addr import Hpa
from pviommu.errors import PviommuError
from pviommu.iommu.context import MAX_SLOTS
from pviommu.mem.bank import HYPERVISOR_BANK, Bank, HostMemory, bank_base

#: The table of records in bank 0, after the 16 KiB context table.
OWNER_TABLE_OFFSET = 16 * 1024
OWNER_RECORD_SIZE = 64
OWNER_TABLE_END = OWNER_TABLE_OFFSET + MAX_SLOTS * OWNER_RECORD_SIZE

SEQ_OFFSET = 0
EPOCH_OFFSET = 8
FLAG_QUARANTINED = 1 << 0
_FIELDS = struct.Struct("<QQII32s")  # epoch, partition_id, owner_bank, flags, token digest (from +8)
_NO_DIGEST = bytes(32)
_READ_TRIES = 100_000


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """One slot's owner as the hypervisor last published it."""

    epoch: int = 0
    partition_id: int = 0
    owner_bank: int = 0
    flags: int = 0
    token_sha256: bytes = _NO_DIGEST

    @property
    def quarantined(self) -> bool:
        return bool(self.flags & FLAG_QUARANTINED)

    @property
    def owned(self) -> bool:
        """True when a partition owns the device and it may serve it."""
        return bool(self.partition_id) and not self.quarantined


def _check_slot(slot: int) -> None:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"device slot {slot} outside 0..{MAX_SLOTS - 1}")


def owner_hpa(slot: int) -> Hpa:
    _check_slot(slot)
    return Hpa(bank_base(HYPERVISOR_BANK) + OWNER_TABLE_OFFSET + slot * OWNER_RECORD_SIZE)


def write_owner(memory: HostMemory, slot: int, record: OwnerRecord) -> None:
    """Publish ``record`` for ``slot`` (seqlock: odd, fields, even)."""
    if len(record.token_sha256) != 32:
        raise ValueError("token digest must be 32 bytes")
    bank = memory.bank(HYPERVISOR_BANK)
    off = OWNER_TABLE_OFFSET + _slot_index(slot) * OWNER_RECORD_SIZE
    seq = bank.read_u64(off + SEQ_OFFSET)
    seq += seq % 2  # a writer that died mid-write left it odd: start from the next even value
    bank.write_u64(off + SEQ_OFFSET, seq + 1)  # odd: readers retry
    bank.write(off + EPOCH_OFFSET, _FIELDS.pack(record.epoch, record.partition_id, record.owner_bank, record.flags,
                                                record.token_sha256))
    bank.write_u64(off + SEQ_OFFSET, seq + 2)  # even: done


def _slot_index(slot: int) -> int:
    _check_slot(slot)
    return slot


def read_owner(memory: HostMemory, slot: int) -> OwnerRecord:
    """A consistent copy of ``slot``'s record (retries while a write is in progress)."""
    bank = memory.bank(HYPERVISOR_BANK)
    off = OWNER_TABLE_OFFSET + _slot_index(slot) * OWNER_RECORD_SIZE
    for _ in range(_READ_TRIES):
        seq = bank.read_u64(off + SEQ_OFFSET)
        if seq % 2:
            continue
        raw = bank.read(off + EPOCH_OFFSET, _FIELDS.size)
        if bank.read_u64(off + SEQ_OFFSET) == seq:
            epoch, pid, owner_bank, flags, digest = _FIELDS.unpack(raw)
            return OwnerRecord(epoch, pid, owner_bank, flags, digest)
    raise PviommuError(f"slot {slot}: the owner record stayed mid-write (the hypervisor died while writing it)")


class OwnerTable:
    """Fast reads of the records for one process (the unit's hot path)."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self._bank: Bank | None = None
        self._words: memoryview | None = None

    def _view(self) -> memoryview:
        words = self._words
        if words is None:
            self._bank = self.memory.bank(HYPERVISOR_BANK)
            words = self._words = self._bank.view[OWNER_TABLE_OFFSET:OWNER_TABLE_END].cast("Q")
        return words

    def epoch(self, slot: int) -> int:
        """The slot's current epoch (one aligned word; no seqlock needed for
        a change detector: the record is re-read with ``read`` on a change)."""
        return int(self._view()[slot * (OWNER_RECORD_SIZE // 8) + EPOCH_OFFSET // 8])

    def read(self, slot: int) -> OwnerRecord:
        return read_owner(self.memory, slot)


__all__ = ["FLAG_QUARANTINED", "OWNER_TABLE_END", "OWNER_TABLE_OFFSET", "OwnerRecord", "OwnerTable",
           "owner_hpa", "read_owner", "write_owner"]
