"""Failures and load with real processes: parts killed while dmatest runs,
a guest rebooted, and several guests and devices working at once. The
promises: survivors finish clean, the hypervisor reclaims what the dead left,
and nothing leaks (table pages, IOVAs, stage-2 frames back to the start)."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from pvctl.local import VirtualSystem, run_dmatest_stream
from pviommu.v1 import admin_pb2, common_pb2, guest_pb2

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]


#: the map-by-hypercall baseline these tests also run is a hypervisor option
S2 = ["--s2-baseline"]

def _params(iterations: int, threads: int = 1, design: str = "nested", **kw: Any) -> guest_pb2.DmatestParams:
    return guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=threads, iterations=iterations,
                                   timeout=2000, alignment=-1, design=design, **kw)


def _run_async(guest: Any, params: guest_pb2.DmatestParams, out: dict[int, Any]) -> threading.Thread:
    def body() -> None:
        try:
            out[guest.index] = run_dmatest_stream(guest.stub, params, timeout=300)
        except grpc.RpcError as exc:
            out[guest.index] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _hv_counters(system: VirtualSystem) -> dict[str, int]:
    return dict(system.admin.GetStats(common_pb2.Empty(), timeout=30).counters)


def _agent_counters(guest: Any) -> dict[str, int]:
    return dict(guest.stub.GetStats(common_pb2.Empty(), timeout=30).counters)


def test_killing_one_guests_device_mid_dmatest_leaves_the_other_guest_clean() -> None:
    with VirtualSystem(guests=2, devices_per_guest=1, memory_bytes=128 << 20, hypervisor_args=S2) as system:
        victim, survivor = system.guests
        results: dict[int, Any] = {}
        t_victim = _run_async(victim, _params(100000, duration_s=60), results)
        t_survivor = _run_async(survivor, _params(300, threads=2), results)
        time.sleep(2)
        dead = next(p for p in system.devices if p.name == "dsa0.0")
        system.supervisor.kill(dead)
        t_victim.join(120)
        t_survivor.join(300)
        assert not t_victim.is_alive() and not t_survivor.is_alive(), "a dmatest hung"
        lost = results[victim.index]
        assert isinstance(lost, grpc.RpcError) or lost.failures > 0, "the victim's dmatest did not notice"
        kept = results[survivor.index]
        assert not isinstance(kept, grpc.RpcError), kept
        assert kept.tests == 600 and kept.failures == 0, kept.summary
        # the victim keeps running and its next flush makes the hypervisor drop the dead unit
        dev_id = victim.devices[0]
        try:  # a DMA needs the device: it fails clearly (an error or a failed test), no hang
            again = run_dmatest_stream(victim.stub, _params(1), timeout=60)
            assert again.failures == 1, again.summary
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), exc
        victim.stub.Flush(guest_pb2.FlushRequest(logical_device_id=dev_id), timeout=30)
        devices = {d.name: d for d in system.admin.ListDevices(common_pb2.Empty(), timeout=30).devices}
        assert "dsa0.0" not in devices or not devices["dsa0.0"].reachable
        assert devices["dsa1.0"].reachable


def test_a_guest_killed_mid_dmatest_is_reclaimed_and_restarts_clean() -> None:
    with VirtualSystem(guests=2, devices_per_guest=1, memory_bytes=128 << 20, hypervisor_args=S2) as system:
        victim, survivor = system.guests
        baseline_frames = _hv_counters(system)["stage2_table_frames"]
        fresh_domains = len(system.admin.ListDomains(
            admin_pb2.ListDomainsRequest(partition_id=victim.partition_id), timeout=30).domains)
        results: dict[int, Any] = {}
        victim.stub.CreateDomain(guest_pb2.CreateDomainRequest(kind="baseline"), timeout=30)
        t_victim = _run_async(victim, _params(100000, duration_s=60, design="baseline"), results)
        t_survivor = _run_async(survivor, _params(200), results)
        time.sleep(2)
        assert victim.process is not None
        system.supervisor.kill(victim.process)  # a crash: nothing is cleaned up by the guest
        t_victim.join(60)
        domains_left = system.admin.ListDomains(admin_pb2.ListDomainsRequest(partition_id=victim.partition_id),
                                                timeout=30).domains
        assert len(domains_left) > fresh_domains  # the dead guest's domains are still there ...
        system.restart_guest(victim)  # ... until its partition is reset for the reboot
        domains = system.admin.ListDomains(admin_pb2.ListDomainsRequest(partition_id=victim.partition_id),
                                           timeout=30).domains
        assert len(domains) == fresh_domains
        assert _hv_counters(system)["stage2_table_frames"] == baseline_frames  # baseline tables freed
        again = run_dmatest_stream(victim.stub, _params(50), timeout=120)
        assert again.failures == 0 and again.tests == 50
        t_survivor.join(300)
        kept = results[survivor.index]
        assert not isinstance(kept, grpc.RpcError) and kept.failures == 0 and kept.tests == 200


def test_four_guests_with_two_devices_each_under_load_fail_nothing_and_leak_nothing() -> None:
    with VirtualSystem(guests=4, devices_per_guest=2, memory_bytes=64 << 20, hypervisor_args=S2) as system:
        before_hv = _hv_counters(system)
        before = {g.index: _agent_counters(g) for g in system.guests}
        results: dict[int, Any] = {}
        threads = [_run_async(g, _params(40, design="nested" if g.index % 2 == 0 else "baseline"), results)
                   for g in system.guests]
        for t in threads:
            t.join(400)
        assert not any(t.is_alive() for t in threads), "dmatest did not finish in time"
        for g in system.guests:
            r = results[g.index]
            assert not isinstance(r, grpc.RpcError), r
            assert r.tests == 40 * 2 and r.failures == 0, r.summary  # 2 channels x 40
        after_hv = _hv_counters(system)
        assert after_hv["stage2_table_frames"] == before_hv["stage2_table_frames"]
        assert after_hv["domains"] == before_hv["domains"]
        for g in system.guests:
            after = _agent_counters(g)
            for key in ("table_frames", "iova_allocated", "frames_allocated", "buffers", "domains"):
                assert after[key] == before[g.index][key], (g.index, key, before[g.index][key], after[key])
            assert after["pending_unmaps"] == 0
