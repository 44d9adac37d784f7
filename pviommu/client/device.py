"""A device as one guest sees it: map buffers for it, and run DSA operations
by name, each answered with a decoded completion record.

Named operations need somewhere for the device to write the record: the
device keeps one record page, allocated in the guest's RAM and mapped
BIDIRECTIONAL in the device's current domain (re-made when the domain
changes, released by ``Guest.cleanup``). Operations on one device run one
at a time (the record page has one slot per batch entry).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pviommu.abi.dsa import COMP_SIZE, DESC_SIZE, DescFlags, Descriptor, Opcode
from pviommu.client import dsa
from pviommu.client.dsa import RECORD_FLAGS, Addr, Completion
from pviommu.client.errors import ClientError
from pviommu.client.memory import Buffer, Mapping
from pviommu.client.types import Direction, DomainInfo, UnmapResult

if TYPE_CHECKING:
    from pviommu.client.guest import Guest

#: One page of records: slot 0 for the descriptor, 1.. for batch entries.
RECORD_PAGE = 4096
MAX_BATCH = RECORD_PAGE // COMP_SIZE - 1
DEFAULT_OP_TIMEOUT_MS = 5000


@dataclass
class _RecordPage:
    key: tuple[int, str]
    buffer: Buffer
    iova: int
    mapping: Mapping | None


class Device:
    """One of a guest's devices (a DSA behind the pv-IOMMU)."""

    def __init__(self, guest: Guest, logical_device_id: int, name: str = "", control_address: str = "") -> None:
        self.guest = guest
        self.id = logical_device_id
        self.name = name
        self.control_address = control_address
        self._records: _RecordPage | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Device(id={self.id:#x}, name={self.name!r}, guest={self.guest.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id and other.guest is self.guest

    def __hash__(self) -> int:
        return hash((id(self.guest), self.id))

    # -- domain and mappings ------------------------------------------------------------
    @property
    def domain(self) -> DomainInfo | None:
        """The guest domain the device is attached to now (None: blocked / none)."""
        for dom in self.guest.domains():
            if self.id in dom.devices:
                return dom
        return None

    def map(self, buffer: Buffer | int, direction: Direction | str | int = Direction.BIDIRECTIONAL, *,
            size: int | None = None, iova: int = 0, on_demand: bool = False) -> Mapping:
        """Map a buffer (or ``size`` bytes at a GPA) for this device."""
        return self.guest.map(buffer, direction, device=self, size=size, iova=iova, on_demand=on_demand)

    def alloc_map(self, size: int, direction: Direction | str | int = Direction.BIDIRECTIONAL, *,
                  data: bytes | None = None, fill: int | None = None) -> Mapping:
        """Allocate a buffer and map it in one step; the mapping owns the
        buffer (unmapping it through ``Guest.cleanup`` frees both)."""
        buf = self.guest.alloc(size, data=data, fill=fill)
        try:
            m = self.map(buf, direction)
        except BaseException:
            self.guest.free(buf)
            raise
        m.owns_buffer = True
        return m

    def unmap(self, mapping: Mapping, *, skip_flush: bool = False) -> UnmapResult:
        return self.guest.unmap(mapping, skip_flush=skip_flush)

    def flush(self) -> None:
        """Flush the IOTLB for this device's domain (FlushDeviceDomain)."""
        self.guest.flush(device=self)

    # -- descriptors ---------------------------------------------------------------------
    def _record_page(self) -> _RecordPage:
        """The record page for the current domain, made or re-made as needed."""
        dom = self.domain
        key = (dom.domain_id, dom.kind) if dom is not None else (0, "none")
        page = self._records
        if page is not None and page.key == key:
            return page
        if page is not None:
            self._release(page)
        buf = self.guest.alloc(RECORD_PAGE, track=False)
        try:
            if dom is None or dom.kind in ("identity", "none"):
                page = _RecordPage(key, buf, buf.gpa, None)
            else:
                m = self.guest.map(buf, Direction.BIDIRECTIONAL, device=self, track=False)
                page = _RecordPage(key, buf, m.iova, m)
        except BaseException:
            self.guest.free(buf)
            raise
        self._records = page
        return page

    def _release(self, page: _RecordPage) -> None:
        self._records = None
        try:
            if page.mapping is not None and not page.mapping.unmapped:
                self.guest.unmap(page.mapping)
        except ClientError:
            pass  # its domain is gone already
        try:
            self.guest.free(page.buffer)
        except ClientError:
            pass

    def release_records(self) -> None:
        """Give the record page back (Guest.cleanup calls this)."""
        with self._lock:
            if self._records is not None:
                self._release(self._records)

    def submit(self, descriptor: Descriptor | bytes, *, timeout_ms: int = DEFAULT_OP_TIMEOUT_MS,
               check: bool = False, wq_id: int = 0) -> Completion:
        """Submit a descriptor and wait for its record. The descriptor's
        completion address is set to the device's record page (CRAV|RCR)
        unless it already names one with CRAV set -- then use
        ``Guest.submit_raw`` with the record's GPA instead."""
        desc = descriptor if isinstance(descriptor, Descriptor) else Descriptor.unpack(descriptor)
        with self._lock:
            page = self._record_page()
            desc = desc.with_(completion_addr=page.iova, flags=desc.flags | RECORD_FLAGS)
            reply = self.guest.submit_raw(self, desc.pack(), completion_gpa=page.buffer.gpa, timeout_ms=timeout_ms,
                                          wq_id=wq_id)
        done = Completion.decode(desc.opcode, reply.completion_record, accepted=reply.accepted,
                                 timed_out=reply.accepted and not reply.completion_record)
        return done.check() if check else done

    def run(self, op: str, *, check: bool = False, timeout_ms: int = DEFAULT_OP_TIMEOUT_MS, **fields: Any
            ) -> Completion:
        """Run the named operation ``op`` (see ``pviommu.client.dsa.OPERATIONS``)."""
        if op == "batch":
            raise ValueError("use Device.batch([...descriptors]) for a batch")
        return self.submit(dsa.build(op, **fields), check=check, timeout_ms=timeout_ms)

    def batch(self, descriptors: Sequence[Descriptor], *, check: bool = False,
              timeout_ms: int = DEFAULT_OP_TIMEOUT_MS) -> Completion:
        """Run ``descriptors`` as one BATCH; each entry gets its own record
        (``Completion.entries``), the batch record counts ``descs_completed``."""
        if not 0 < len(descriptors) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} descriptors here, not {len(descriptors)}")
        with self._lock:
            page = self._record_page()
            entries = [d.with_(completion_addr=page.iova + (i + 1) * COMP_SIZE, flags=d.flags | RECORD_FLAGS)
                       for i, d in enumerate(descriptors)]
            listing = self.guest.alloc(len(entries) * DESC_SIZE, data=b"".join(e.pack() for e in entries),
                                       track=False)
            try:
                lm = self.guest.map(listing, Direction.TO_DEVICE, device=self, track=False)
                try:
                    self.guest.write(page.buffer.gpa + COMP_SIZE, bytes(len(entries) * COMP_SIZE))
                    desc = Descriptor(opcode=int(Opcode.BATCH), flags=RECORD_FLAGS, completion_addr=page.iova,
                                      src_addr=lm.iova, xfer_size=len(entries))
                    reply = self.guest.submit_raw(self, desc.pack(), completion_gpa=page.buffer.gpa,
                                                  timeout_ms=timeout_ms)
                    raw = self.guest.read(page.buffer.gpa + COMP_SIZE, len(entries) * COMP_SIZE)
                finally:
                    self.guest.unmap(lm)
            finally:
                self.guest.free(listing)
        subs = tuple(Completion.decode(e.opcode, raw[i * COMP_SIZE : (i + 1) * COMP_SIZE])
                     for i, e in enumerate(entries))
        done = Completion.decode(Opcode.BATCH, reply.completion_record, accepted=reply.accepted,
                                 timed_out=reply.accepted and not reply.completion_record, entries=subs)
        return done.check() if check else done

    # -- named operations -------------------------------------------------------------------
    def noop(self, **kw: Any) -> Completion:
        return self.run("noop", **kw)

    def drain(self, **kw: Any) -> Completion:
        return self.run("drain", **kw)

    def memmove(self, dst: Addr, src: Addr, size: int | None = None, **kw: Any) -> Completion:
        """Copy ``size`` bytes (default: the smaller mapping) from ``src`` to ``dst``."""
        return self.run("memmove", dst=dst, src=src, size=size, **kw)

    def fill(self, dst: Addr, pattern: int | bytes, size: int | None = None, **kw: Any) -> Completion:
        return self.run("fill", dst=dst, pattern=pattern, size=size, **kw)

    def compare(self, src: Addr, src2: Addr, size: int | None = None, **kw: Any) -> Completion:
        """``result`` 0 when equal, 1 when not (``bytes_completed`` = first difference)."""
        return self.run("compare", src=src, src2=src2, size=size, **kw)

    def compare_pattern(self, src: Addr, pattern: int | bytes, size: int | None = None, **kw: Any) -> Completion:
        return self.run("compare_pattern", src=src, pattern=pattern, size=size, **kw)

    def crc(self, src: Addr, size: int | None = None, seed: int = 0, **kw: Any) -> Completion:
        """CRC-32C of ``src`` (``Completion.crc``)."""
        return self.run("crc", src=src, size=size, seed=seed, **kw)

    def copy_crc(self, dst: Addr, src: Addr, size: int | None = None, seed: int = 0, **kw: Any) -> Completion:
        return self.run("copy_crc", dst=dst, src=src, size=size, seed=seed, **kw)

    def dualcast(self, dst: Addr, dst2: Addr, src: Addr, size: int | None = None, **kw: Any) -> Completion:
        return self.run("dualcast", dst=dst, dst2=dst2, src=src, size=size, **kw)

    def delta_create(self, src: Addr, src2: Addr, delta: Addr, size: int | None = None, **kw: Any) -> Completion:
        """A delta record of ``src2`` against ``src`` into ``delta`` (``Completion.delta_rec_size``)."""
        return self.run("delta_create", src=src, src2=src2, delta=delta, size=size, **kw)

    def delta_apply(self, dst: Addr, delta: Addr, delta_size: int, size: int | None = None, **kw: Any
                    ) -> Completion:
        return self.run("delta_apply", dst=dst, delta=delta, delta_size=delta_size, size=size, **kw)

    def dif_check(self, src: Addr, size: int | None = None, **kw: Any) -> Completion:
        return self.run("dif_check", src=src, size=size, **kw)

    def dif_insert(self, dst: Addr, src: Addr, size: int | None = None, **kw: Any) -> Completion:
        return self.run("dif_insert", dst=dst, src=src, size=size, **kw)

    def dif_strip(self, dst: Addr, src: Addr, size: int | None = None, **kw: Any) -> Completion:
        return self.run("dif_strip", dst=dst, src=src, size=size, **kw)

    def dif_update(self, dst: Addr, src: Addr, size: int | None = None, **kw: Any) -> Completion:
        return self.run("dif_update", dst=dst, src=src, size=size, **kw)

    def cache_flush(self, dst: Addr, size: int | None = None, **kw: Any) -> Completion:
        return self.run("cache_flush", dst=dst, size=size, **kw)


__all__ = ["MAX_BATCH", "RECORD_PAGE", "DescFlags", "Device"]
