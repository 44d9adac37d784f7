"""dmatest's parameters and outcomes as drivers/dma/dmatest.c has them, through
the real GuestAgent API (real hypervisor, the fake DSA device of guest_env).

Expected messages are dmatest.c's format strings written out by hand."""

from __future__ import annotations

import argparse
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from guest_agent.agent import Agent
from guest_agent.dma.api import Direction
from guest_agent.main import build
from pviommu.rpc.client import connect
from pviommu.rpc.server import RunningServer
from pviommu.v1 import guest_pb2, guest_pb2_grpc
from tests.kit.guest_env import FakeDevice, HvEnv

pytestmark = pytest.mark.timeout(180)

RESULT = re.compile(r"^dmatest: (dma\d+chan0-copy\d+): result #(\d+): '([a-z ]+)' with src_off=0x[0-9a-f]+ "
                    r"dst_off=0x[0-9a-f]+ len=0x[0-9a-f]+ \((-?\d+)\)$")
THREAD_SUMMARY = re.compile(r"^dmatest: (dma\d+chan0-copy\d+): summary (\d+) tests, (\d+) failures "
                            r"\d+\.\d\d iops \d+ KB/s \((-?\d+)\)$")
#: Every other line a run may print (dmatest.c's pr_info/pr_err/pr_warn texts).
OTHER = re.compile(r"^dmatest: (Added|Started) \d+ threads using dma\d+chan0$|"
                   r"^dmatest: No channels configured, continue with any$|"
                   r"^dmatest: Channel misconfigured, can't continue$|"
                   r"^dmatest: dma\d+chan0-copy\d+: (src|dst)buf\[0x[0-9a-f]+\] "
                   r"(overwritten|not copied|was copied|mismatch)! Expected [0-9a-f]{2}, got [0-9a-f]{2}$|"
                   r"^dmatest: dma\d+chan0-copy\d+: \d+ errors suppressed$")


@dataclass
class Guest:
    stub: guest_pb2_grpc.GuestAgentStub
    agent: Agent
    server: RunningServer
    devices: list[FakeDevice]


def start_guest(hv: HvEnv, devices: int = 1) -> Guest:
    p = hv.partition()
    devs = [hv.device(p, name=f"dsa{i}") for i in range(devices)]
    args = argparse.Namespace(listen="127.0.0.1:0", hypervisor=hv.address, bank_path=p.bank_path, token_file=None,
                              allow_no_iommu=False, flush_mode="strict")
    agent, server = build(args, token=p.token)
    hv.agents.append(agent)
    ch = connect(f"127.0.0.1:{server.port}", p.token)
    hv.channels.append(ch)
    return Guest(guest_pb2_grpc.GuestAgentStub(ch), agent, server, devs)


@pytest.fixture
def guest(hv: HvEnv) -> Iterator[Guest]:
    g = start_guest(hv)
    yield g
    g.server.stop(0)


def run(stub: guest_pb2_grpc.GuestAgentStub, **kw: Any) -> tuple[guest_pb2.DmatestResult, list[str]]:
    lines: list[str] = []
    result = None
    for ev in stub.RunDmatest(guest_pb2.DmatestParams(**kw), timeout=120):
        if ev.HasField("line"):
            lines.append(ev.line)
        elif ev.HasField("result"):
            result = ev.result
    assert result is not None
    return result, lines


