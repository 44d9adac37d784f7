"""The hypervisor's hypercall pages (docs/transports.md): the raw ABI of
``Hypervisor/HvCall`` in shared memory, one page per session.

A partition's credential holder opens a session on the hypervisor's session
socket (``pviommu.shm.sessions``: the token is checked like a gRPC
credential, so the page and its doorbells reach only that partition) and
gets a memfd of ``HCPAGE_BYTES`` and two eventfds. Each session has its own
thread, which polls ``seq_request`` for ``HOST_SPIN_S`` after every call
and then sleeps on the request doorbell; calls run through
``Hypercalls.raw_call``, the function ``HvCall`` uses, so both transports
give the same answers byte for byte. A slow call (a stalled unit) holds
only its own session's thread.

Sessions are bounded per partition (RESOURCE_EXHAUSTED beyond) and end with
the partition: a reset or destroy closes them (``close_reason``
OWNER_CHANGED) and no call of an old session runs after it, because each
call checks, under the partition's lock, that the partition and token it
was opened for are still current.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls, RawAnswer
from hypervisor_svc.core.model import Partition
from pviommu.abi import shm as L
from pviommu.abi.hv.values import HypercallResult
from pviommu.abi.hv_status import HvStatus
from pviommu.log import get_logger
from pviommu.rpc.auth import tokens_equal
from pviommu.shm.region import Doorbell, Region, adaptive_wait
from pviommu.shm.sessions import Opened, Opener, SessionRefused

log = get_logger("hypervisor.hcpage")

#: how long a session's thread polls the page after a call before it sleeps on the doorbell, when the
#: last call came at most this long after the one before (else ``HOST_SPIN_MIN_S``)
HOST_SPIN_S = 0.001
HOST_SPIN_MIN_S = 0.00005
#: hypercall pages one partition may hold at once (the default of ``--hypercall-page-sessions``)
SESSIONS_PER_PARTITION = 4


@dataclass(eq=False)
class PageSession:
    id: int
    partition: Partition
    token: str
    region: Region
    request_bell: Doorbell
    done_bell: Doorbell
    calls: int = 0
    stop: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


def partition_of(host: Host, request: dict[str, object]) -> tuple[Partition, str]:
    """The partition whose credential a session request carries (SessionRefused otherwise):
    data-plane sessions go to a partition's credential holder only."""
    token = request.get("token")
    principal = host.resolve(token) if isinstance(token, str) and token else None
    if principal is None or not isinstance(token, str):
        raise SessionRefused("UNAUTHENTICATED", "the token is no partition's credential on this hypervisor")
    if principal.kind != "partition":
        raise SessionRefused("PERMISSION_DENIED", f"a {principal.kind} credential gets no data-plane session: "
                                                  "only a partition makes hypercalls and takes faults")
    with host.lock:
        part = host.partitions.get(principal.id)
    if part is None or not tokens_equal(token, part.token):
        raise SessionRefused("UNAUTHENTICATED", "the partition was reset or destroyed meanwhile")
    return part, token


def session_opener(openers: dict[str, Opener]) -> Opener:
    """One session socket for several kinds: dispatch on the request's ``kind``."""
    def open_session(request: dict[str, object]) -> Opened:
        kind = request.get("kind")
        opener = openers.get(kind) if isinstance(kind, str) else None
        if opener is None:
            raise SessionRefused("INVALID_ARGUMENT", f"unknown session kind {kind!r} ({', '.join(sorted(openers))})")
        return opener(request)
    return open_session


