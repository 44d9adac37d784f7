"""dmatest, after Linux ``drivers/dma/dmatest.c`` (reference dsa-dmatest.md section 6).

Per channel ``threads_per_chan`` threads named ``<chan>-copy<N>``; each owns a
source and a destination buffer of ``test_buf_size`` bytes and, per test:
picks ``len``/``src_off``/``dst_off`` as dmatest does, fills both buffers with
the counter patterns, maps them through the DMA API (``dma_map_page`` per
test, source TO_DEVICE and destination FROM_DEVICE, so every test exercises
map, unmap and the IOTLB flush policy), submits one MEMMOVE, waits for its
completion record, unmaps, and verifies the whole of both buffers. Messages,
result and summary lines are dmatest's, word for word; the runtime excludes
fill and verify time as dmatest's does. With a seed the run is deterministic
(each thread has its own ``random.Random``).
"""

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
from guest_agent.dsa.driver import DsaDriver, wait_completion, wq_int_handle
from guest_agent.errors import InvalidRequest
from pviommu.abi.dsa import COMP_SIZE, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import PAGE_SIZE, Gpa
from pviommu.errors import PviommuError
from pviommu.log import get_logger

log = get_logger("guest.dmatest")

PATTERN_SRC = 0x80
PATTERN_DST = 0x00
PATTERN_COPY = 0x40
PATTERN_OVERWRITE = 0x20
PATTERN_COUNT_MASK = 0x1F
MAX_ERROR_COUNT = 32
FIXPT_SHIFT = 8
#: Completion records per thread (one 4 KiB coherent page of 32-byte records);
#: rotating them keeps a late record of a timed-out test from being read as the next one's.
RECORDS_PER_PAGE = PAGE_SIZE // COMP_SIZE
UINT_MAX = 0xFFFF_FFFF


@dataclass
class DmatestParams:
    """The module parameters (names kept)."""

    test_buf_size: int = 16384
    threads_per_chan: int = 1
    max_channels: int = 0
    iterations: int = 0
    timeout: int = 3000  # ms, -1 = infinite
    noverify: bool = False
    norandom: bool = False
    alignment: int = -1
    transfer_size: int = 0
    polled: bool = False
    design: str = "nested"
    seed: int = 0
    duration_s: float = 0.0


@dataclass
class ThreadResult:
    name: str
    tests: int = 0
    failures: int = 0
    runtime_us: int = 0
    total_len: int = 0
    status: int = 0

    @property
    def iops_fixpt(self) -> int:
        return persec(self.runtime_us, self.tests)

    @property
    def kbs(self) -> int:
        return kbs(self.runtime_us, self.total_len)


@dataclass
class DmatestOutcome:
    threads: list[ThreadResult]
    lines: list[str]
    summary: str
    runtime_s: float
    tests: int = 0
    failures: int = 0
    iops: float = 0.0
    kb_per_s: float = 0.0


# -- dmatest.c arithmetic ------------------------------------------------------------------
def persec(runtime_us: int, val: int) -> int:
    """``dmatest_persec``: val per second in 8-bit fixed point."""
    per_sec = 1_000_000
    if runtime_us <= 0:
        return 0
    while runtime_us > UINT_MAX:  # drop precision until runtime is 32 bits
        runtime_us >>= 1
        per_sec <<= 1
    per_sec *= val
    return (per_sec << FIXPT_SHIFT) // runtime_us


def kbs(runtime_us: int, total_len: int) -> int:
    """``dmatest_KBs``."""
    return persec(runtime_us, total_len >> 10) >> FIXPT_SHIFT


def summary_line(name: str, tests: int, failures: int, runtime_us: int, total_len: int, ret: int = 0) -> str:
    iops = persec(runtime_us, tests)
    frac = ((iops & 0xFF) * 100) >> FIXPT_SHIFT
    return (f"{name}: summary {tests} tests, {failures} failures {iops >> FIXPT_SHIFT}.{frac:02d} iops "
            f"{kbs(runtime_us, total_len)} KB/s ({ret})")


