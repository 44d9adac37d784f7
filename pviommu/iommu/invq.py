"""The invalidation queue: VT-d style queued invalidation in shared memory.

Real hardware does not take invalidations as RPCs: software writes
descriptors into a queue in memory, bumps the tail register and waits for an
invalidation-wait descriptor's status write (VT-d 6.5.2). pviommu does the
same per IOMMU unit (per device slot), in bank 0, so a flush costs a doorbell
and an acknowledgement over local datagram sockets instead of a gRPC call:

Per-slot page at ``queue_hpa(slot)`` (bank 0, below the stage-2 frames)::

    +0    u64 tail        written by the hypervisor (next descriptor index)
    +8    u64 head        written by the unit (descriptors consumed)
    +16   u64 status      the last invalidation-wait status data the unit wrote
    +24   u64 ready       READY_MAGIC once the unit serves this queue
    +64   char[256]       the unit's doorbell socket path (NUL-padded)
    +320  char[256]       the hypervisor's acknowledgement socket path
    +1024 RING_ENTRIES x 16-byte descriptors (a ring)

Descriptors (the 128-bit VT-d layouts this model uses; qw0 bits 3:0 = type):

* 1 context-cache: G bits 5:4 (1 global, 3 device), SID bits 47:32 (the slot);
* 2 IOTLB: G bits 5:4 (1 global, 2 domain, 3 page), DID bits 31:16;
  qw1: AM bits 5:0, ADDR bits 63:12;
* 5 invalidation wait: SW bit 5, status data bits 63:32; qw1: status HPA.

The wait descriptor's status write is the acknowledgement that counts; the
datagram to the hypervisor only wakes it up (it re-reads the status word).
Sockets live beside the banks (shared by containers on one tmpfs volume) or,
when that path is too long for AF_UNIX, under /tmp (the path is published in
the queue page either way).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pviommu.addr import Hpa
from pviommu.errors import DeviceUnavailable, PviommuError
from pviommu.iommu.context import MAX_SLOTS
from pviommu.mem.bank import HYPERVISOR_BANK, HostMemory, bank_base

if TYPE_CHECKING:
    from pviommu.iommu.unit import IommuUnit

QUEUE_REGION_OFFSET = 64 * 1024
QUEUE_PAGE = 4096
QUEUE_REGION_END = QUEUE_REGION_OFFSET + MAX_SLOTS * QUEUE_PAGE
RING_OFFSET = 1024
DESC_SIZE = 16
RING_ENTRIES = (QUEUE_PAGE - RING_OFFSET) // DESC_SIZE
READY_MAGIC = 0x5156_4950_5649_4F4D  # "MOIVPIVQ"
_PATH_MAX = 100  # AF_UNIX sun_path is 108 bytes; stay clear of it

TYPE_CONTEXT = 1
TYPE_IOTLB = 2
TYPE_WAIT = 5
G_GLOBAL, G_DOMAIN, G_PAGE = 1, 2, 3
G_DEVICE = 3


class QueueUnavailable(PviommuError):
    """The unit's queue is not served (no unit, or its process is gone)."""


def queue_hpa(slot: int) -> Hpa:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot {slot} outside 0..{MAX_SLOTS - 1}")
    return Hpa(bank_base(HYPERVISOR_BANK) + QUEUE_REGION_OFFSET + slot * QUEUE_PAGE)


def iotlb_desc(granularity: int, did: int = 0, addr: int = 0, am: int = 0) -> tuple[int, int]:
    return TYPE_IOTLB | granularity << 4 | (did & 0xFFFF) << 16, (am & 0x3F) | (addr & ~0xFFF)


def context_desc(slot: int | None) -> tuple[int, int]:
    if slot is None:
        return TYPE_CONTEXT | G_GLOBAL << 4, 0
    return TYPE_CONTEXT | G_DEVICE << 4 | (slot & 0xFFFF) << 32, 0


def wait_desc(data: int, status_hpa: int) -> tuple[int, int]:
    return TYPE_WAIT | 1 << 5 | (data & 0xFFFF_FFFF) << 32, status_hpa


def socket_path(memory_dir: Path, name: str) -> str:
    """``memory_dir/name`` when it fits AF_UNIX, else a short path under /tmp."""
    path = str(Path(memory_dir) / name)
    if len(path.encode()) <= _PATH_MAX:
        return path
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return f"/tmp/pviommu-{digest}.sock"


