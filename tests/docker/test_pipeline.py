"""The integration pipeline users run: the system as containers on a private
network, the scenario, and injected faults (a device killed mid-dmatest, a
guest restarted, the hypervisor stopped). Selected with ``-m docker``; skipped
with a message where no Docker Engine answers."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, guest_pb2, guest_pb2_grpc

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ADMIN_TOKEN = "docker-pipeline-admin-token"


def _agent(host: Any, name: str) -> tuple[grpc.Channel, guest_pb2_grpc.GuestAgentStub]:
    token = host.read_file(name, f"/banks/tokens/{name}.token")
    ch = connect(host.address(name, 50061), token, ready_timeout=30)
    return ch, guest_pb2_grpc.GuestAgentStub(ch)


def _admin(host: Any) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    ch = connect(host.address("hypervisor", 50051), ADMIN_TOKEN, ready_timeout=30)
    return ch, admin_pb2_grpc.AdminStub(ch)


def test_scenario_container_passes_against_the_containerised_host(docker_host: Any) -> None:
    c = docker_host.start(
        "scenario", "scenario", "--hypervisor", "hypervisor:50051",
        "--guest", "guest0:50061=/banks/tokens/guest0.token", "--guest", "guest1:50061=/banks/tokens/guest1.token",
        "--iterations", "50")
    result = c.wait(timeout=600)
    logs = c.logs().decode(errors="replace")
    assert result["StatusCode"] == 0, logs
    assert "dmatest-nested" in logs and "stale-iotlb-hazard" in logs


def test_killing_a_device_mid_dmatest_gives_errors_and_the_hypervisor_drops_it(docker_host: Any) -> None:
    ch, agent = _agent(docker_host, "guest0")
    ach, admin = _admin(docker_host)
    try:
        devices = agent.ListDevices(common_pb2.Empty(), timeout=30).devices
        assert devices, "guest0 has no device"
        canary = agent.AllocBuffer(guest_pb2.AllocRequest(size=65536), timeout=30)
        pattern = bytes((i * 13) & 0xFF for i in range(65536))
        agent.WriteMemory(guest_pb2.WriteRequest(gpa=canary.gpa, data=pattern), timeout=30)
        outcome: dict[str, Any] = {}

        def dmatest() -> None:
            # as dmatest on a halted device, the threads go on reporting errors: duration_s ends them
            params = guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=2, iterations=100000,
                                             timeout=1000, alignment=-1, design="nested", duration_s=30)
            try:
                for ev in agent.RunDmatest(params, timeout=300):
                    if ev.HasField("result"):
                        outcome["result"] = ev.result
            except grpc.RpcError as exc:
                outcome["error"] = f"{exc.code().name}: {exc.details()}"

        t = threading.Thread(target=dmatest)
        t.start()
        time.sleep(3)
        docker_host.containers["dsa0"].kill()
        t.join(300)
        assert not t.is_alive(), "dmatest hung after its device died"
        res = outcome.get("result")
        assert "error" in outcome or (res is not None and res.failures > 0), outcome
        # the guest keeps running, and its memory outside the mapped buffers is intact
        assert agent.GetIommuInfo(common_pb2.Empty(), timeout=30).present
        assert agent.ReadMemory(guest_pb2.ReadRequest(gpa=canary.gpa, size=65536), timeout=30).data == pattern
        # the hypervisor dropped the device: unreachable (its context blocked) or gone after a flush
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            devs = {d.name: d for d in admin.ListDevices(common_pb2.Empty(), timeout=30).devices}
            if "dsa0" not in devs or not devs["dsa0"].reachable:
                break
            agent.Flush(guest_pb2.FlushRequest(logical_device_id=devices[0].logical_device_id), timeout=30)
            time.sleep(0.5)
        else:
            pytest.fail("the hypervisor still lists dsa0 as reachable")
    finally:
        ch.close()
        ach.close()


def test_a_restarted_guest_starts_clean_and_its_old_domains_are_reclaimed(docker_host: Any) -> None:
    ach, admin = _admin(docker_host)
    ch, agent = _agent(docker_host, "guest1")
    try:
        pid = next(p.partition_id for p in admin.ListPartitions(common_pb2.Empty(), timeout=30).partitions
                   if p.name == "guest1")
        assert agent.ListDevices(common_pb2.Empty(), timeout=30).devices  # probed (hot-plugged after boot)
        fresh = len(admin.ListDomains(admin_pb2.ListDomainsRequest(partition_id=pid), timeout=30).domains)
        agent.CreateDomain(guest_pb2.CreateDomainRequest(kind="paging"), timeout=30)
        agent.CreateDomain(guest_pb2.CreateDomainRequest(kind="paging"), timeout=30)
        assert len(admin.ListDomains(admin_pb2.ListDomainsRequest(partition_id=pid), timeout=30).domains) == fresh + 2
        docker_host.containers["guest1"].kill()
        docker_host.containers["guest1"].remove(force=True)
        docker_host.start("guest1", "serve", "guest", "--listen", "0.0.0.0:50061", "--hypervisor", "hypervisor:50051",
                          "--provision", "guest1", "--memory", "128M", "--token-out", "/banks/tokens/guest1.token",
                          port=50061)
        docker_host.wait_healthy("guest1")
        ch2, agent2 = _agent(docker_host, "guest1")
        assert agent2.ListDevices(common_pb2.Empty(), timeout=30).devices
        domains = admin.ListDomains(admin_pb2.ListDomainsRequest(partition_id=pid), timeout=30).domains
        assert len(domains) == fresh, "the old agent's extra domains survived the restart"
        with pytest.raises(grpc.RpcError) as exc:
            agent.GetIommuInfo(common_pb2.Empty(), timeout=10)  # old channel: old container is gone
        assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)
        try:
            assert agent2.GetIommuInfo(common_pb2.Empty(), timeout=30).present
        finally:
            ch2.close()
    finally:
        ch.close()
        ach.close()


def test_stopping_the_hypervisor_makes_guest_calls_fail_fast_with_a_clear_error(docker_host: Any) -> None:
    ch, agent = _agent(docker_host, "guest0")
    try:
        dev = agent.ListDevices(common_pb2.Empty(), timeout=30).devices[0].logical_device_id
        docker_host.containers["hypervisor"].stop(timeout=5)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            agent.Flush(guest_pb2.FlushRequest(logical_device_id=dev), timeout=60)
        assert time.monotonic() - started < 30, "the guest waited for a dead hypervisor"
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, exc.value
        assert "hypervisor" in (exc.value.details() or "").lower()
    finally:
        ch.close()
