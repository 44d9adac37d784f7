"""Layouts of the shared-memory data plane (docs/transports.md): session
rings, the interrupt page and the hypercall page. All little-endian, all in
memfd regions a service hands to its client over a Unix socket.

Ring (portal descriptors, fault and page-request records): one 4 KiB header
page, then ``slots`` slots of ``slot_size`` bytes (both powers of two)::

    +0     u64 magic               RING_MAGIC
    +8     u32 slot_size, +12 u32 slots
    +64    u64 tail                producer: entries written (the next one goes to tail % slots)
    +128   u64 head                consumer: entries consumed
    +192   u32 consumer_state      0 polling, 1 sleeping (the producer rings the doorbell), 2 closed
    +196   u32 close_reason        why it was closed (CloseReason)
    +256   u64 dropped             producer: entries it could not write (ring full; fault rings)
    +1024  u8  answers[slots]      per slot, for non-posted submissions: 0 none yet, 1 accepted,
                                   2 retry (a shared WQ was full: ENQCMD ZF=1), 3 refused
    +4096  slot[0] ... slot[slots - 1]

Fault record (a fault ring's 64-byte slot, hypervisor -> guest; VT-d's fault
recording and page-request queue in one)::

    +0 u64 sequence   +8 u64 logical_device_id   +16 u64 iova   +24 u64 request_id
    +32 u32 reason (VT-d fault reason)   +36 u32 domain_id   +40 u8 write   +41 u8 page_request
    +48 f64 timestamp (seconds since the epoch)

Interrupt page (4 KiB): +0 u32 state (2 = closed), +4 u32 close_reason,
+64 u64 count[64] (count[v] = interrupts raised on vector v so far); its
doorbell (an eventfd) is written once per interrupt.

Hypercall page (12 KiB): a control page, the input page, the output page::

    +0     u64 magic                HCPAGE_MAGIC ("PVHCPAGE")
    +8     u32 version (1), +12 u32 flags
    +16    u64 seq_request          the guest increments it after filling the input
    +24    u64 seq_done             the hypervisor sets it to seq_request once the result is written
    +32    u64 input_value          the TLFS input value (code, rep count, rep start)
    +40    u64 result_value         the TLFS result value (status, reps completed)
    +48    u32 input_len            bytes of input used
    +52    u32 output_len           bytes of output written
    +64    u32 host_state           0 polling, 1 sleeping (the guest rings the doorbell), 2 closed
    +68    u32 close_reason         why it was closed (CloseReason)
    +72    u32 guest_state          0 polling, 1 sleeping (the hypervisor rings the completion doorbell)
    +76    u32 message_len          bytes of message written (a refusal's reason, UTF-8)
    +1024  message                  up to 3072 bytes
    +4096  input page, +8192 output page

Its session hands over three fds: the region, the request doorbell (guest ->
hypervisor) and the completion doorbell (hypervisor -> guest).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pviommu.addr import PAGE_SIZE

#: the unit the shared-memory frames are laid out in
PAGE = PAGE_SIZE

# -- rings --------------------------------------------------------------------------------
RING_MAGIC = 0x474E_4952_5650_5650  # "PVPVRING"
RING_HEADER = PAGE
R_MAGIC = 0
R_SLOT_SIZE = 8
R_SLOTS = 12
R_TAIL = 64
R_HEAD = 128
R_STATE = 192
R_CLOSE_REASON = 196
R_DROPPED = 256
R_ANSWERS = 1024
MAX_RING_SLOTS = RING_HEADER - R_ANSWERS  # one answer byte per slot fits the header page


class ConsumerState(IntEnum):
    POLLING = 0
    SLEEPING = 1
    CLOSED = 2


class CloseReason(IntEnum):
    NONE = 0
    OWNER_CHANGED = 1  # the device (or the partition) changed owner: this session's epoch ended
    DEVICE_RESET = 2
    PROTOCOL_ERROR = 3  # the producer broke the ring (tail beyond head + slots, ...)
    SERVICE_STOPPED = 4
    CLIENT_CLOSED = 5


class Answer(IntEnum):
    NONE = 0
    ACCEPTED = 1
    RETRY = 2
    REFUSED = 3


def ring_bytes(slot_size: int, slots: int) -> int:
    return RING_HEADER + slot_size * slots


# -- fault records ------------------------------------------------------------------------
FAULT_RECORD = 64
FAULT_RING_SLOTS = 256
_FAULT = struct.Struct("<QQQQIIBBBxId8x")
assert _FAULT.size == FAULT_RECORD


@dataclass(frozen=True)
class FaultRecord:
    """One fault or page request as a fault ring carries it (the message text stays on gRPC).
    ``pasid``: the request's PASID (the SVA proposal only), None for the series' requests."""

    sequence: int
    logical_device_id: int
    iova: int
    request_id: int
    reason: int
    domain_id: int
    write: bool
    page_request: bool
    timestamp: float
    pasid: int | None = None

    def pack(self) -> bytes:
        return _FAULT.pack(self.sequence, self.logical_device_id, self.iova, self.request_id, self.reason,
                           self.domain_id, int(self.write), int(self.page_request), int(self.pasid is not None),
                           self.pasid or 0, self.timestamp)

    @classmethod
    def unpack(cls, raw: bytes) -> FaultRecord:
        seq, dev, iova, rid, reason, dom, write, prq, pasid_valid, pasid, ts = _FAULT.unpack_from(raw)
        return cls(seq, dev, iova, rid, reason, dom, bool(write), bool(prq), ts, pasid if pasid_valid else None)


# -- interrupts ----------------------------------------------------------------------------
IRQ_PAGE = PAGE
IRQ_STATE = 0
IRQ_CLOSE_REASON = 4
IRQ_COUNTS = 64
IRQ_VECTORS = 64

# -- the hypercall page ----------------------------------------------------------------------
HCPAGE_MAGIC = 0x4547_4150_4348_5650  # "PVHCPAGE"
HCPAGE_VERSION = 1
HCPAGE_BYTES = 3 * PAGE
HC_MAGIC = 0
HC_VERSION = 8
HC_FLAGS = 12
HC_SEQ_REQUEST = 16
HC_SEQ_DONE = 24
HC_INPUT_VALUE = 32
HC_RESULT_VALUE = 40
HC_INPUT_LEN = 48
HC_OUTPUT_LEN = 52
HC_HOST_STATE = 64
HC_CLOSE_REASON = 68
HC_GUEST_STATE = 72
HC_MESSAGE_LEN = 76
HC_MESSAGE = 1024
HC_MESSAGE_MAX = PAGE - HC_MESSAGE
HC_INPUT = PAGE
HC_OUTPUT = 2 * PAGE