def _read_path(memory: HostMemory, hpa: int) -> str:
    return memory.read(Hpa(hpa), 256).split(b"\0", 1)[0].decode()


def _write_path(memory: HostMemory, hpa: int, path: str) -> None:
    raw = path.encode()
    if len(raw) >= 256:
        raise ValueError(f"socket path too long: {path}")
    memory.write(Hpa(hpa), raw + bytes(256 - len(raw)))


def _bind_dgram(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock


def reset_queue(memory: HostMemory, slot: int) -> None:
    """Clear a slot's queue page (the hypervisor, when it (re)assigns the slot)."""
    memory.write(queue_hpa(slot), bytes(QUEUE_PAGE))


class QueueWriter:
    """The hypervisor's end for one slot: post descriptors, ring, wait."""

    def __init__(self, memory: HostMemory, slot: int, ack_path: str, ack_sock: socket.socket,
                 ack_lock: threading.Lock) -> None:
        self.memory = memory
        self.slot = slot
        self.base = queue_hpa(slot)
        self._ack_path = ack_path
        self._ack = ack_sock
        self._ack_lock = ack_lock
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._seq = memory.read_u64(Hpa(self.base + 16)) & 0xFFFF_FFFF
        _write_path(memory, self.base + 320, ack_path)
        self._doorbell = _read_path(memory, self.base + 64)

    def _ring(self) -> None:
        """The doorbell. Non-blocking: a full socket queue means the unit has
        doorbells pending and will drain the ring anyway."""
        try:
            self._send.sendto(b"\1", self._doorbell)
        except BlockingIOError:
            pass
        except OSError as exc:  # refused / no such socket: the unit's process is gone
            raise QueueUnavailable(f"slot {self.slot}: doorbell {self._doorbell} does not answer ({exc})") from exc

    def _drain_acks(self) -> None:
        self._ack.setblocking(False)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                self._ack.recv(64)

    @staticmethod
    def served(memory: HostMemory, slot: int) -> bool:
        return memory.read_u64(Hpa(queue_hpa(slot) + 24)) == READY_MAGIC

    def submit(self, descs: list[tuple[int, int]], timeout: float) -> None:
        """Post ``descs`` and an invalidation wait; return once the unit wrote
        the wait status. DeviceUnavailable on timeout, QueueUnavailable when
        no unit serves the queue any more."""
        mem, base = self.memory, self.base
        if mem.read_u64(Hpa(base + 24)) != READY_MAGIC:
            raise QueueUnavailable(f"slot {self.slot}: no IOMMU unit serves this queue")
        self._seq = (self._seq + 1) & 0xFFFF_FFFF or 1
        status_hpa = base + 16
        tail = mem.read_u64(Hpa(base))
        head = mem.read_u64(Hpa(base + 8))
        items = [*descs, wait_desc(self._seq, status_hpa)]
        deadline = time.monotonic() + timeout
        while tail - head + len(items) > RING_ENTRIES:  # the unit is behind: wait for room
            if time.monotonic() >= deadline:
                raise DeviceUnavailable(f"slot {self.slot}: invalidation queue full for {timeout}s (unit stalled)")
            self._ring()
            time.sleep(0.001)
            head = mem.read_u64(Hpa(base + 8))
        for qw0, qw1 in items:
            off = base + RING_OFFSET + (tail % RING_ENTRIES) * DESC_SIZE
            mem.write(Hpa(off), struct.pack("<QQ", qw0, qw1))
            tail += 1
        mem.write_u64(Hpa(base), tail)  # the tail register write
        with self._ack_lock:
            self._drain_acks()  # wake-ups of earlier waits that ended without reading them
            self._ring()
            while (mem.read_u64(Hpa(status_hpa)) & 0xFFFF_FFFF) != self._seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeviceUnavailable(
                        f"slot {self.slot}: the IOMMU unit did not complete the invalidation wait in {timeout}s")
                self._ack.settimeout(min(left, 0.05))
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    self._ack.recv(64)

    def close(self) -> None:
        self._send.close()


class QueueHost:
    """All queue writers of one hypervisor, sharing one acknowledgement socket."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.ack_path = socket_path(memory.directory, f"invq-ack-{os.getpid()}.sock")
        self._ack = _bind_dgram(self.ack_path)
        self._lock = threading.Lock()
        self._writers: dict[int, QueueWriter] = {}

    def writer(self, slot: int) -> QueueWriter | None:
        """The slot's writer when a unit serves its queue, else None."""
        if not QueueWriter.served(self.memory, slot):
            self._writers.pop(slot, None)
            return None
        w = self._writers.get(slot)
        if w is not None and w._doorbell != _read_path(self.memory, queue_hpa(slot) + 64):
            w.close()  # a new unit (re-registered device) serves this slot now
            w = None
        if w is None:
            w = self._writers[slot] = QueueWriter(self.memory, slot, self.ack_path, self._ack, self._lock)
        return w

    def forget(self, slot: int) -> None:
        w = self._writers.pop(slot, None)
        if w is not None:
            w.close()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        self._ack.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ack_path)


