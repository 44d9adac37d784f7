"""No client can pin the hypervisor: open streams hold no server thread, one
partition's streams are bounded by a quota (RESOURCE_EXHAUSTED beyond it),
and everybody else's calls keep being served while they are open."""

from __future__ import annotations

import time

import grpc

from pviommu.rpc.server import STREAMS_PER_PRINCIPAL
from pviommu.v1 import common_pb2, hypervisor_pb2
from tests.kit.hvkit import CALL_TIMEOUT, SUCCESS, HvEnv, MiB


def _follow(g: object) -> grpc.Future:  # type: ignore[type-arg]
    stream = g.stub.StreamFaults(hypervisor_pb2.StreamFaultsRequest(follow=True))  # type: ignore[attr-defined]
    return stream  # type: ignore[no-any-return]


def test_a_partitions_idle_streams_are_capped_and_never_stall_anyone_else(hv: HvEnv) -> None:
    hog, other = hv.partition("hog", 8 * MiB), hv.partition("other", 8 * MiB)
    streams = [_follow(hog) for _ in range(100)]  # far more than the server's worker threads
    try:
        time.sleep(0.5)
        refused = [s for s in streams if s.done() and s.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        open_ = [s for s in streams if not s.done()]
        assert len(open_) == STREAMS_PER_PRINCIPAL and len(refused) == 100 - STREAMS_PER_PRINCIPAL
        assert "close one first" in refused[0].details()
        # the other partition and the admin are served as usual, each call well within its deadline
        for i in range(20):
            assert other.create(10 + i) == SUCCESS
            assert other.configure(10 + i, MiB) == SUCCESS and other.flush(10 + i) == SUCCESS
        hv.admin.ListPartitions(common_pb2.Empty(), timeout=CALL_TIMEOUT)
        # and its own streams are not counted against the hog's
        mine = _follow(other)
        time.sleep(0.2)
        assert not mine.done()
        mine.cancel()
    finally:
        for s in streams:
            s.cancel()
    # closed streams give their places back
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        again = _follow(hog)
        time.sleep(0.1)
        if not again.done():
            break
        again.cancel()
    assert not again.done()
    again.cancel()


def test_32_guests_each_holding_a_fault_stream_leave_the_hypervisor_responsive(hv: HvEnv) -> None:
    guests = [hv.partition(f"g{i}", 4 * MiB) for i in range(32)]
    streams = [_follow(g) for g in guests]
    try:
        time.sleep(0.3)
        assert not any(s.done() for s in streams)
        for g in guests:  # every guest is served while all 32 streams are open
            assert g.create(1) == SUCCESS and g.configure(1, MiB) == SUCCESS
        assert len(hv.admin.ListPartitions(common_pb2.Empty(), timeout=CALL_TIMEOUT).partitions) == 32
    finally:
        for s in streams:
            s.cancel()
