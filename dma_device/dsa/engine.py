"""The engines: run a descriptor (the ops over a ``BlockOnFault`` with the
WQ's block-on-fault policy), write its completion record (status byte last),
raise its interrupt, and send page requests."""

from __future__ import annotations

import threading
from dataclasses import replace

from dma_device.dsa.access import BlockOnFault, PageRequestOutcome
from dma_device.dsa.checks import fail
from dma_device.dsa.ops import OpContext, execute
from dma_device.dsa.queues import WorkQueues
from dma_device.dsa.state import (
    _BOF,
    _CRAV,
    _DATA_OPS,
    _PAGE_FAULT_IR,
    _PAGE_FAULT_NOBOF,
    _RCI,
    _RCR,
    _SUCCESS,
    SwError,
    _WorkQueue,
    log,
)
from pviommu.abi.dsa import (
    COMP_ALIGN,
    STATUS_MASK,
    CompletionRecord,
    Descriptor,
    DsaStatus,
    Opcode,
)
from pviommu.addr import Iova
from pviommu.mem.dma import DmaAccess, DmaFault


class Engine(WorkQueues):
    """The engine threads' loop and everything one descriptor does."""

    # ---- engines -------------------------------------------------------------------
    def _engine_loop(self, engine: int) -> None:
        ran = False
        while True:
            item = self._next(engine, poll=ran)
            if item is None:
                return
            ran = True
            wq, seq, d, epoch = item
            try:
                current = self.current_epoch
                if current is not None and current() != epoch:  # its owner is gone: no record, no DMA
                    self.counters.add("aborted_epoch")
                    continue
                pasid = (wq.cfg.pasid if wq.cfg.pasid_en else None) if wq.cfg.dedicated else d.pasid
                self._run(d, wq, self._memory_for(pasid), seq, pasid, epoch, in_batch=False)
            except Exception:  # a model bug must not kill the engine
                log.exception("dsa.engine_error", engine=engine, wq=wq.wq_id)
            finally:
                with self._cv:
                    wq.running.pop(seq, None)
                    self._cv.notify_all()

    def execute_now(self, wq_id: int, desc: bytes | bytearray | memoryview | Descriptor,
                    epoch: int = 0) -> CompletionRecord:
        """Run one descriptor of WQ ``wq_id`` on the caller's thread, as an
        engine would (same checks, ops, record write), without queueing it:
        the engine's own cost without the thread hand-off (benchmarks)."""
        d = desc if isinstance(desc, Descriptor) else Descriptor.unpack(desc)
        wq = self._wq(wq_id)
        pasid = (wq.cfg.pasid if wq.cfg.pasid_en else None) if wq.cfg.dedicated else d.pasid
        return self._run(d, wq, self._memory_for(pasid), next(self._seq), pasid, epoch, in_batch=False)

    def _wait_drain(self, wq: _WorkQueue, seq: int) -> None:
        """DRAIN: every descriptor submitted to this WQ before ``seq`` is done.
        (Earlier ones were dequeued first, so they are running or finished.)"""
        with self._cv:
            self._cv.wait_for(lambda: not any(s < seq for s in wq.running))

    def _run(self, d: Descriptor, wq: _WorkQueue, dma: DmaAccess, seq: int, pasid: int | None, epoch: int,
             *, in_batch: bool) -> CompletionRecord:
        """Execute one descriptor (or batch entry) and complete it."""
        fast = self.fast_memmove
        if fast is not None and not in_batch and d.opcode == Opcode.MEMMOVE:
            done = fast(d, self._limits(wq), dma)
            if done is not None:  # completed as the model completes it: its counters and interrupt
                rec, written = done
                if not written:
                    self.counters.count("descriptors", d.opcode)
                    self._complete(d, rec, dma, wq, pasid, epoch)  # writes the record if one is asked for
                    return rec
                c, rci = self.counters, d.flags & _RCI
                with c._lock:  # what count() and _complete() count, in one round trip
                    c.descriptors[d.opcode] += 1
                    c.completions[rec.status & STATUS_MASK] += 1
                    c.bytes += d.xfer_size
                    if rci:
                        c.interrupts += 1
                if rci and self.on_interrupt is not None:
                    self.on_interrupt(d.int_handle, epoch)
                return rec
        self.counters.count("descriptors", d.opcode)
        if d.flags & _CRAV and d.completion_addr % COMP_ALIGN:
            # idxd.h: DSA_COMP_CRA_ALIGN -- no record can be written: SWERR only.
            rec = fail(DsaStatus.CRA_ALIGN)
            self.counters.count("completions", rec.code)
            self._sw_error(SwError(rec.code, wq.wq_id, d.opcode, pasid, d.completion_addr))
            return rec
        def report(fault: DmaFault) -> None:
            self._report_fault(fault, epoch)

        mem = BlockOnFault(dma, block_on_fault=bool(d.flags & _BOF) and wq.cfg.bof,
                           page_request=lambda fault: self._page_request(replace(fault, epoch=epoch)),
                           on_fault=report)
        ctx = OpContext(
            mem=mem,
            limits=self._limits(wq),
            run_batch_entry=lambda sub: self._run(sub, wq, dma, seq, pasid, epoch, in_batch=True),
            drain=(lambda: None) if in_batch else (lambda: self._wait_drain(wq, seq)),
        )
        try:
            rec = execute(d, ctx, in_batch=in_batch)
        except Exception:
            log.exception("dsa.op_error", opcode=d.opcode)
            rec = fail(DsaStatus.HW_ERR1)
        self._complete(d, rec, dma, wq, pasid, epoch)
        return rec

    def _complete(self, d: Descriptor, rec: CompletionRecord, dma: DmaAccess, wq: _WorkQueue,
                  pasid: int | None, epoch: int) -> None:
        code = rec.status & STATUS_MASK
        if code == _SUCCESS:
            self.counters.completed(code, d.xfer_size if d.opcode in _DATA_OPS else 0)
        elif code == _PAGE_FAULT_NOBOF or code == _PAGE_FAULT_IR:
            self.counters.completed(code, rec.bytes_completed)
        else:
            self.counters.completed(code, 0)
        if not d.flags & _CRAV:
            if code != _SUCCESS:
                self._sw_error(SwError(code, wq.wq_id, d.opcode, pasid, rec.fault_addr,
                                       rec.invalid_flags if code == DsaStatus.INVALID_FLAGS else 0))
        elif d.flags & _RCR or code != _SUCCESS:
            res = dma.write_record(Iova(d.completion_addr), rec.pack())  # status byte last
            if res.fault is not None:
                self.counters.add("cr_faults")
                self._report_fault(res.fault, epoch)
                self._sw_error(SwError(int(DsaStatus.CRA_XLAT), wq.wq_id, d.opcode, pasid,
                                       int(res.fault.iova)))
                return
        if d.flags & _RCI and code != DsaStatus.INT_HANDLE_INVAL:
            self.counters.add("interrupts")
            if self.on_interrupt is not None:
                self.on_interrupt(d.int_handle, epoch)

    # ---- faults and errors -----------------------------------------------------------
    def _page_request(self, fault: DmaFault) -> PageRequestOutcome:
        """Send a page request and wait up to ``page_request_timeout``."""
        self.counters.add("page_requests")
        hook = self.on_page_request
        outcome = PageRequestOutcome.TIMEOUT
        if hook is not None:
            box: list[bool | None] = []
            answered = threading.Event()

            def call() -> None:
                try:
                    box.append(hook(fault))
                except Exception:
                    log.exception("dsa.page_request_hook_error")
                    box.append(False)
                finally:
                    answered.set()

            threading.Thread(target=call, name="dsa-prq", daemon=True).start()
            if answered.wait(self.config.page_request_timeout) and box:
                if box[0] is True:
                    outcome = PageRequestOutcome.RESOLVED
                elif box[0] is False:
                    outcome = PageRequestOutcome.REFUSED
        self.counters.count("page_request_outcomes", outcome.value)
        return outcome