class QueueConsumer:
    """The unit's end for one slot: a thread that drains the queue on every
    doorbell and executes the descriptors through ``apply``."""

    def __init__(self, memory: HostMemory, slot: int,
                 apply: Callable[[int, int], None]) -> None:
        self.memory = memory
        self.slot = slot
        self.base = queue_hpa(slot)
        self._apply = apply
        self.path = socket_path(memory.directory, f"invq-{slot:03d}-{os.getpid()}.sock")
        self._sock = _bind_dgram(self.path)
        self._sock.settimeout(0.5)  # drain now and then even without a doorbell
        self._reply = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._reply.setblocking(False)  # an acknowledgement is only a wake-up: never block the unit on it
        self._stop = False
        self.processed = 0
        self.errors = 0
        self.last_error = ""
        _write_path(memory, self.base + 64, self.path)
        memory.write_u64(Hpa(self.base + 8), memory.read_u64(Hpa(self.base)))  # start at the current tail
        memory.write_u64(Hpa(self.base + 24), READY_MAGIC)
        self._thread = threading.Thread(target=self._loop, name=f"invq-{slot}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._sock.recv(64)
            except TimeoutError:
                pass  # also drain without a doorbell: a lost datagram only delays
            except OSError:
                return
            try:
                self.drain()
            except Exception as exc:  # keep serving: a dead consumer would stall every flush
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"

    def drain(self) -> None:
        mem, base = self.memory, self.base
        head, tail = mem.read_u64(Hpa(base + 8)), mem.read_u64(Hpa(base))
        while head < tail:
            off = base + RING_OFFSET + (head % RING_ENTRIES) * DESC_SIZE
            qw0, qw1 = struct.unpack("<QQ", mem.read(Hpa(off), DESC_SIZE))
            head += 1
            if qw0 & 0xF == TYPE_WAIT:
                mem.write_u64(Hpa(base + 8), head)
                if qw0 & 1 << 5:
                    mem.write_u64(Hpa(qw1), qw0 >> 32)  # the status write
                ack = _read_path(mem, base + 320)
                if ack:
                    with contextlib.suppress(OSError):
                        self._reply.sendto(b"\1", ack)
            else:
                try:
                    self._apply(qw0, qw1)
                finally:
                    mem.write_u64(Hpa(base + 8), head)  # a bad descriptor is consumed, not retried forever
                self.processed += 1
        mem.write_u64(Hpa(base + 8), head)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(PviommuError, ValueError):
            self.memory.write_u64(Hpa(self.base + 24), 0)
        self._sock.close()
        self._reply.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def apply_to_unit(unit: IommuUnit) -> Callable[[int, int], None]:
    """Execute one context-cache or IOTLB descriptor on an ``IommuUnit``."""

    def apply(qw0: int, qw1: int) -> None:
        kind, g = qw0 & 0xF, (qw0 >> 4) & 3
        if kind == TYPE_CONTEXT:
            unit.invalidate_context(None if g == G_GLOBAL else (qw0 >> 32) & 0xFFFF)
        elif kind == TYPE_IOTLB:
            did = (qw0 >> 16) & 0xFFFF
            if g == G_GLOBAL:
                unit.invalidate_all()
            elif g == G_DOMAIN:
                unit.invalidate_domain(did)
            else:
                unit.invalidate_pages(did, qw1 & ~0xFFF, qw1 & 0x3F)

    return apply