def result_line(name: str, n: int, err: str, src_off: int, dst_off: int, length: int, data: int) -> str:
    return (f"dmatest: {name}: result #{n}: '{err}' with src_off=0x{src_off:x} dst_off=0x{dst_off:x} "
            f"len=0x{length:x} ({data})")


# -- patterns -----------------------------------------------------------------------------
class Patterns:
    """The counter patterns of one buffer size, precomputed as byte strings
    (byte i = base | (~i & 0x1f)) so fill and verify run at memcpy speed."""

    def __init__(self, buf_size: int) -> None:
        ctr = bytes((~i) & PATTERN_COUNT_MASK for i in range(buf_size))
        self.src = ctr.translate(bytes((b | PATTERN_SRC) & 0xFF for b in range(256)))
        self.src_copy = ctr.translate(bytes((b | PATTERN_SRC | PATTERN_COPY) & 0xFF for b in range(256)))
        self.dst = ctr.translate(bytes((b | PATTERN_DST) & 0xFF for b in range(256)))
        self.dst_over = ctr.translate(bytes((b | PATTERN_DST | PATTERN_OVERWRITE) & 0xFF for b in range(256)))

    def src_image(self, off: int, length: int) -> bytes:
        return self.src[:off] + self.src_copy[off:off + length] + self.src[off + length:]

    def dst_image(self, off: int, length: int) -> bytes:
        return self.dst[:off] + self.dst_over[off:off + length] + self.dst[off + length:]

    def dst_expected(self, src_off: int, dst_off: int, length: int) -> bytes:
        return self.dst[:dst_off] + self.src_copy[src_off:src_off + length] + self.dst[dst_off + length:]


def verify(buf: bytes, start: int, end: int, counter: int, pattern: int, is_srcbuf: bool,
           thread: str, emit: Callable[[str], None]) -> int:
    """``dmatest_verify`` over ``buf[start:end]`` with its mismatch messages."""
    errors = 0
    for i in range(start, end):
        actual = buf[i]
        expected = pattern | ((~counter) & PATTERN_COUNT_MASK)
        if actual != expected:
            if errors < MAX_ERROR_COUNT:
                emit(mismatch_line(actual, pattern, i, counter, is_srcbuf, thread))
            errors += 1
        counter += 1
    if errors > MAX_ERROR_COUNT:
        emit(f"dmatest: {thread}: {errors - MAX_ERROR_COUNT} errors suppressed")
    return errors


def mismatch_line(actual: int, pattern: int, index: int, counter: int, is_srcbuf: bool, thread: str) -> str:
    """``dmatest_mismatch``."""
    diff = actual ^ pattern
    expected = pattern | ((~counter) & PATTERN_COUNT_MASK)
    if is_srcbuf:
        what = f"srcbuf[0x{index:x}] overwritten!"
    elif pattern & PATTERN_COPY and diff & (PATTERN_COPY | PATTERN_OVERWRITE):
        what = f"dstbuf[0x{index:x}] not copied!"
    elif diff & PATTERN_SRC:
        what = f"dstbuf[0x{index:x}] was copied!"
    else:
        what = f"dstbuf[0x{index:x}] mismatch!"
    return f"dmatest: {thread}: {what} Expected {expected:02x}, got {actual:02x}"


# -- the run --------------------------------------------------------------------------------
@dataclass
class Channel:
    driver: DsaDriver
    device: DeviceState
    restore: Domain | None = None
    test_domain: Domain | None = None
    results: list[ThreadResult] = field(default_factory=list)


