"""examples/c-hypercall: a libc-only C program makes hypercalls through the
hypercall page of a real hypervisor process (skipped without gcc)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pvctl.procs import Supervisor
from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hypervisor_pb2, hypervisor_pb2_grpc
from tests.kit.hvkit import CALL_TIMEOUT, SUCCESS, MiB, dd

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "c-hypercall" / "hvcall.c"
TOKEN = "c-example-admin-" + os.urandom(6).hex()

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")


@pytest.fixture
def hvcall(tmp_path: Path) -> Path:
    exe = tmp_path / "hvcall"
    out = subprocess.run(["gcc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe),
                          str(SOURCE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return exe


def test_c_program_makes_hypercalls_through_the_page_of_a_real_hypervisor(hvcall: Path, tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        sp = sup.start("hv", "hypervisor", "--memory-dir", str(tmp_path / "banks"),
                       env={"PVIOMMU_ADMIN_TOKEN": TOKEN})
        admin_ch = connect(sp.address, TOKEN)
        r = admin_pb2_grpc.AdminStub(admin_ch).CreatePartition(
            admin_pb2.CreatePartitionRequest(name="c", memory_bytes=4 * MiB), timeout=CALL_TIMEOUT)
        assert r.result.status == SUCCESS
        ch = connect(sp.address, r.token)
        try:
            stub = hypervisor_pb2_grpc.HypervisorStub(ch)
            path = stub.GetTransports(common_pb2.Empty(), timeout=CALL_TIMEOUT).session_socket
            assert stub.CreateDeviceDomain(hypervisor_pb2.CreateDeviceDomainRequest(device_domain=dd(5)),
                                           timeout=CALL_TIMEOUT).result.status == SUCCESS

            def run(token: str, *args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([str(hvcall), path, *args], capture_output=True, text=True, timeout=30,
                                      env={"PVIOMMU_TOKEN": token})

            ok = run(r.token, "5")
            assert ok.returncode == 0, ok.stderr
            assert ok.stdout.splitlines() == ["GetIommuCapabilities status=0x0000 iommu_cap=0x5",
                                              "FlushDeviceDomain status=0x0000"]
            missing = run(r.token, "77")  # no such domain: the status HvCall gives
            assert missing.stdout.splitlines()[1] == "FlushDeviceDomain status=0x0005"
            refused = run("not-a-token")
            assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
            refused = run(TOKEN)  # the admin credential makes no hypercalls
            assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
        finally:
            ch.close()
            admin_ch.close()
