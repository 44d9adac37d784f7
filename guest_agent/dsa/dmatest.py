"""dmatest, after Linux ``drivers/dma/dmatest.c``: dmatest's sysfs sequence, threads, patterns,
messages and counters word for word; how each outcome maps to dmatest's under idxd, and the
departures kept on purpose, are in docs/dmatest.md."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from guest_agent.dma.api import Direction, DmaApi, DmaMapping
from guest_agent.dma.pages import GuestMemory
from guest_agent.driver.domain import Domain, DomainKind
from guest_agent.driver.pviommu import DeviceState, PvIommu
from guest_agent.dsa.dmatest_format import (
    FIXPT_SHIFT,
    MAX_ERROR_COUNT,
    PATTERN_COPY,
    PATTERN_COUNT_MASK,
    PATTERN_DST,
    PATTERN_OVERWRITE,
    PATTERN_SRC,
    Patterns,
    aggregate_line,
    kbs,
    mismatch_line,
    persec,
    result_line,
    summary_line,
    verify,
)
from guest_agent.dsa.dmatest_params import DmatestOutcome, DmatestParams, ThreadResult, chan_name, select_devices
from guest_agent.dsa.driver import DsaDriver, wait_completion, wq_int_handle
from guest_agent.errors import InvalidRequest
from pviommu.abi.dsa import COMP_SIZE, CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import PAGE_SIZE, Gpa
from pviommu.errors import PviommuError
from pviommu.log import get_logger

log = get_logger("guest.dmatest")
__all__ = ["FIXPT_SHIFT", "MAX_ERROR_COUNT", "PATTERN_COPY", "PATTERN_COUNT_MASK", "PATTERN_DST", "PATTERN_OVERWRITE",
           "PATTERN_SRC", "Dmatest", "DmatestOutcome", "DmatestParams", "Patterns", "ThreadResult", "aggregate_line",
           "chan_name", "kbs", "mismatch_line", "persec", "result_line", "select_devices", "summary_line", "verify"]

#: Completion records per thread (one 4 KiB coherent page of 32-byte records);
#: rotating them keeps a late record of a timed-out test from being read as the next one's.
RECORDS_PER_PAGE = PAGE_SIZE // COMP_SIZE
ENOMEM = 12
EIO = 5
#: idxd sets no copy_align: alignment -1 means 2^0.
COPY_ALIGN = 0
#: dmatest's msleep(100) after a prep or submit error.
ERROR_SLEEP_S = 0.1
#: After a stop, how long a test still waits for its completion (a stuck one would hold the run forever).
STOP_GRACE_S = 1.0
#: Failures of the DSA transport (a dead device, a broken portal stream) and of the hypervisor.
DEVICE_ERRORS: tuple[type[BaseException], ...] = (grpc.RpcError, PviommuError, ConnectionError, OSError)


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Channel:
    driver: DsaDriver
    device: DeviceState
    restore: Domain | None = None
    test_domain: Domain | None = None
    results: list[ThreadResult] = field(default_factory=list)


@dataclass
class _Slots:
    """One thread's completion records, and the descriptors that timed out
    (each still holds a WQ slot until the device writes its record)."""

    page: DmaMapping
    gpa: Gpa
    late: dict[int, Gpa] = field(default_factory=dict)
    _next: int = 0

    def take(self) -> int | None:
        for _ in range(RECORDS_PER_PAGE):
            self._next = (self._next + 1) % RECORDS_PER_PAGE
            if self._next not in self.late:
                return self._next
        return None  # every record of this thread still awaits a late completion


class Dmatest:
    """One dmatest run over the given channels (already filtered by ``select_devices``)."""

    def __init__(self, iommu: PvIommu, dma: DmaApi, memory: GuestMemory, channels: list[tuple[DsaDriver, DeviceState]],
                 params: DmatestParams, emit: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None, *, misconfigured: bool = False) -> None:
        self.iommu = iommu
        self.dma = dma
        self.memory = memory
        self.params = params
        self._emit_cb = emit
        self._progress_cb = progress
        self.lines: list[str] = []
        self._lines_lock = threading.Lock()
        self._done = 0
        self._stop = threading.Event()
        self._stopped_at = 0.0
        self.misconfigured = misconfigured
        self.channels = [] if misconfigured else [Channel(d, dev) for d, dev in channels]
        if params.design not in ("nested", "baseline", ""):
            raise InvalidRequest(f"dmatest: design {params.design!r} is not 'nested' or 'baseline'")
        self._patterns: Patterns | None = None  # built once a thread holds its buffers (sizes are the user's)

    def emit(self, line: str) -> None:
        with self._lines_lock:
            self.lines.append(line)
        if self._emit_cb is not None:
            self._emit_cb(line)

    def _progress(self) -> None:
        with self._lines_lock:
            self._done += 1
            done = self._done
        if self._progress_cb is not None:
            self._progress_cb(done)

    @property
    def patterns(self) -> Patterns:
        with self._lines_lock:
            if self._patterns is None:
                self._patterns = Patterns(self.params.test_buf_size)
            return self._patterns

    def stop(self) -> None:
        """dmatest's ``run=0``: every thread ends after its current test."""
        if not self._stop.is_set():
            self._stopped_at = time.monotonic()
            self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- set-up per design ------------------------------------------------------------------
    def _prepare(self) -> None:
        if self.params.design != "baseline":
            return
        for ch in self.channels:
            dom = self.iommu.new_domain(DomainKind.BASELINE)
            ch.test_domain = dom
            ch.restore = ch.device.domain
            self.iommu.attach(ch.device, dom)

    def _restore(self) -> None:
        for ch in self.channels:
            if ch.test_domain is None:
                continue
            try:
                if ch.restore is not None:
                    self.iommu.attach(ch.device, ch.restore)
                else:
                    self.iommu.detach(ch.device)
                self.iommu.delete_domain(ch.test_domain)
            except DEVICE_ERRORS as exc:
                log.warning("dmatest.restore_failed", device=ch.device.logical_device_id, error=str(exc))

    def run(self) -> DmatestOutcome:
        p = self.params
        if self.misconfigured:
            self.emit("dmatest: Channel misconfigured, can't continue")
        elif not p.channel:
            self.emit("dmatest: No channels configured, continue with any")
        self._prepare()
        try:
            threads: list[threading.Thread] = []
            for ch in self.channels:
                for t in range(p.threads_per_chan):
                    res = ThreadResult(f"{ch.driver.chan_name}-copy{t}")
                    ch.results.append(res)
                    threads.append(threading.Thread(target=self._thread_main, args=(ch, t, res),
                                                    name=res.name, daemon=True))
                self.emit(f"dmatest: Added {p.threads_per_chan} threads using {ch.driver.chan_name}")
            for ch in self.channels:
                self.emit(f"dmatest: Started {p.threads_per_chan} threads using {ch.driver.chan_name}")
            start = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - start
        finally:
            self._restore()
        results = [r for ch in self.channels for r in ch.results]
        tests = sum(r.tests for r in results)
        failures = sum(r.failures for r in results)
        total_len = sum(r.total_len for r in results)
        runtime_us = max((r.runtime_us for r in results), default=0)
        summary = aggregate_line(len(results), tests, failures, runtime_us, total_len)
        iops = persec(runtime_us, tests) / (1 << FIXPT_SHIFT)
        return DmatestOutcome(results, list(self.lines), summary, wall, tests, failures, iops,
                              float(kbs(runtime_us, total_len)), sum(r.by_interrupt for r in results),
                              sum(r.polled for r in results))

    # -- one thread --------------------------------------------------------------------------
    def _thread_main(self, ch: Channel, index: int, res: ThreadResult) -> None:
        try:
            res.status = self._thread(ch, index, res)
        except Exception:  # a bug, not a device failure (those are results): the summary still comes
            log.exception("dmatest.thread_failed", thread=res.name)
            res.status = -EIO
        self.emit("dmatest: " + summary_line(res.name, res.tests, res.failures, res.runtime_us, res.total_len,
                                             res.status))

    def _thread(self, ch: Channel, index: int, res: ThreadResult) -> int:
        """dmatest_func; returns its ``ret`` for the summary."""
        p, drv, dev = self.params, ch.driver, ch.device
        buf_size = p.test_buf_size
        align = p.alignment & 0xFF if p.alignment >= 0 else COPY_ALIGN  # a u8 in dmatest
        if 1 << align > buf_size:
            self.emit(f"dmatest: {buf_size}-byte buffer too small for {1 << align}-byte alignment")
            return -ENOMEM
        allocated: list[Gpa] = []
        try:
            allocated.append(self.memory.alloc(buf_size))
            allocated.append(self.memory.alloc(buf_size))
            page = self.dma.alloc_coherent(dev, PAGE_SIZE)
        except DEVICE_ERRORS as exc:
            log.warning("dmatest.alloc_failed", thread=res.name, error=str(exc))
            for gpa in allocated:
                self.memory.free(gpa)
            return -ENOMEM
        src, dst = allocated
        pat = self.patterns
        slots = _Slots(page.mapping, page.gpa)
        ram = self.memory.ram
        rng = random.Random(f"{p.seed}:{drv.index}:{index}")
        filltime = comparetime = 0.0
        deadline = time.perf_counter() + p.duration_s if p.duration_s > 0 else None
        started = time.perf_counter()
        try:
            while not self._stop.is_set() and not (p.iterations and res.tests >= p.iterations):
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                res.tests += 1
                n = res.tests
                if p.transfer_size:
                    if p.transfer_size >= buf_size:
                        self.emit(f"dmatest: {p.transfer_size}-byte transfer size must be lower than "
                                  f"{buf_size}-buffer size")
                        break
                    length = p.transfer_size
                elif p.norandom:
                    length = buf_size
                else:
                    length = rng.randrange(1 << 32) % buf_size + 1
                if not p.transfer_size:  # do not alter a transfer size the user chose
                    length = (length >> align) << align or 1 << align
                res.total_len += length
                if p.norandom:
                    src_off = dst_off = 0
                else:
                    src_off = rng.randrange(1 << 32) % (buf_size - length + 1) >> align << align
                    dst_off = rng.randrange(1 << 32) % (buf_size - length + 1) >> align << align
                if not p.noverify:
                    t0 = time.perf_counter()
                    ram.write(src, pat.src_image(src_off, length))
                    ram.write(dst, pat.dst_image(dst_off, length))
                    filltime += time.perf_counter() - t0
                err = self._one(drv, dev, src, dst, slots, src_off, dst_off, length, res)
                if err is not None:
                    res.failures += 1
                    self.emit(result_line(res.name, n, err[0], src_off, dst_off, length, err[1]))
                elif p.noverify:
                    self._passed(res.name, n, src_off, dst_off, length)
                else:
                    t0 = time.perf_counter()
                    errors = self._verify(res.name, src, dst, src_off, dst_off, length)
                    comparetime += time.perf_counter() - t0
                    if errors:
                        res.failures += 1
                        self.emit(result_line(res.name, n, "data error", src_off, dst_off, length, errors))
                    else:
                        self._passed(res.name, n, src_off, dst_off, length)
                self._progress()
        finally:
            runtime = time.perf_counter() - started - filltime - comparetime
            res.runtime_us = max(0, int(runtime * 1_000_000))
            self._release_late(drv, slots, res.name)
            try:
                self.dma.free_coherent(page)
            except DEVICE_ERRORS as exc:
                log.warning("dmatest.free_failed", thread=res.name, error=str(exc))
            for gpa in allocated:
                self.memory.free(gpa)
        return 0

    def _passed(self, thread: str, n: int, src_off: int, dst_off: int, length: int) -> None:
        if self.params.verbose:  # verbose_result(); pr_debug otherwise
            self.emit(result_line(thread, n, "test passed", src_off, dst_off, length, 0))

    # -- one test ------------------------------------------------------------------------------
    def _one(self, drv: DsaDriver, dev: DeviceState, src: Gpa, dst: Gpa, slots: _Slots, src_off: int, dst_off: int,
             length: int, res: ThreadResult) -> tuple[str, int] | None:
        """Map, submit, wait, unmap one test: the failure (text, value), or None once the
        descriptor completed (the data check then decides)."""
        buf_size = self.params.test_buf_size
        try:
            srcm = self.dma.map_single(dev, src, buf_size, Direction.TO_DEVICE)
        except DEVICE_ERRORS as exc:
            log.warning("dmatest.map_failed", which="src", error=str(exc))
            return "src mapping error", -ENOMEM
        try:
            # "map with DMA_BIDIRECTIONAL to force writeback/invalidate"
            dstm = self.dma.map_single(dev, dst, buf_size, Direction.BIDIRECTIONAL)
        except DEVICE_ERRORS as exc:
            self._unmap(srcm)
            log.warning("dmatest.map_failed", which="dst", error=str(exc))
            return "dst mapping error", -ENOMEM
        try:
            return self._transfer(drv, slots, srcm.dma_addr + src_off, dstm.dma_addr + dst_off, length, res)
        finally:
            self._unmap(srcm)
            self._unmap(dstm)

    def _unmap(self, m: DmaMapping) -> None:
        try:
            self.dma.unmap(m)
        except DEVICE_ERRORS as exc:  # dma_unmap_page cannot fail; the agent's log says why this one did
            log.warning("dmatest.unmap_failed", iova=hex(m.dma_addr), error=str(exc))

    def _error_pause(self) -> None:
        self._stop.wait(ERROR_SLEEP_S)

    def _transfer(self, drv: DsaDriver, slots: _Slots, src_iova: int, dst_iova: int,
                  length: int, res: ThreadResult) -> tuple[str, int] | None:
        p = self.params
        if drv.max_xfer and length > drv.max_xfer:  # idxd_dma_submit_memcpy returns NULL
            self._error_pause()
            return "prep error", 0
        if not self._acquire(drv, slots):
            self._error_pause()
            return "prep error", 0
        slot = slots.take()
        if slot is None:
            drv.release_slot()
            self._error_pause()
            return "prep error", 0
        rec_gpa = Gpa(slots.gpa + slot * COMP_SIZE)
        self.memory.ram.write(rec_gpa, bytes(COMP_SIZE))
        # dmatest's flags: DMA_PREP_INTERRUPT unless polled; idxd then asks for a completion
        # interrupt (RCI, on the WQ's vector) and the wait wakes on the interrupt.
        irq = not p.polled and drv.wq is not None and drv.interrupts is not None
        flags = DescFlags.CRAV | DescFlags.RCR | (DescFlags.RCI if irq else DescFlags(0))
        desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(flags),
                          int_handle=wq_int_handle(drv.wq.wq_id) if irq and drv.wq is not None else 0,
                          completion_addr=slots.page.dma_addr + slot * COMP_SIZE,
                          src_addr=src_iova, dst_addr=dst_iova, xfer_size=length).pack()
        try:
            accepted = drv.submit(desc)
        except DEVICE_ERRORS as exc:
            drv.release_slot()
            log.warning("dmatest.submit_failed", error=str(exc))
            self._error_pause()
            return "submit error", 0
        if not accepted:
            drv.release_slot()
            self._error_pause()
            return "submit error", 0
        try:
            rec = self._wait(drv, rec_gpa, irq, res)
        except _StopWaiting:
            rec = None
        except DEVICE_ERRORS as exc:  # the portal broke with the descriptor in flight: aborted, as idxd does
            drv.release_slot()
            log.warning("dmatest.descriptor_aborted", error=str(exc))
            return None
        if rec is None:
            slots.late[slot] = rec_gpa  # its slot comes back when the record does
            return "test timed out", 0
        drv.release_slot()
        if rec.code != DsaStatus.SUCCESS:
            log.warning("dmatest.completion_error", status=hex(rec.status), bytes_completed=rec.bytes_completed,
                        fault_addr=hex(rec.fault_addr))
        return None

    def _acquire(self, drv: DsaDriver, slots: _Slots) -> bool:
        """A free descriptor of the WQ (idxd_alloc_desc blocks for one): False when the
        WQ is gone (this thread's portal broke) or the run was stopped meanwhile."""
        while True:
            self._sweep(drv, slots)
            try:
                drv.check_portal()
            except DEVICE_ERRORS as exc:
                log.warning("dmatest.wq_gone", error=str(exc))
                return False
            if drv.acquire_slot(0.05):
                return True
            if self._stop.is_set():
                return False

    def _sweep(self, drv: DsaDriver, slots: _Slots) -> None:
        """Give back the WQ slots of late descriptors whose records arrived."""
        for slot, gpa in list(slots.late.items()):
            if self.memory.ram.read(gpa, 1)[0]:
                del slots.late[slot]
                drv.release_slot()

    def _release_late(self, drv: DsaDriver, slots: _Slots, thread: str) -> None:
        self._sweep(drv, slots)
        if slots.late:
            log.warning("dmatest.late_descriptors", thread=thread, count=len(slots.late))
        for _ in slots.late:
            drv.release_slot()
        slots.late.clear()

    def _wait(self, drv: DsaDriver, rec_gpa: Gpa, irq: bool, res: ThreadResult) -> CompletionRecord | None:
        """The completion record, or None after ``timeout`` ms (negative: no limit, 0: one look);
        counts the completion in ``res`` as waited for by interrupt or by polling."""
        timeout_ms = self.params.timeout
        if timeout_ms == 0:  # wait_event_timeout(..., 0): the condition is evaluated once
            view = self.memory.ram.read(rec_gpa, COMP_SIZE)
            if not view[0]:
                return None
            res.polled += 1
            return CompletionRecord.unpack(view)

        def check() -> None:
            drv.check_portal()
            if self._stop.is_set() and time.monotonic() - self._stopped_at > STOP_GRACE_S:
                raise _StopWaiting

        wake = drv.interrupts.wait if irq and drv.interrupts is not None else None
        rec = wait_completion(self.memory.ram, rec_gpa, None if timeout_ms < 0 else timeout_ms / 1000, check, wake)
        if rec is not None:
            if wake is not None:
                res.by_interrupt += 1
            else:
                res.polled += 1
        return rec

    def _verify(self, thread: str, src: Gpa, dst: Gpa, src_off: int, dst_off: int, length: int) -> int:
        """The six dmatest_verify calls; a fast whole-buffer compare first."""
        buf_size = self.params.test_buf_size
        pat = self.patterns
        sbuf = self.memory.ram.read(src, buf_size)
        dbuf = self.memory.ram.read(dst, buf_size)
        if sbuf == pat.src_image(src_off, length) and dbuf == pat.dst_expected(src_off, dst_off, length):
            return 0
        e = self.emit
        errors = verify(sbuf, 0, src_off, 0, PATTERN_SRC, True, thread, e)
        errors += verify(sbuf, src_off, src_off + length, src_off, PATTERN_SRC | PATTERN_COPY, True, thread, e)
        errors += verify(sbuf, src_off + length, buf_size, src_off + length, PATTERN_SRC, True, thread, e)
        errors += verify(dbuf, 0, dst_off, 0, PATTERN_DST, False, thread, e)
        errors += verify(dbuf, dst_off, dst_off + length, src_off, PATTERN_SRC | PATTERN_COPY, False, thread, e)
        errors += verify(dbuf, dst_off + length, buf_size, dst_off + length, PATTERN_DST, False, thread, e)
        return errors


class _StopWaiting(Exception):
    """The run was stopped and the completion did not come within STOP_GRACE_S."""
