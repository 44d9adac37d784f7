"""``pviommu serve hypervisor`` as a real process: health, reflection, and a
clean SIGTERM that removes its bank files."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pvctl.grpc_client import ReflectionClient
from pvctl.procs import Supervisor
from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc
from tests.kit.hvkit import CALL_TIMEOUT, SUCCESS, MiB

TOKEN = "process-test-admin-" + os.urandom(6).hex()


@pytest.fixture
def supervisor(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Supervisor(tmp_path) as sup:
        yield sup


def _create_partition(address: str) -> admin_pb2.CreatePartitionReply:
    ch = connect(address, TOKEN)
    try:
        r = admin_pb2_grpc.AdminStub(ch).CreatePartition(
            admin_pb2.CreatePartitionRequest(name="g", memory_bytes=4 * MiB), timeout=CALL_TIMEOUT)
    finally:
        ch.close()
    assert r.result.status == SUCCESS
    return r


def test_served_hypervisor_is_healthy_reflects_its_services_and_stops_cleanly(
        supervisor: Supervisor, tmp_path: Path) -> None:
    banks = tmp_path / "banks"
    sp = supervisor.start("hv", "hypervisor", "--memory-dir", str(banks), env={"PVIOMMU_ADMIN_TOKEN": TOKEN})
    ch = grpc.insecure_channel(sp.address)
    try:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "pviommu.v1.Hypervisor", "pviommu.v1.Admin", "pviommu.v1.DeviceHost"):
            r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT, wait_for_ready=True)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        services = ReflectionClient(ch).services()
        assert {"pviommu.v1.Hypervisor", "pviommu.v1.Admin", "pviommu.v1.DeviceHost",
                "grpc.health.v1.Health"} <= set(services)
        assert "HvCall" in ReflectionClient(ch).service("pviommu.v1.Hypervisor").methods_by_name
    finally:
        ch.close()
    r = _create_partition(sp.address)
    bank = Path(r.partition.bank_path)
    assert bank.parent == banks and bank.exists() and (banks / "bank-00000.mem").exists()

    supervisor.stop(sp, sig=signal.SIGTERM)
    assert sp.proc.returncode == 0, sp.log_tail()
    assert list(banks.iterdir()) == []  # bank 0 and the partition's bank are gone
    assert banks.exists()  # a folder it was given is left in place


def test_served_hypervisor_removes_its_own_bank_folder_on_sigterm(supervisor: Supervisor) -> None:
    sp = supervisor.start("hv", "hypervisor", env={"PVIOMMU_ADMIN_TOKEN": TOKEN})
    bank = Path(_create_partition(sp.address).partition.bank_path)
    assert bank.exists()
    supervisor.stop(sp, sig=signal.SIGTERM)
    assert sp.proc.returncode == 0, sp.log_tail()
    assert not bank.parent.exists()


def test_serve_without_an_admin_token_refuses_to_start(supervisor: Supervisor, monkeypatch) -> None:
    monkeypatch.delenv("PVIOMMU_ADMIN_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="PVIOMMU_ADMIN_TOKEN"):
        supervisor.start("hv", "hypervisor", env={})
