"""DSA driver: capabilities, WQ set-up, portal submission, completion polling.

After Linux idxd (reference dsa-dmatest.md sections 1-4):

* ``probe``: GetCapabilities, then use an enabled WQ if there is one
  (dedicated preferred), else configure WQ 0 as the kernel does by default
  (dedicated, size 16, priority 10, group 0), enable the device and the WQ.
* submission goes through a ``Portal`` stream, one per submitting thread (as
  each CPU writes its own portal). A dedicated WQ is MOVDIR64B: posted, no
  feedback (the submission is marked ``posted`` and the device sends no ack),
  and a descriptor arriving at a full WQ is dropped, so the driver never has
  more than ``wq size`` descriptors outstanding (a semaphore, like the
  kernel's descriptor pool sized to the WQ). A shared WQ is ENQCMDS: the
  driver waits for the ack, ``accepted=false`` means retry, up to
  ``ENQCMDS_RETRIES`` (32) times. A portal stream that breaks (the device
  died, or it refused a posted write) is noticed by the next write or by a
  completion wait on that thread, which raise the stream's error.
* completion: the record lives in guest RAM (coherent DMA memory, mapped
  writable for the device); the device writes the status byte last, so the
  driver polls that one byte with short sleeps and backoff until it is
  non-zero or the timeout passes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from guest_agent.dsa.portal import PortalClosed, ShmInterrupts, ShmPortal
from guest_agent.errors import DeviceCommandFailed, InvalidRequest
from pviommu.abi.dsa import COMP_ALIGN, COMP_SIZE, DESC_SIZE, Cmd, CmdErr, CompletionRecord, DsaStatus, GenCap
from pviommu.addr import Gpa
from pviommu.log import get_logger
from pviommu.mem.bank import GuestRam
from pviommu.rpc.client import connect
from pviommu.shm.sessions import SessionError
from pviommu.v1 import common_pb2, dsa_pb2, dsa_pb2_grpc

log = get_logger("guest.dsa")

#: idxd enqcmds_retries default.
ENQCMDS_RETRIES = 32
#: shared-memory portal sessions one driver opens at most (its submitters share them)
MAX_PORTALS = 16
#: Kernel defaults for a WQ it configures.
DEFAULT_WQ_SIZE = 16
DEFAULT_WQ_PRIORITY = 10
_STOP = object()
#: Completion polling (``wait_completion``): spin (yielding) this long, then sleep between polls,
#: backing off after ``POLL_FAST_S`` (why these values: docs/benchmarks.md, "Waiting for a completion").
POLL_SPIN_S = 0.0001
POLL_SLEEP_S = 0.0001
POLL_FAST_S = 0.002


def status_name(code: int) -> str:
    try:
        return "DSA_COMP_" + DsaStatus(code & 0x7F).name
    except ValueError:
        return f"DSA_COMP_{code:#04x}"


@dataclass(frozen=True)
class WqInfo:
    wq_id: int
    dedicated: bool
    size: int


def wait_completion(ram: GuestRam, gpa: Gpa, timeout_s: float | None,
                    check: Callable[[], None] | None = None,
                    wake: Callable[[float], None] | None = None) -> CompletionRecord | None:
    """Poll the record's status byte until the device wrote it (None on timeout):
    spin for ``POLL_SPIN_S`` yielding the CPU (a warm descriptor completes in
    tens of microseconds), then sleep ``POLL_SLEEP_S`` between polls, backing
    off to 1 ms after ``POLL_FAST_S`` so a long wait costs little CPU.
    ``check`` (called before each sleep) raises when the completion can no
    longer come (``DsaDriver.check_portal``: this thread's portal is over);
    ``wake(delay)`` replaces the sleep when completion interrupts are on and
    returns early on an interrupt (``Interrupts.wait``)."""
    start = time.monotonic()
    deadline = None if timeout_s is None or timeout_s < 0 else start + timeout_s
    delay = POLL_SLEEP_S
    view = ram.view(gpa, COMP_SIZE)
    try:
        while True:
            if view[0]:
                return CompletionRecord.unpack(bytes(view))
            now = time.monotonic()
            if now - start < POLL_SPIN_S:
                os.sched_yield()  # time.sleep(0) would cost the timer slack (50-100 us)
                continue
            if deadline is not None and now >= deadline:
                return None
            if check is not None:
                check()
            if now - start > POLL_FAST_S:
                delay = min(0.001, delay * 2)
            if wake is not None:
                wake(delay)
            else:
                time.sleep(delay)
    finally:
        view.release()


class PortalSession:
    """One submitter's portal stream (bidirectional: descriptors in, acks of
    the non-posted ones out)."""

    def __init__(self, stub: dsa_pb2_grpc.DsaDeviceStub) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._tag = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._acks: Iterator[dsa_pb2.SubmissionAck] = stub.Portal(self._requests())
        add_done_callback = getattr(self._acks, "add_done_callback", None)
        if add_done_callback is not None:
            add_done_callback(self._ended)

    def _requests(self) -> Iterator[dsa_pb2.Submission]:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            assert isinstance(item, dsa_pb2.Submission)
            yield item

    def _ended(self, call: object) -> None:
        """The stream ended (gRPC thread): unless we closed it, every later
        write or completion wait on this portal raises."""
        if self._closed:
            return
        if isinstance(call, grpc.RpcError):
            self._broken = call
        else:
            self._broken = DeviceCommandFailed("the portal stream ended")

    def check(self) -> None:
        """Raise the stream's error if it broke."""
        if self._broken is not None:
            raise self._broken

    def post(self, wq_id: int, descriptor: bytes) -> None:
        """One posted portal write (MOVDIR64B): no ack, returns at once."""
        if self._broken is not None:
            raise self._broken
        self._tag += 1
        self._q.put(dsa_pb2.Submission(wq_id=wq_id, descriptor=descriptor, tag=self._tag, posted=True))

    def write(self, wq_id: int, descriptor: bytes) -> dsa_pb2.SubmissionAck:
        """One non-posted portal write (ENQCMDS); returns its ack."""
        if self._broken is not None:
            raise self._broken
        self._tag += 1
        self._q.put(dsa_pb2.Submission(wq_id=wq_id, descriptor=descriptor, tag=self._tag))
        ack = next(self._acks)
        if ack.tag != self._tag:
            raise DeviceCommandFailed(f"portal ack for tag {ack.tag}, expected {self._tag}")
        return ack

    def close(self) -> None:
        self._closed = True
        self._q.put(_STOP)
        cancel = getattr(self._acks, "cancel", None)
        if cancel is not None:
            cancel()


