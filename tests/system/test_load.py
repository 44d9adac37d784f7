"""Sustained use with real processes: a hypervisor, DSA device processes and
guest agent processes on loopback (``pvctl.local.VirtualSystem``).

* twenty 4-thread dmatest runs in a row on one guest, then one 64-thread run:
  no failure (every run's portal and interrupt sessions are closed when it
  ends, so nothing piles up in the device or the agent);
* 32 guests on one hypervisor, each a real guest agent process holding its
  fault/page-request stream: every guest's hypercalls are served and the
  admin API answers while all of them are open, and a dmatest on one of them
  passes meanwhile.

Bounded for CI: small iteration counts; the whole file takes about a minute
on a quiet 2-core machine.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from pvctl.local import VirtualSystem, run_dmatest_stream
from pviommu.units import MiB
from pviommu.v1 import common_pb2, guest_pb2

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]



def _params(iterations: int, threads: int) -> guest_pb2.DmatestParams:
    return guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=threads, iterations=iterations,
                                   timeout=5000, alignment=-1)


def _summary(r: guest_pb2.DmatestResult) -> str:
    return f"{r.tests} tests, {r.failures} failures: {getattr(r, 'summary', '')}"


def test_twenty_4_thread_dmatest_runs_in_a_row_then_a_64_thread_run_fail_nothing() -> None:
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=128 * MiB) as system:
        (guest,) = system.guests
        before = dict(guest.stub.GetStats(common_pb2.Empty(), timeout=30).counters)
        results = []
        for run in range(20):
            r = run_dmatest_stream(guest.stub, _params(8, 4), timeout=120)
            results.append((run, r.tests, r.failures))
            assert (r.tests, r.failures) == (32, 0), (run, _summary(r), system.logs(20))
        wide = run_dmatest_stream(guest.stub, _params(2, 64), timeout=300)
        assert (wide.tests, wide.failures) == (128, 0), (_summary(wide), system.logs(20))
        after = dict(guest.stub.GetStats(common_pb2.Empty(), timeout=30).counters)
        for key in ("iova_allocated", "buffers", "pending_unmaps"):
            if key in before:
                assert after[key] == before[key], (key, before[key], after[key])


def test_32_guest_agents_on_one_hypervisor_are_all_served_while_each_holds_its_streams() -> None:
    # 32 real guest agent processes (about 55 MB each), one with a device; the others have no
    # device, but each opens the same hypervisor streams an agent always opens (faults/page requests).
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=64 * MiB) as system:
        others = [system.add_partition(g, start_devices=False) for g in range(1, 32)]
        system._start_guests(others, lambda _: None)  # the 31 agents start together
        assert len(system.guests) == 32
        worker = system.guests[0]
        done: dict[str, Any] = {}

        def dmatest() -> None:
            try:
                done["dmatest"] = run_dmatest_stream(worker.stub, _params(20, 2), timeout=300)
            except grpc.RpcError as exc:
                done["dmatest"] = exc

        t = threading.Thread(target=dmatest, daemon=True)
        t.start()
        errors: dict[int, str] = {}
        lock = threading.Lock()

        def guest_calls(g: Any) -> None:
            try:
                for _ in range(3):  # each a CreateDeviceDomain + ConfigureDeviceDomain + DeleteDeviceDomain
                    dom = g.stub.CreateDomain(guest_pb2.CreateDomainRequest(kind="paging"), timeout=30)
                    g.stub.DeleteDomain(guest_pb2.DomainRequest(domain_id=dom.domain_id), timeout=30)
                g.stub.GetIommuInfo(common_pb2.Empty(), timeout=30)
            except grpc.RpcError as exc:
                with lock:
                    errors[g.index] = f"{exc.code().name}: {exc.details()}"

        callers = [threading.Thread(target=guest_calls, args=(g,), daemon=True) for g in system.guests]
        for c in callers:
            c.start()
        for c in callers:
            c.join(120)
        assert not any(c.is_alive() for c in callers), "a guest's hypercalls hung"
        assert not errors, errors
        parts_listed = system.admin.ListPartitions(common_pb2.Empty(), timeout=10).partitions
        assert len(parts_listed) == 32
        t.join(300)
        r = done.get("dmatest")
        assert r is not None and not isinstance(r, grpc.RpcError), r
        assert (r.tests, r.failures) == (40, 0), _summary(r)
        # every agent is still alive and answering
        for g in system.guests:
            assert g.process is not None and g.process.alive(), g.index
            g.stub.GetStats(common_pb2.Empty(), timeout=30)