class Dmatest:
    """One dmatest run over the given channels."""

    def __init__(self, iommu: PvIommu, dma: DmaApi, memory: GuestMemory, channels: list[tuple[DsaDriver, DeviceState]],
                 params: DmatestParams, emit: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
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
        chans = channels if not params.max_channels else channels[:params.max_channels]
        self.channels = [Channel(d, dev) for d, dev in chans]
        self._check()
        self.patterns = Patterns(params.test_buf_size)

    def emit(self, line: str) -> None:
        with self._lines_lock:
            self.lines.append(line)
        if self._emit_cb is not None:
            self._emit_cb(line)

    def _check(self) -> None:
        p = self.params
        if not self.channels:
            raise InvalidRequest("dmatest: no DSA channel is available in this guest")
        if p.test_buf_size <= 0:
            raise InvalidRequest("dmatest: test_buf_size must be > 0")
        if p.iterations <= 0 and p.duration_s <= 0:
            raise InvalidRequest("dmatest: give iterations > 0 or duration_s > 0 (a run must end)")
        if p.transfer_size and p.transfer_size >= p.test_buf_size:
            raise InvalidRequest(f"{p.transfer_size}-byte transfer size must be lower than "
                                 f"{p.test_buf_size}-buffer size")
        align = max(0, p.alignment)
        if 1 << align > p.test_buf_size:
            raise InvalidRequest(f"{p.test_buf_size}-byte buffer too small for {1 << align}-byte alignment")
        if p.design not in ("nested", "baseline", ""):
            raise InvalidRequest(f"dmatest: design {p.design!r} is not 'nested' or 'baseline'")
        for ch in self.channels:
            if ch.driver.max_xfer and min(p.test_buf_size, p.transfer_size or p.test_buf_size) > ch.driver.max_xfer:
                raise InvalidRequest(f"dmatest: {p.test_buf_size}-byte buffers exceed {ch.driver.name}'s "
                                     f"max transfer of {ch.driver.max_xfer} bytes")

    def _progress(self) -> None:
        with self._lines_lock:
            self._done += 1
            done = self._done
        if self._progress_cb is not None:
            self._progress_cb(done)

    def stop(self) -> None:
        self._stop.set()

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
            except PviommuError as exc:
                log.warning("dmatest.restore_failed", device=ch.device.logical_device_id, error=str(exc))

    def run(self) -> DmatestOutcome:
        p = self.params
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
        summary = summary_line("dmatest", tests, failures, runtime_us, total_len)
        iops = persec(runtime_us, tests) / (1 << FIXPT_SHIFT)
        return DmatestOutcome(results, list(self.lines), summary, wall, tests, failures, iops,
                              float(kbs(runtime_us, total_len)))

    # -- one thread --------------------------------------------------------------------------
    def _thread_main(self, ch: Channel, index: int, res: ThreadResult) -> None:
        try:
            self._thread(ch, index, res)
        except Exception as exc:  # a thread that dies still reports, as dmatest's does
            log.exception("dmatest.thread_failed", thread=res.name)
            res.status = -5  # -EIO
            # The test in flight did not pass (its device or hypervisor went away): a failure.
            res.failures += 1
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            self.emit(f"dmatest: {res.name}: result #{res.tests}: 'submit error' ({res.status}): "
                      f"{type(exc).__name__}: {detail}")
        self.emit("dmatest: " + summary_line(res.name, res.tests, res.failures, res.runtime_us, res.total_len,
                                             res.status))

    def _thread(self, ch: Channel, index: int, res: ThreadResult) -> None:
        p, drv, dev, pat = self.params, ch.driver, ch.device, self.patterns
        ram = self.memory.ram
        rng = random.Random(f"{p.seed}:{drv.index}:{index}")
        buf_size = p.test_buf_size
        align = max(0, p.alignment)  # idxd sets no copy_align: -1 means 0
        timeout_s = None if p.timeout < 0 else p.timeout / 1000
        src = self.memory.alloc(buf_size)
        dst = self.memory.alloc(buf_size)
        records = self.dma.alloc_coherent(dev, PAGE_SIZE)
        filltime = comparetime = 0.0
        deadline = time.perf_counter() + p.duration_s if p.duration_s > 0 else None
        started = time.perf_counter()
        try:
            while not self._stop.is_set():
                if p.iterations and res.tests >= p.iterations:
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                res.tests += 1
                n = res.tests
                if p.transfer_size:
                    length = p.transfer_size
                elif p.norandom:
                    length = buf_size
                else:
                    length = rng.randrange(1 << 32) % buf_size + 1
                if not p.transfer_size:
                    length = (length >> align) << align or 1 << align
                res.total_len += length
                if p.norandom:
                    src_off = dst_off = 0
                else:
                    src_off = rng.randrange(1 << 32) % (buf_size - length + 1)
                    dst_off = rng.randrange(1 << 32) % (buf_size - length + 1)
                    src_off = (src_off >> align) << align
                    dst_off = (dst_off >> align) << align
                if not p.noverify:
                    t0 = time.perf_counter()
                    ram.write(src, pat.src_image(src_off, length))
                    ram.write(dst, pat.dst_image(dst_off, length))
                    filltime += time.perf_counter() - t0
                err = self._one(drv, dev, src, dst, records.mapping, records.gpa, n, src_off, dst_off, length,
                                timeout_s)
                if err is not None:
                    res.failures += 1
                    self.emit(result_line(res.name, n, err[0], src_off, dst_off, length, err[1]))
                    self._progress()
                    continue
                if not p.noverify:
                    t0 = time.perf_counter()
                    errors = self._verify(res.name, src, dst, src_off, dst_off, length)
                    comparetime += time.perf_counter() - t0
                    if errors:
                        res.failures += 1
                        self.emit(result_line(res.name, n, "data error", src_off, dst_off, length, errors))
                self._progress()
        finally:
            runtime = time.perf_counter() - started - filltime - comparetime
            res.runtime_us = max(0, int(runtime * 1_000_000))
            self.dma.free_coherent(records)
            self.memory.free(src)
            self.memory.free(dst)

    def _one(self, drv: DsaDriver, dev: DeviceState, src: Gpa, dst: Gpa, records: DmaMapping, records_gpa: Gpa,
             n: int, src_off: int, dst_off: int, length: int, timeout_s: float | None) -> tuple[str, int] | None:
        """Map, submit, wait, unmap one test; the failure (text, value) or None."""
        try:
            srcm = self.dma.map_single(dev, src, self.params.test_buf_size, Direction.TO_DEVICE)
        except PviommuError as exc:
            log.warning("dmatest.map_failed", which="src", error=str(exc))
            return "src mapping error", 0
        try:
            dstm = self.dma.map_single(dev, dst, self.params.test_buf_size, Direction.FROM_DEVICE)
        except PviommuError as exc:
            self.dma.unmap(srcm)
            log.warning("dmatest.map_failed", which="dst", error=str(exc))
            return "dst mapping error", 0
        slot = n % RECORDS_PER_PAGE
        rec_gpa = Gpa(records_gpa + slot * COMP_SIZE)
        self.memory.ram.write(rec_gpa, bytes(COMP_SIZE))
        # dmatest's flags: DMA_PREP_INTERRUPT unless polled. With it the descriptor asks for a
        # completion interrupt (RCI, the WQ's vector as idxd sets it) and the wait wakes on the
        # interrupt; polled, no interrupt is raised and the record is polled. (Linux turns polled
        # off on idxd; here both work, and polled is the faster one through gRPC interrupts.)
        irq = not self.params.polled and drv.wq is not None and drv.interrupts is not None
        flags = DescFlags.CRAV | DescFlags.RCR | (DescFlags.RCI if irq else DescFlags(0))
        desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(flags),
                          int_handle=wq_int_handle(drv.wq.wq_id) if irq and drv.wq is not None else 0,
                          completion_addr=records.dma_addr + slot * COMP_SIZE,
                          src_addr=srcm.dma_addr + src_off, dst_addr=dstm.dma_addr + dst_off,
                          xfer_size=length).pack()
        try:
            if not drv.acquire_slot(timeout_s):
                return "submit error", -16  # -EBUSY
            try:
                accepted = drv.submit(desc)
                if not accepted:
                    time.sleep(0.1)  # dmatest: msleep(100) after a submit error
                    return "submit error", -16
                rec = wait_completion(self.memory.ram, rec_gpa, timeout_s, drv.check_portal,
                                      drv.interrupts.wait if irq and drv.interrupts is not None else None)
            finally:
                drv.release_slot()
        finally:
            self.dma.unmap(srcm)
            self.dma.unmap(dstm)
        if rec is None:
            return "test timed out", 0
        if rec.code != DsaStatus.SUCCESS:
            log.warning("dmatest.completion_error", status=hex(rec.status), bytes_completed=rec.bytes_completed,
                        fault_addr=hex(rec.fault_addr))
            return "completion error status", 0
        return None

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
