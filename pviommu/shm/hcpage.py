"""The guest's side of the hypercall page (layout in ``pviommu.abi.shm``,
frames in docs/transports.md): the raw TLFS ABI of ``Hypervisor/HvCall``
written into shared memory, with a doorbell each way.

A call fills the input page, the input value and length, then bumps
``seq_request``; the hypervisor's session thread, polling or woken by the
request doorbell, runs it through the same function as ``HvCall`` and sets
``seq_done``. The caller polls for that briefly, then sleeps on the
completion doorbell. One call at a time per page (a lock); the session
socket stays open while the page lives: its end tells that the hypervisor
is gone, and the hypervisor closes the page when the partition is reset or
destroyed (``host_state`` CLOSED, ``close_reason`` OWNER_CHANGED).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from pviommu.abi import shm as L
from pviommu.shm.sessions import SessionError, open_region_session, peer_alive

#: how long a caller polls for the result before it sleeps on the completion doorbell
GUEST_SPIN_S = 0.002
#: sleep slices while waiting (each rechecks the closed flag and the socket)
_SLICE_S = 0.05


class PageClosed(Exception):
    """The page can no longer be used: closed by the hypervisor (``reason``),
    the hypervisor is gone, or a call did not finish in time."""

    def __init__(self, reason: L.CloseReason, detail: str = "") -> None:
        super().__init__(f"the hypercall page is closed: {reason.name}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True)
class PageAnswer:
    """What ``HvCall`` answers: the TLFS result value, the packed output, and a message."""

    result_value: int
    output: bytes
    message: str

    @property
    def status(self) -> int:
        return self.result_value & 0xFFFF

    @property
    def reps_completed(self) -> int:
        return (self.result_value >> 32) & 0xFFF


class HypercallPage:
    """One hypercall page session of the partition whose ``token`` opens it."""

    def __init__(self, path: str, token: str, *, timeout: float = 10.0) -> None:
        try:
            opened = open_region_session(path, {"token": token, "kind": "hypercall_page"}, doorbells=2,
                                         timeout=timeout)
        except SessionError as exc:
            if exc.code != "PROTOCOL_ERROR":
                raise
            raise PageClosed(L.CloseReason.PROTOCOL_ERROR, str(exc)) from exc
        self.region, self.sock, self.session = opened.region, opened.sock, opened.session
        self.partition_id = int(opened.reply.get("partition_id", 0))
        self.request_bell, self.done_bell = opened.doorbells
        self.timeout = timeout
        self._lock = threading.Lock()
        self._broken: PageClosed | None = None
        r = self.region
        if r.size < L.HCPAGE_BYTES or r.u64(L.HC_MAGIC) != L.HCPAGE_MAGIC or r.u32(L.HC_VERSION) != L.HCPAGE_VERSION:
            self.close()
            raise PageClosed(L.CloseReason.PROTOCOL_ERROR, "not a version-1 pviommu hypercall page")

    @property
    def closed(self) -> bool:
        return self._broken is not None or self.region.u32(L.HC_HOST_STATE) == L.ConsumerState.CLOSED

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        r = self.region
        if r.u32(L.HC_HOST_STATE) == L.ConsumerState.CLOSED:
            raw = r.u32(L.HC_CLOSE_REASON)
            reason = L.CloseReason(raw) if raw in L.CloseReason._value2member_map_ else L.CloseReason.PROTOCOL_ERROR
            self._broken = PageClosed(reason)
            raise self._broken

    def call(self, input_value: int, data: bytes) -> PageAnswer:
        """One raw hypercall; ``PageClosed`` when the page is (or went) unusable."""
        if len(data) > L.PAGE:
            raise ValueError(f"{len(data)} bytes of input: the input page holds {L.PAGE}")
        with self._lock:
            self._check()
            r = self.region
            seq = r.u64(L.HC_SEQ_REQUEST) + 1
            r.view[L.HC_INPUT : L.HC_INPUT + len(data)] = data
            r.set_u32(L.HC_INPUT_LEN, len(data))
            r.set_u64(L.HC_INPUT_VALUE, input_value)
            r.set_u64(L.HC_SEQ_REQUEST, seq)
            if r.u32(L.HC_HOST_STATE) == L.ConsumerState.SLEEPING:
                self.request_bell.ring()
            self._wait(seq)
            n = min(r.u32(L.HC_OUTPUT_LEN), L.PAGE)
            m = min(r.u32(L.HC_MESSAGE_LEN), L.HC_MESSAGE_MAX)
            return PageAnswer(r.u64(L.HC_RESULT_VALUE), bytes(r.view[L.HC_OUTPUT : L.HC_OUTPUT + n]),
                              bytes(r.view[L.HC_MESSAGE : L.HC_MESSAGE + m]).decode(errors="replace"))

    def _wait(self, seq: int) -> None:
        r = self.region
        now = time.monotonic()
        spin_end, deadline = now + GUEST_SPIN_S, now + self.timeout
        while r.u64(L.HC_SEQ_DONE) != seq:
            now = time.monotonic()
            if now < spin_end:
                os.sched_yield()  # time.sleep(0) would cost the timer slack
                continue
            self._check()
            if now > deadline:
                self._broken = PageClosed(L.CloseReason.PROTOCOL_ERROR, f"no answer in {self.timeout:.0f} s")
                raise self._broken
            if not peer_alive(self.sock):
                self._broken = PageClosed(L.CloseReason.SERVICE_STOPPED, "the hypervisor's process is gone")
                raise self._broken
            r.set_u32(L.HC_GUEST_STATE, 1)
            try:
                if r.u64(L.HC_SEQ_DONE) == seq:
                    break
                self.done_bell.wait(_SLICE_S)
            finally:
                r.set_u32(L.HC_GUEST_STATE, 0)

    def close(self) -> None:
        with self._lock:
            self._broken = self._broken or PageClosed(L.CloseReason.CLIENT_CLOSED)
            self.sock.close()
            self.request_bell.close()
            self.done_bell.close()
            self.region.close()