class HcPages:
    """The hypercall-page sessions of one hypervisor (an opener of its SessionServer)."""

    def __init__(self, host: Host, calls: Hypercalls, *, per_partition: int = SESSIONS_PER_PARTITION) -> None:
        self.host = host
        self.calls = calls
        self.per_partition = per_partition
        self._lock = threading.Lock()
        self._sessions: dict[int, PageSession] = {}
        self._ids = itertools.count(1)
        self.refused = 0
        self.opened = 0
        self.closed = 0
        host.on_partition_end.append(self.partition_ended)

    # -- opening (the session socket's thread) -----------------------------------------------
    def open(self, request: dict[str, object]) -> Opened:
        part, token = partition_of(self.host, request)
        with self._lock:
            held = sum(1 for s in self._sessions.values() if s.partition is part and not s.stop)
            if held >= self.per_partition:
                self.refused += 1
                raise SessionRefused("RESOURCE_EXHAUSTED",
                                     f"partition {part.partition_id} holds {held} hypercall pages (the limit); "
                                     "close one first")
            sid = next(self._ids)
            region = Region.create(f"pviommu-hcpage-{sid}", L.HCPAGE_BYTES)
            region.set_u32(L.HC_VERSION, L.HCPAGE_VERSION)
            region.set_u64(L.HC_MAGIC, L.HCPAGE_MAGIC)
            s = PageSession(sid, part, token, region, Doorbell(), Doorbell())
            self._sessions[sid] = s
        s.thread = threading.Thread(target=self._serve, args=(s,), name=f"hcpage-{sid}", daemon=True)
        s.thread.start()
        self.opened += 1
        log.info("hcpage.opened", partition=part.partition_id, session=sid)
        return Opened({"session": sid, "kind": "hypercall_page", "version": L.HCPAGE_VERSION,
                       "bytes": L.HCPAGE_BYTES, "partition_id": part.partition_id},
                      [region.fd, s.request_bell.fd, s.done_bell.fd],
                      lambda: self._end(sid, L.CloseReason.CLIENT_CLOSED))

    # -- serving (one thread per session) ----------------------------------------------------
    def _serve(self, s: PageSession) -> None:
        r = s.region

        def ready() -> bool:
            return s.stop or r.u64(L.HC_SEQ_REQUEST) != r.u64(L.HC_SEQ_DONE)

        def announce(sleeping: bool) -> None:
            if not s.stop:
                r.set_u32(L.HC_HOST_STATE, L.ConsumerState.SLEEPING if sleeping else L.ConsumerState.POLLING)

        gap = HOST_SPIN_S  # the idle time before the last call
        done_at = time.monotonic()
        try:
            while True:
                # poll long only while calls come close together (the last one came within the window):
                # a page used now and then sleeps soon and leaves the CPU to the units and guests
                spin = HOST_SPIN_S if gap <= HOST_SPIN_S else HOST_SPIN_MIN_S
                adaptive_wait(ready, s.request_bell, spin_s=spin, timeout=None, announce_sleep=announce)
                if s.stop:
                    return
                now = time.monotonic()
                gap = now - done_at
                seq = r.u64(L.HC_SEQ_REQUEST)
                answer = self._run(s)
                if answer is None:  # the partition ended under this call: nothing ran
                    return
                out = answer.output[: L.PAGE]
                msg = answer.message.encode()[: L.HC_MESSAGE_MAX]
                r.view[L.HC_OUTPUT : L.HC_OUTPUT + len(out)] = out
                r.set_u32(L.HC_OUTPUT_LEN, len(out))
                r.view[L.HC_MESSAGE : L.HC_MESSAGE + len(msg)] = msg
                r.set_u32(L.HC_MESSAGE_LEN, len(msg))
                r.set_u64(L.HC_RESULT_VALUE, answer.result_value)
                r.set_u64(L.HC_SEQ_DONE, seq)
                s.calls += 1
                self.host.counters.count("hcpage_calls")
                if r.u32(L.HC_GUEST_STATE) == 1:
                    s.done_bell.ring()
                done_at = time.monotonic()
        except Exception:  # a bug: the page ends, the service goes on
            log.exception("hcpage.failed", session=s.id)
            self._close(s, L.CloseReason.PROTOCOL_ERROR)
        finally:
            self._release(s)

    def _run(self, s: PageSession) -> RawAnswer | None:
        r = s.region
        value = r.u64(L.HC_INPUT_VALUE)
        length = r.u32(L.HC_INPUT_LEN)
        if length > L.PAGE:
            return RawAnswer(HypercallResult(HvStatus.INVALID_HYPERCALL_INPUT, 0).encode(), b"",
                             f"input_len {length}: the input page holds {L.PAGE} bytes")
        data = bytes(r.view[L.HC_INPUT : L.HC_INPUT + length])
        part = s.partition
        with part.lock:  # a reset or destroy either waits for this call or comes before it (and ends s)
            with self.host.lock:
                current = self.host.partitions.get(part.partition_id) is part and tokens_equal(s.token, part.token)
            if s.stop or not current:
                self._close(s, L.CloseReason.OWNER_CHANGED)
                return None
            return self.calls.raw_call(part, value, data)

    # -- ending ------------------------------------------------------------------------------
    def _close(self, s: PageSession, reason: L.CloseReason) -> None:
        """Mark the page closed (the guest sees it at its next look) and stop its thread.
        Under the lock, so a doorbell is never rung after ``_release`` closed its fd."""
        with self._lock:
            if self._sessions.get(s.id) is not s:
                return  # released already
            if not s.stop:
                s.region.set_u32(L.HC_CLOSE_REASON, reason)
                s.region.set_u32(L.HC_HOST_STATE, L.ConsumerState.CLOSED)
            s.stop = True
            s.request_bell.ring()
            s.done_bell.ring()

    def _release(self, s: PageSession) -> None:
        with self._lock:
            if self._sessions.pop(s.id, None) is None:
                return
            if not s.stop:  # the thread ended on its own (a bug): the guest must still learn it
                s.region.set_u32(L.HC_CLOSE_REASON, L.CloseReason.PROTOCOL_ERROR)
                s.region.set_u32(L.HC_HOST_STATE, L.ConsumerState.CLOSED)
                s.stop = True
            s.request_bell.close()
            s.done_bell.close()
            s.region.close()
        self.closed += 1
        log.info("hcpage.closed", partition=s.partition.partition_id, session=s.id, calls=s.calls)

    def _end(self, sid: int, reason: L.CloseReason) -> None:
        with self._lock:
            s = self._sessions.get(sid)
        if s is not None:
            self._close(s, reason)

    def partition_ended(self, part: Partition) -> None:
        """Reset or destroyed: its pages close (OWNER_CHANGED)."""
        with self._lock:
            ended = [s for s in self._sessions.values() if s.partition is part]
        for s in ended:
            self._close(s, L.CloseReason.OWNER_CHANGED)

    def held(self, partition_id: int) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.partition.partition_id == partition_id and not s.stop)

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            self._close(s, L.CloseReason.SERVICE_STOPPED)
        for s in sessions:
            if s.thread is not None:
                s.thread.join(5)
