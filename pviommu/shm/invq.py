"""The invalidation queue transport: VT-d style queued invalidation in shared
memory (layouts in ``pviommu.abi.invq``).

Software writes descriptors into a ring in memory, bumps the tail and waits
for an invalidation-wait descriptor's status write (VT-d 6.5.2). pviommu has
one queue per IOMMU unit (device slot) in bank 0; the doorbell and the
acknowledgement are local datagram sockets (wake-ups only: the status word
is what counts). Both ends poll briefly before sleeping, so back-to-back
flushes cost no wake-up at all. This is the one way the hypervisor reaches a
unit: invalidations, ownership fences and page-request answers.

Sockets live beside the banks (shared by containers on one tmpfs volume) or,
when that path is too long for AF_UNIX, under /tmp (the path is published in
the queue page either way).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pviommu.abi import invq as layout
from pviommu.abi.invq import QueueItem, Wait
from pviommu.addr import Hpa
from pviommu.errors import PviommuError, UnitGone, UnitStalled
from pviommu.iommu.context import MAX_SLOTS
from pviommu.mem.bank import HYPERVISOR_BANK, HostMemory, bank_base

QUEUE_REGION_END = layout.QUEUE_REGION_OFFSET + MAX_SLOTS * layout.QUEUE_PAGE
_PATH_MAX = 100  # AF_UNIX sun_path is 108 bytes; stay clear of it
#: How long each end polls shared memory before it sleeps on its socket.
WRITER_SPIN_S = 0.0003
CONSUMER_SPIN_S = 0.0005


def queue_hpa(slot: int) -> Hpa:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot {slot} outside 0..{MAX_SLOTS - 1}")
    return Hpa(bank_base(HYPERVISOR_BANK) + layout.QUEUE_REGION_OFFSET + slot * layout.QUEUE_PAGE)


def socket_path(memory_dir: Path, name: str) -> str:
    """``memory_dir/name`` when it fits AF_UNIX, else a short path under /tmp."""
    path = str(Path(memory_dir) / name)
    if len(path.encode()) <= _PATH_MAX:
        return path
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return f"/tmp/pviommu-{digest}.sock"


def _read_path(memory: HostMemory, hpa: int) -> str:
    return memory.read(Hpa(hpa), layout.PATH_FIELD).split(b"\0", 1)[0].decode(errors="replace")


def _write_path(memory: HostMemory, hpa: int, path: str) -> None:
    raw = path.encode()
    if len(raw) >= layout.PATH_FIELD:
        raise ValueError(f"socket path too long: {path}")
    memory.write(Hpa(hpa), raw + bytes(layout.PATH_FIELD - len(raw)))


def _bind_dgram(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock


def reset_queue(memory: HostMemory, slot: int) -> None:
    """Clear a slot's queue page (the hypervisor, when it (re)assigns the slot)."""
    memory.write(queue_hpa(slot), bytes(layout.QUEUE_PAGE))


def served(memory: HostMemory, slot: int) -> bool:
    return memory.read_u64(Hpa(queue_hpa(slot) + layout.READY_OFFSET)) == layout.READY_MAGIC