class Background:
    """A RunDmatest call consumed by a thread: its run id, events and result."""

    def __init__(self, stub: guest_pb2_grpc.GuestAgentStub, **kw: Any) -> None:
        self.call = stub.RunDmatest(guest_pb2.DmatestParams(**kw), timeout=120)
        self.events: queue.Queue[guest_pb2.DmatestEvent] = queue.Queue()
        self.lines: list[str] = []
        self.result: guest_pb2.DmatestResult | None = None
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        first = self.events.get(timeout=30)
        assert first.HasField("run_id"), first
        self.run_id = first.run_id

    def _read(self) -> None:
        try:
            for ev in self.call:
                if ev.HasField("line"):
                    self.lines.append(ev.line)
                elif ev.HasField("result"):
                    self.result = ev.result
                self.events.put(ev)
        except grpc.RpcError as exc:
            self.error = exc

    def wait_progress(self, at_least: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = self.events.get(timeout=60)
            if ev.HasField("progress") and ev.progress >= at_least:
                return
        raise AssertionError("no progress")

    def wait_line(self, text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in self.lines:
            assert time.monotonic() < deadline, self.lines
            time.sleep(0.01)

    def join(self) -> guest_pb2.DmatestResult:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the dmatest stream did not end"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


def results(lines: list[str]) -> list[tuple[str, int, str, int]]:
    out = []
    for x in lines:
        m = RESULT.match(x)
        if m:
            out.append((m[1], int(m[2]), m[3], int(m[4])))
    return out


def summaries(lines: list[str]) -> dict[str, tuple[int, int, int]]:
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for x in lines if (m := THREAD_SUMMARY.match(x))}


def assert_only_dmatest_lines(lines: list[str]) -> None:
    for x in lines:
        assert RESULT.match(x) or THREAD_SUMMARY.match(x) or OTHER.match(x), f"not a dmatest line: {x!r}"


# -- verbose, timeout, iterations ----------------------------------------------------------------
def test_verbose_prints_test_passed_for_every_passing_test(guest: Guest) -> None:
    r, lines = run(guest.stub, iterations=4, seed=3, verbose=True)
    assert (r.tests, r.failures) == (4, 0)
    assert [(n, what, v) for _, n, what, v in results(lines)] == [(i, "test passed", 0) for i in range(1, 5)]
    _, quiet = run(guest.stub, iterations=4, seed=3)
    assert results(quiet) == []


def test_verbose_with_noverify_reports_every_completed_test_as_passed(guest: Guest) -> None:
    _, lines = run(guest.stub, iterations=3, noverify=True, verbose=True)
    assert [what for _, _, what, _ in results(lines)] == ["test passed"] * 3


def test_timeout_0_looks_once_and_reports_test_timed_out(guest: Guest) -> None:
    r, lines = run(guest.stub, iterations=5, timeout=0)
    # one look: a test whose record was not written yet by then fails as "test timed out" (a fast device
    # may have finished some already: those pass). A wait of any length would let every record arrive.
    timed_out = [(n, what, v) for _, n, what, v in results(lines)]
    assert r.tests == 5 and r.failures == len(timed_out) >= 1
    assert all(what == "test timed out" and v == 0 for _, what, v in timed_out)
    assert summaries(lines) == {"dma0chan0-copy0": (5, r.failures, 0)}


def test_unset_timeout_means_3000_ms_and_the_run_passes(guest: Guest) -> None:
    r, _ = run(guest.stub, iterations=3)
    assert (r.tests, r.failures) == (3, 0)


def test_iterations_0_runs_until_stop_dmatest_then_prints_the_summaries(guest: Guest) -> None:
    bg = Background(guest.stub, iterations=0, threads_per_chan=2, seed=1)
    bg.wait_progress(25)
    reply = guest.stub.StopDmatest(guest_pb2.DmatestStopRequest(run_id=bg.run_id), timeout=10)
    assert reply.stopped == 1
    r = bg.join()
    assert r.tests >= 25 and r.failures == 0
    s = summaries(bg.lines)
    assert set(s) == {"dma0chan0-copy0", "dma0chan0-copy1"}
    assert sum(t for t, _, _ in s.values()) == r.tests and all(ret == 0 for _, _, ret in s.values())


def test_stop_dmatest_with_run_id_0_stops_every_run(hv: HvEnv, guest: Guest) -> None:
    runs = [Background(guest.stub, iterations=0), Background(guest.stub, iterations=0)]
    for b in runs:
        b.wait_line("dmatest: Started 1 threads using dma0chan0")
    assert guest.stub.StopDmatest(guest_pb2.DmatestStopRequest(run_id=0), timeout=10).stopped == 2
    for b in runs:
        assert b.join().tests >= 1


def test_cancelling_the_call_stops_the_test_threads(guest: Guest) -> None:
    bg = Background(guest.stub, iterations=0)
    bg.wait_progress(25)
    bg.call.cancel()
    fake = guest.devices[0]
    deadline = time.monotonic() + 20
    while True:
        before = fake.executed
        time.sleep(0.5)
        if fake.executed == before and not any(t.name.startswith("dma0chan0-copy") for t in threading.enumerate()):
            break
        assert time.monotonic() < deadline, "the test threads kept running after the call was cancelled"


def test_stop_ends_a_test_waiting_forever_on_a_device_that_never_completes(guest: Guest,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    guest.devices[0].never_complete(monkeypatch)
    bg = Background(guest.stub, iterations=0, timeout=-1)
    bg.wait_line("dmatest: Started 1 threads using dma0chan0")
    time.sleep(0.5)
    guest.stub.StopDmatest(guest_pb2.DmatestStopRequest(run_id=bg.run_id), timeout=10)
    r = bg.join()
    assert (r.tests, r.failures) == (1, 1)
    assert [(n, what) for _, n, what, _ in results(bg.lines)] == [(1, "test timed out")]


# -- bad parameters: dmatest's message and the summary, not a refused run ------------------------
def test_an_alignment_larger_than_the_buffer_prints_the_message_and_a_minus_enomem_summary(guest: Guest) -> None:
    r, lines = run(guest.stub, iterations=3, alignment=15)
    assert "dmatest: 16384-byte buffer too small for 32768-byte alignment" in lines
    assert summaries(lines) == {"dma0chan0-copy0": (0, 0, -12)}
    assert r.tests == 0


def test_a_zero_buffer_size_is_too_small_for_1_byte_alignment(guest: Guest) -> None:
    _, lines = run(guest.stub, iterations=3, test_buf_size=0)
    assert "dmatest: 0-byte buffer too small for 1-byte alignment" in lines
    assert summaries(lines) == {"dma0chan0-copy0": (0, 0, -12)}


def test_threads_per_chan_0_adds_and_starts_no_thread(guest: Guest) -> None:
    r, lines = run(guest.stub, iterations=3, threads_per_chan=0)
    assert "dmatest: Added 0 threads using dma0chan0" in lines and summaries(lines) == {} and r.tests == 0


# -- channel, device, max_channels -------------------------------------------------------------
def test_channel_device_and_max_channels_select_like_dmatest(hv: HvEnv) -> None:
    g = start_guest(hv, devices=2)
    try:
        _, lines = run(g.stub, iterations=2)
        assert lines[0] == "dmatest: No channels configured, continue with any"
        assert set(summaries(lines)) == {"dma0chan0-copy0", "dma1chan0-copy0"}

        r, lines = run(g.stub, iterations=2, channel="dma1chan0")
        assert "dmatest: No channels configured, continue with any" not in lines
        assert "dmatest: Added 1 threads using dma1chan0" in lines
        assert set(summaries(lines)) == {"dma1chan0-copy0"} and r.tests == 2

        index = {d.name: d.index for d in g.agent.iommu.devices.values()}
        _, lines = run(g.stub, iterations=2, device="dsa0")
        assert set(summaries(lines)) == {f"dma{index['dsa0']}chan0-copy0"}

        _, lines = run(g.stub, iterations=2, max_channels=1)
        assert set(summaries(lines)) == {"dma0chan0-copy0"}

        r, lines = run(g.stub, iterations=2, channel="dma7chan0")
        assert lines == ["dmatest: Channel misconfigured, can't continue"] and r.tests == 0

        r, lines = run(g.stub, iterations=2, channel=f"dma{index['dsa1']}chan0", device="dsa0")
        assert lines == ["dmatest: Channel misconfigured, can't continue"] and r.tests == 0
    finally:
        g.server.stop(0)


# -- mapping and outcomes ----------------------------------------------------------------------------
def test_source_is_mapped_to_device_and_destination_bidirectionally(guest: Guest,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Direction] = []
    real = guest.agent.dma.map_single

    def spy(dev: Any, gpa: Any, size: int, direction: Direction, *a: Any, **kw: Any) -> Any:
        if size == 16384:  # the test buffers (the completion records are a coherent page of their own)
            seen.append(direction)
        return real(dev, gpa, size, direction, *a, **kw)

    monkeypatch.setattr(guest.agent.dma, "map_single", spy)
    run(guest.stub, iterations=3)
    assert seen == [Direction.TO_DEVICE, Direction.BIDIRECTIONAL] * 3


def test_an_error_completion_is_judged_by_the_data_check_as_dmatest_on_idxd(guest: Guest,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """idxd answers DMA_OUT_OF_ORDER for every completed descriptor and dmatest accepts it on a
    DMA_COMPLETION_NO_ORDER device: the failure shows as 'data error', not 'completion error status'."""
    guest.devices[0].complete_every_descriptor_with(monkeypatch, 0x83)  # a page fault that copied nothing
    r, lines = run(guest.stub, iterations=3, norandom=True, test_buf_size=4096)
    assert (r.tests, r.failures) == (3, 3)
    assert [(n, what, v) for _, n, what, v in results(lines)] == [(i, "data error", 4096) for i in range(1, 4)]
    assert sum("dstbuf[0x" in x and "not copied!" in x for x in lines) == 3 * 32
    assert "dmatest: dma0chan0-copy0: 4064 errors suppressed" in lines
    r, _ = run(guest.stub, iterations=3, noverify=True)
    assert (r.tests, r.failures) == (3, 0)  # dmatest checks nothing else


def test_a_device_that_dies_mid_run_gives_dmatest_results_and_the_summary(guest: Guest) -> None:
    bg = Background(guest.stub, iterations=60, seed=2)
    bg.wait_progress(25)
    guest.devices[0].kill()
    r = bg.join()
    assert r.tests == 60 and r.failures >= 1
    assert_only_dmatest_lines(bg.lines)
    kinds = {what for _, _, what, _ in results(bg.lines)}
    assert kinds and kinds <= {"prep error", "submit error", "data error", "test timed out"}, kinds
    assert summaries(bg.lines) == {"dma0chan0-copy0": (60, r.failures, 0)}


def test_buffers_the_guest_cannot_allocate_end_the_thread_with_minus_enomem(guest: Guest) -> None:
    r, lines = run(guest.stub, iterations=3, test_buf_size=1 << 30)  # the guest has 64 MiB
    assert summaries(lines) == {"dma0chan0-copy0": (0, 0, -12)} and r.tests == 0
    r, _ = run(guest.stub, iterations=2)
    assert (r.tests, r.failures) == (2, 0)  # nothing leaked or broken
