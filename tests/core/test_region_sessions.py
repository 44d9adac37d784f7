"""open_region_session: the one opener of the region-backed session kinds (portals, interrupt
pages, fault rings, hypercall pages) checks what the service handed over before anyone maps it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pviommu.shm.faultring import FaultRingReader
from pviommu.shm.region import Doorbell, Region
from pviommu.shm.ring import RingError
from pviommu.shm.sessions import Opened, SessionError, SessionServer, open_region_session


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A session server over one region and doorbell whose reply fields the test may override
    (``answer["reply"]``) and whose fds it may cut to the region's (``answer["region_only"]``)."""
    region, bell = Region.create("pviommu-test-region", 4096), Doorbell()
    answer: dict[str, Any] = {}

    def opener(request: dict[str, Any]) -> Opened:
        reply = {"session": 7, "kind": request["kind"], "bytes": region.size, **answer.get("reply", {})}
        return Opened(reply, [region.fd] if answer.get("region_only") else [region.fd, bell.fd], lambda: None)

    path = str(tmp_path / "s.sock")
    server = SessionServer(path, opener)
    try:
        yield path, answer
    finally:
        server.close()
        bell.close()
        region.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_fds(want: int) -> int:
    """The open fd count once the in-process server has dropped its side of a closed connection."""
    deadline = time.monotonic() + 5
    while (n := _open_fds()) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_a_region_session_maps_the_region_and_hands_out_one_doorbell_per_further_fd(
        served: tuple[str, dict[str, Any]]) -> None:
    path, _ = served
    opened = open_region_session(path, {"token": "t", "kind": "faults"}, doorbells=1)
    try:
        assert opened.session == 7 and opened.region.size == 4096 and len(opened.doorbells) == 1
    finally:
        opened.sock.close()
        opened.region.close()
        opened.doorbells[0].close()


@pytest.mark.parametrize("answer", [
    {"reply": {"kind": "portal"}},  # another kind than asked for
    {"region_only": True},  # a doorbell short
    {"reply": {"bytes": "lots"}},  # a size that is no number
], ids=["wrong-kind", "missing-doorbell", "bad-size"])
def test_a_reply_of_the_wrong_shape_is_a_protocol_error_and_leaves_no_fd_open(
        served: tuple[str, dict[str, Any]], answer: dict[str, Any]) -> None:
    path, current = served
    current.update(answer)
    before = _open_fds()
    with pytest.raises(SessionError) as err:
        open_region_session(path, {"token": "t", "kind": "faults"}, doorbells=1)
    assert err.value.code == "PROTOCOL_ERROR"
    assert _settled_fds(before) == before  # the socket and every received fd are closed again


def test_a_fault_ring_session_whose_region_is_no_ring_raises_and_leaves_no_fd_open(
        served: tuple[str, dict[str, Any]]) -> None:
    path, _ = served
    before = _open_fds()
    with pytest.raises(RingError):
        FaultRingReader(path, "t")  # the served region is zeros: no ring magic
    assert _settled_fds(before) == before