class Interrupts:
    """The device's completion interrupts (its MSI writes, delivered as a
    gRPC stream): a thread counts them and wakes every waiter, which then
    checks its own completion record -- as idxd's interrupt thread scans its
    pending list, since an interrupt names a vector, not a descriptor."""

    def __init__(self, stub: dsa_pb2_grpc.DsaDeviceStub) -> None:
        self._cv = threading.Condition()
        self.count = 0
        self.alive = True
        self._stream = stub.StreamInterrupts(common_pb2.Empty())
        self._thread = threading.Thread(target=self._listen, name="dsa-interrupts", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for _irq in self._stream:
                with self._cv:
                    self.count += 1
                    self._cv.notify_all()
        except grpc.RpcError:
            pass
        finally:
            with self._cv:
                self.alive = False
                self._cv.notify_all()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout``, or until the next interrupt."""
        with self._cv:
            if self.alive:
                self._cv.wait(timeout)
            else:
                time.sleep(timeout)

    def close(self) -> None:
        cancel = getattr(self._stream, "cancel", None)
        if cancel is not None:
            cancel()


#: Completion interrupt handle of a WQ: MSI-X vector 0 is the device's misc vector, WQ i uses i + 1 (idxd).
def wq_int_handle(wq_id: int) -> int:
    return wq_id + 1


class DsaDriver:
    """One DSA device as seen by this guest."""

    def __init__(self, logical_device_id: int, name: str, address: str, token: str, ram: GuestRam,
                 index: int = 0) -> None:
        self.logical_device_id = logical_device_id
        self.name = name
        self.address = address
        self.token = token
        self.ram = ram
        self.index = index
        self.channel: grpc.Channel | None = None
        self.stub: dsa_pb2_grpc.DsaDeviceStub | None = None
        self.caps: dsa_pb2.DsaCapabilities | None = None
        self.wq: WqInfo | None = None
        self.max_xfer = 0
        self._slots: threading.BoundedSemaphore | None = None
        self._local = threading.local()
        self._sessions: list[PortalSession] = []
        self._lock = threading.Lock()
        #: shared-memory portals (the data path), per WQ: free ones, and all open
        self._pool: dict[int, list[ShmPortal]] = {}
        self._portals: list[ShmPortal] = []
        self._pool_cv = threading.Condition(self._lock)
        self.shm = False
        self.interrupts: Interrupts | ShmInterrupts | None = None
        self.log = log.bind(device=logical_device_id, name=name)

    @property
    def chan_name(self) -> str:
        """The dmaengine channel name dmatest reports ("dma<N>chan0")."""
        return f"dma{self.index}chan0"

    # -- probe -----------------------------------------------------------------------
    def probe(self, ready_timeout: float = 10.0) -> None:
        self.channel = connect(self.address, self.token, ready_timeout=ready_timeout)
        self.stub = dsa_pb2_grpc.DsaDeviceStub(self.channel)
        self.caps = self.stub.GetCapabilities(common_pb2.Empty(), timeout=10)
        self.max_xfer = int(self.caps.max_transfer_size) or GenCap.decode(self.caps.gencap).max_xfer_size
        self.wq = self._setup_wq()
        self._slots = threading.BoundedSemaphore(self.wq.size) if self.wq.dedicated else None
        path = self.caps.session_socket
        if path:
            try:
                self.interrupts = ShmInterrupts(path, self.token)
                self.shm = True
            except (OSError, SessionError) as exc:  # the device's socket is not reachable from here
                self.log.warning("dsa.shm_unavailable", path=path, error=str(exc))
        if not self.shm:
            self.interrupts = Interrupts(self.stub)
        self.log.info("dsa.probed", wq=self.wq.wq_id, dedicated=self.wq.dedicated, wq_size=self.wq.size,
                      max_xfer=self.max_xfer, transport="shared memory" if self.shm else "grpc")

    def _command(self, cmd: Cmd, operand: int = 0) -> int:
        assert self.stub is not None
        st = self.stub.Command(dsa_pb2.DeviceCommand(command=int(cmd), operand=operand), timeout=10)
        return int(st.error or (st.cmdsts & 0xFF))

    def _setup_wq(self) -> WqInfo:
        assert self.stub is not None
        wqs = list(self.stub.ListWqs(common_pb2.Empty(), timeout=10).wqs)
        enabled = sorted((w for w in wqs if w.enabled and w.size), key=lambda w: (not w.dedicated, w.wq_id))
        if enabled:
            w = enabled[0]
            return WqInfo(w.wq_id, w.dedicated, w.size)
        gencap = GenCap.decode(self.caps.gencap if self.caps else 0)
        cfg = dsa_pb2.WqConfig(wq_id=0, dedicated=True, size=DEFAULT_WQ_SIZE, threshold=0,
                               priority=DEFAULT_WQ_PRIORITY, bof=True, max_xfer_shift=gencap.max_xfer_shift,
                               max_batch_shift=gencap.max_batch_shift, group_id=0)
        st = self.stub.ConfigureWq(cfg, timeout=10)
        if st.error == CmdErr.DEV_ENABLED:  # configuration needs the device disabled
            self._command(Cmd.DISABLE_DEVICE)
            st = self.stub.ConfigureWq(cfg, timeout=10)
        if st.error:
            raise DeviceCommandFailed(f"{self.name}: ConfigureWq(0) failed: error {st.error:#x} {st.message}")
        err = self._command(Cmd.ENABLE_DEVICE)
        if err not in (CmdErr.SUCCESS, CmdErr.DEV_ENABLED):
            raise DeviceCommandFailed(f"{self.name}: ENABLE_DEVICE failed: {CmdErr(err).name}")
        err = self._command(Cmd.ENABLE_WQ, 0)
        if err not in (CmdErr.SUCCESS, CmdErr.WQ_ENABLED):
            raise DeviceCommandFailed(f"{self.name}: ENABLE_WQ(0) failed: {CmdErr(err).name}")
        return WqInfo(0, True, DEFAULT_WQ_SIZE)

    # -- submission ----------------------------------------------------------------------
    def _checkout(self, wq_id: int) -> ShmPortal:
        """A free portal session of ``wq_id`` (opened when none is free, up to
        ``MAX_PORTALS``; beyond, wait for one): each has one producer at a time."""
        assert self.caps is not None
        with self._pool_cv:
            while True:
                free = self._pool.setdefault(wq_id, [])
                if free:
                    return free.pop()
                if len(self._portals) < MAX_PORTALS:
                    break
                if not self._pool_cv.wait(10):
                    raise DeviceCommandFailed(f"{self.name}: all {MAX_PORTALS} portal sessions stayed busy for 10 s")
        portal = ShmPortal(self.caps.session_socket, self.token, wq_id)
        with self._pool_cv:
            self._portals.append(portal)
        return portal

    def _checkin(self, portal: ShmPortal, broken: bool) -> None:
        with self._pool_cv:
            if broken:
                if portal in self._portals:
                    self._portals.remove(portal)
            else:
                self._pool.setdefault(portal.wq_id, []).append(portal)
            self._pool_cv.notify()
        if broken:
            portal.close()

    def _submit_shm(self, wq: int, descriptor: bytes, posted: bool) -> bool:
        portal = self._checkout(wq)
        self._local.portal = portal
        broken = False
        try:
            if posted:
                portal.post(descriptor)  # MOVDIR64B: posted, always "accepted"
                return True
            for _ in range(ENQCMDS_RETRIES):
                if portal.write(descriptor):
                    return True
            self.log.warning("dsa.enqcmds_retries_exhausted", wq=wq)
            return False
        except PortalClosed as exc:
            broken = True
            self._local.error = exc
            raise
        finally:
            self._checkin(portal, broken)

    def session(self) -> PortalSession:
        """This thread's gRPC portal stream (the fallback transport; opened on first use)."""
        s: PortalSession | None = getattr(self._local, "session", None)
        if s is None:
            assert self.stub is not None
            s = PortalSession(self.stub)
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def acquire_slot(self, timeout: float | None = None) -> bool:
        """Room for one more outstanding descriptor on a dedicated WQ."""
        if self._slots is None:
            return True
        return self._slots.acquire(timeout=timeout if timeout is None or timeout >= 0 else None)

    def release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def submit(self, descriptor: bytes, wq_id: int | None = None) -> bool:
        """Write one descriptor to the portal. On this driver's dedicated WQ the
        write is posted: it returns True at once, and the caller must hold a
        slot (``acquire_slot``) and learn the outcome from the completion
        record. Otherwise it waits for the ack; False when a shared WQ refused
        it ``ENQCMDS_RETRIES`` times (the caller reports a submit error)."""
        if len(descriptor) != DESC_SIZE:
            raise InvalidRequest(f"a DSA descriptor is {DESC_SIZE} bytes, got {len(descriptor)}")
        assert self.wq is not None
        wq = self.wq.wq_id if wq_id is None else wq_id
        posted = wq == self.wq.wq_id and self.wq.dedicated
        if self.shm:
            return self._submit_shm(wq, descriptor, posted)
        session = self.session()
        if posted:
            session.post(wq, descriptor)  # MOVDIR64B: posted, always "accepted"
            return True
        for _ in range(ENQCMDS_RETRIES):
            ack = session.write(wq, descriptor)
            if ack.error:
                raise InvalidRequest(f"{self.name}: portal refused the submission: {ack.error}")
            if ack.accepted:
                return True
        self.log.warning("dsa.enqcmds_retries_exhausted", wq=wq)
        return False

    def check_portal(self) -> None:
        """Raise if the portal this thread last used is over (its session was
        closed by the device, or the device is gone), for ``wait_completion``."""
        error: BaseException | None = getattr(self._local, "error", None)
        if error is not None:
            raise error
        portal: ShmPortal | None = getattr(self._local, "portal", None)
        if portal is not None:
            try:
                portal.check()
            except PortalClosed as exc:
                self._local.error = exc
                raise
        s: PortalSession | None = getattr(self._local, "session", None)
        if s is not None:
            s.check()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            portals, self._portals = self._portals, []
            self._pool.clear()
        for s in sessions:
            s.close()
        for p in portals:
            p.close()
        if self.interrupts is not None:
            self.interrupts.close()
        if self.channel is not None:
            self.channel.close()


def check_record_gpa(gpa: int) -> None:
    if gpa % COMP_ALIGN:
        raise InvalidRequest(f"completion record GPA {gpa:#x} is not {COMP_ALIGN}-byte aligned")
