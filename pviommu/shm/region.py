"""Shared regions and doorbells of the data plane: memfd-backed memory and
eventfds, made by a service and handed to its client over a Unix socket
(SCM_RIGHTS), as vfio-user hands over its ioeventfds and irqfds.

``Region`` maps a memfd; ``Doorbell`` wraps an eventfd (``ring`` from any
process that holds it, ``wait`` with a timeout); ``adaptive_wait`` is the
bounded poll both ends use: check a condition in shared memory for a short
while, then sleep on the doorbell until it rings."""

from __future__ import annotations

import mmap
import os
import select
import struct
import sys
import time
from collections.abc import Callable

_U32 = struct.Struct("<I")
assert sys.byteorder == "little", "the shared layouts are little-endian and read as native words"


class Region:
    """A shared memory region (a memfd, mapped read-write)."""

    def __init__(self, fd: int, size: int, *, owner: bool = False) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        #: aligned 8-byte words: each read or write is one load or store, never torn (struct
        #: with an explicit byte order moves one byte at a time: a reader on another CPU could
        #: see half of a counter's carry)
        self.words = self.view.cast("Q")
        self._owner = owner

    @classmethod
    def create(cls, name: str, size: int) -> Region:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size, owner=True)

    def u64(self, off: int) -> int:
        """The aligned u64 at ``off`` (one load)."""
        return int(self.words[off >> 3])

    def set_u64(self, off: int, value: int) -> None:
        """Store the aligned u64 at ``off`` (one store)."""
        self.words[off >> 3] = value

    def u32(self, off: int) -> int:
        return int(_U32.unpack_from(self.map, off)[0])

    def set_u32(self, off: int, value: int) -> None:
        _U32.pack_into(self.map, off, value)

    def close(self) -> None:
        try:
            self.words.release()
            self.view.release()
            self.map.close()
        except BufferError:  # a sub-view is still held somewhere: the OS unmaps at exit
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


class Doorbell:
    """An eventfd: ``ring()`` adds one, ``wait()`` returns True once it was rung
    (consuming every ring so far) or False after ``timeout``."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.closed = False

    def ring(self) -> bool:
        """False when the other end is gone (the fd was closed here)."""
        if self.closed:
            return False
        try:
            os.eventfd_write(self.fd, 1)
            return True
        except OSError:
            return False

    def consume(self) -> bool:
        try:
            os.eventfd_read(self.fd)
            return True
        except (BlockingIOError, OSError):
            return False

    def wait(self, timeout: float | None) -> bool:
        if self.closed:
            return False
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        except (OSError, ValueError):
            return False
        return bool(ready) and self.consume()

    def rings(self, timeout: float | None) -> int:
        """Like ``wait``, but how many rings it consumed (0 after ``timeout``):
        for a listener that counts interrupts, which an eventfd coalesces."""
        if self.closed:
            return 0
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            return int(os.eventfd_read(self.fd)) if ready else 0
        except (BlockingIOError, OSError, ValueError):
            return 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass


def adaptive_wait(ready: Callable[[], bool], doorbell: Doorbell, *, spin_s: float, timeout: float | None,
                  announce_sleep: Callable[[bool], None] | None = None) -> bool:
    """Wait until ``ready()``: poll it for ``spin_s`` (yielding the GIL between
    polls), then sleep on ``doorbell`` (``announce_sleep(True)`` first, so the
    other end knows to ring it; ``announce_sleep(False)`` on waking). False
    when ``timeout`` passed first."""
    if ready():
        return True
    now = time.monotonic()
    spin_end = now + spin_s
    deadline = None if timeout is None else now + timeout
    while time.monotonic() < spin_end:
        os.sched_yield()  # time.sleep(0) would cost the timer slack (50-100 us)
        if ready():
            return True
    while True:
        if announce_sleep is not None:
            announce_sleep(True)
        try:
            if ready():  # it came while we announced: no ring will follow
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            doorbell.wait(min(left, 0.05) if left is not None else 0.05)
            if ready():
                return True
        finally:
            if announce_sleep is not None:
                announce_sleep(False)