class QueueWriter:
    """The hypervisor's end for one slot: post descriptors, ring, wait.
    One caller at a time per slot (the host serialises per device)."""

    def __init__(self, memory: HostMemory, slot: int) -> None:
        self.memory = memory
        self.slot = slot
        self.base = queue_hpa(slot)
        # an acknowledgement socket of its own: one stalled unit never delays another's wake-ups
        self.ack_path = socket_path(memory.directory, f"invq-ack-{os.getpid()}-{slot:03d}.sock")
        self._ack = _bind_dgram(self.ack_path)
        self._lock = threading.Lock()
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._seq = memory.read_u64(Hpa(self.base + layout.STATUS_OFFSET)) & 0xFFFF_FFFF
        _write_path(memory, self.base + layout.ACK_PATH_OFFSET, self.ack_path)
        self.doorbell = _read_path(memory, self.base + layout.DOORBELL_PATH_OFFSET)

    def _ring(self) -> None:
        """The doorbell. Non-blocking: a full socket queue means the unit has
        doorbells pending and will drain the ring anyway."""
        try:
            self._send.sendto(b"\1", self.doorbell)
        except BlockingIOError:
            pass
        except OSError as exc:  # refused / no such socket: the unit's process is gone
            raise UnitGone(f"slot {self.slot}: doorbell {self.doorbell} does not answer ({exc})") from exc

    def _drain_acks(self) -> None:
        self._ack.setblocking(False)
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                self._ack.recv(64)

    def _post(self, items: Sequence[QueueItem | Wait], deadline: float) -> None:
        mem, base = self.memory, self.base
        if mem.read_u64(Hpa(base + layout.READY_OFFSET)) != layout.READY_MAGIC:
            raise UnitGone(f"slot {self.slot}: no IOMMU unit serves this queue")
        tail = mem.read_u64(Hpa(base + layout.TAIL_OFFSET))
        head = mem.read_u64(Hpa(base + layout.HEAD_OFFSET))
        while tail - head + len(items) > layout.RING_ENTRIES:  # the unit is behind: wait for room
            if time.monotonic() >= deadline:
                raise UnitStalled(f"slot {self.slot}: invalidation queue full (the IOMMU unit is stalled)")
            self._ring()
            time.sleep(0.001)
            head = mem.read_u64(Hpa(base + layout.HEAD_OFFSET))
        for item in items:
            off = base + layout.RING_OFFSET + (tail % layout.RING_ENTRIES) * layout.DESC_SIZE
            mem.write(Hpa(off), layout.pack(item))
            tail += 1
        mem.write_u64(Hpa(base + layout.TAIL_OFFSET), tail)  # the tail register write

    def post(self, items: Sequence[QueueItem], timeout: float) -> None:
        """Queue ``items`` and ring, without waiting for them to be done."""
        with self._lock:
            self._post(items, time.monotonic() + timeout)
            self._ring()

    def submit(self, items: Sequence[QueueItem], timeout: float) -> None:
        """Queue ``items`` and an invalidation wait; return once the unit wrote
        the wait status. UnitStalled on timeout, UnitGone when no process
        serves the queue."""
        with self._lock:
            deadline = time.monotonic() + timeout
            self._seq = (self._seq + 1) & 0xFFFF_FFFF or 1
            seq = self._seq
            status = Hpa(self.base + layout.STATUS_OFFSET)
            self._post([*items, Wait(seq, status)], deadline)
            mem = self.memory
            self._ring()
            spin_end = time.monotonic() + WRITER_SPIN_S
            while time.monotonic() < spin_end:  # a busy unit answers within microseconds
                if mem.read_u64(status) & 0xFFFF_FFFF == seq:
                    return
                os.sched_yield()  # time.sleep(0) would cost the timer slack (50-100 us)
            self._drain_acks()  # wake-ups of earlier waits that ended without reading them
            while (mem.read_u64(status) & 0xFFFF_FFFF) != seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnitStalled(
                        f"slot {self.slot}: the IOMMU unit did not complete the invalidation wait in {timeout}s")
                if not served(mem, self.slot):
                    raise UnitGone(f"slot {self.slot}: the IOMMU unit stopped serving its queue")
                self._ack.settimeout(min(left, 0.05))
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    self._ack.recv(64)

    def close(self) -> None:
        self._send.close()
        self._ack.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ack_path)


class QueueHost:
    """All queue writers of one hypervisor (one per served slot)."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self._writers_lock = threading.Lock()
        self._writers: dict[int, QueueWriter] = {}

    def writer(self, slot: int) -> QueueWriter:
        """The slot's writer (UnitGone when no unit serves its queue)."""
        if not served(self.memory, slot):
            self.forget(slot)
            raise UnitGone(f"slot {slot}: no IOMMU unit serves this queue")
        doorbell = _read_path(self.memory, queue_hpa(slot) + layout.DOORBELL_PATH_OFFSET)
        with self._writers_lock:
            w = self._writers.get(slot)
            if w is not None and w.doorbell != doorbell:
                w.close()  # a new unit (re-registered device) serves this slot now
                w = None
            if w is None:
                w = self._writers[slot] = QueueWriter(self.memory, slot)
            return w

    def forget(self, slot: int) -> None:
        with self._writers_lock:
            w = self._writers.pop(slot, None)
        if w is not None:
            w.close()

    def close(self) -> None:
        with self._writers_lock:
            for w in self._writers.values():
                w.close()
            self._writers.clear()


class QueueConsumer:
    """The unit's end for one slot: a thread that drains the queue on every
    doorbell (and polls a little after each drain) and hands each item to
    ``handle``. A descriptor that fails is consumed and counted, so one bad
    entry cannot stall every later flush."""

    def __init__(self, memory: HostMemory, slot: int, handle: Callable[[QueueItem], None]) -> None:
        self.memory = memory
        self.slot = slot
        self.base = queue_hpa(slot)
        self._handle = handle
        self.path = socket_path(memory.directory, f"invq-{slot:03d}-{os.getpid()}.sock")
        self._sock = _bind_dgram(self.path)
        self._sock.settimeout(0.5)  # drain now and then even without a doorbell
        self._reply = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._reply.setblocking(False)  # an acknowledgement is only a wake-up: never block the unit on it
        self._stop = False
        #: set by tests to stall the unit (it consumes nothing until cleared)
        self.paused = threading.Event()
        self.processed = 0
        self.errors = 0
        self.last_error = ""
        _write_path(memory, self.base + layout.DOORBELL_PATH_OFFSET, self.path)
        tail = memory.read_u64(Hpa(self.base + layout.TAIL_OFFSET))
        memory.write_u64(Hpa(self.base + layout.HEAD_OFFSET), tail)  # start at the current tail
        memory.write_u64(Hpa(self.base + layout.READY_OFFSET), layout.READY_MAGIC)
        self._thread = threading.Thread(target=self._loop, name=f"invq-{slot}", daemon=True)
        self._thread.start()

    def _pending(self) -> bool:
        mem, base = self.memory, self.base
        return mem.read_u64(Hpa(base + layout.HEAD_OFFSET)) < mem.read_u64(Hpa(base + layout.TAIL_OFFSET))

    def _loop(self) -> None:
        try:
            self._serve()
        except PviommuError as exc:  # bank 0 went away (the hypervisor is gone): nothing left to serve
            self.last_error = f"{type(exc).__name__}: {exc}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                self._sock.recv(64)
            except TimeoutError:
                pass  # also drain without a doorbell: a lost datagram only delays
            except OSError:
                return
            while not self._stop:
                if self.paused.is_set():
                    time.sleep(0.01)
                    continue
                try:
                    self.drain()
                except Exception as exc:  # keep serving: a dead consumer would stall every flush
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                spin_end = time.monotonic() + CONSUMER_SPIN_S
                while time.monotonic() < spin_end and not self._pending():
                    os.sched_yield()  # time.sleep(0) would cost the timer slack (50-100 us)
                if not self._pending():
                    break

    def drain(self) -> None:
        mem, base = self.memory, self.base
        head, tail = mem.read_u64(Hpa(base + layout.HEAD_OFFSET)), mem.read_u64(Hpa(base + layout.TAIL_OFFSET))
        if tail - head > layout.RING_ENTRIES:  # a torn or bogus tail: skip to it rather than replay garbage
            head = tail - layout.RING_ENTRIES
        while head < tail:
            off = base + layout.RING_OFFSET + (head % layout.RING_ENTRIES) * layout.DESC_SIZE
            raw = mem.read(Hpa(off), layout.DESC_SIZE)
            head += 1
            try:
                item = layout.unpack(raw)
                if isinstance(item, Wait):
                    mem.write_u64(Hpa(base + layout.HEAD_OFFSET), head)
                    mem.write_u64(Hpa(item.status_hpa), item.data)  # the status write
                    ack = _read_path(mem, base + layout.ACK_PATH_OFFSET)
                    if ack:
                        with contextlib.suppress(OSError):
                            self._reply.sendto(b"\1", ack)
                    continue
                self._handle(item)
                self.processed += 1
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                mem.write_u64(Hpa(base + layout.HEAD_OFFSET), head)  # a bad descriptor is consumed, not retried

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(PviommuError, ValueError):
            self.memory.write_u64(Hpa(self.base + layout.READY_OFFSET), 0)
        self._sock.close()
        self._reply.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


__all__ = ["QUEUE_REGION_END", "QueueConsumer", "QueueHost", "QueueWriter", "queue_hpa", "reset_queue",
           "served", "socket_path"]
