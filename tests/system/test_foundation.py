"""The skeleton a user relies on: one command, services that answer the
standard health check and reflection, and a gRPC client that needs no protos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pvctl.cli import build_parser
from pvctl.grpc_client import ReflectionClient
from pvctl.procs import Supervisor
from pviommu.rpc.client import connect

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hypervisor(tmp_path: Path):
    with Supervisor(tmp_path, env={"PVIOMMU_ADMIN_TOKEN": "test-admin-token"}) as sup:
        yield sup.start("hypervisor", "hypervisor", "--memory-dir", str(tmp_path / "banks"))


def test_serve_hypervisor_answers_health_check_serving(hypervisor) -> None:
    with grpc.insecure_channel(hypervisor.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pviommu.v1.Hypervisor", "pviommu.v1.Admin"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_serve_hypervisor_lists_its_services_through_reflection(hypervisor) -> None:
    channel = connect(hypervisor.address)
    try:
        client = ReflectionClient(channel)
        services = client.services()
        assert {"pviommu.v1.Hypervisor", "pviommu.v1.Admin", "grpc.health.v1.Health"} <= set(services)
        methods = {m.name for m in client.service("pviommu.v1.Hypervisor").methods}
        assert {"GetIommuCapabilities", "FlushDeviceDomainList", "HvCall"} <= methods
    finally:
        channel.close()


def test_grpc_cli_calls_a_method_by_reflection_and_prints_json(hypervisor) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pvctl.cli", "grpc", "call", hypervisor.address, "pviommu.v1.Admin/CreatePartition",
         "--token", "test-admin-token", "--compact", "-d", '{"name": "g", "memoryBytes": "4194304"}'],
        capture_output=True, text=True, timeout=60, check=True,
    )
    reply = json.loads(out.stdout)
    assert reply["result"]["statusName"] == "HV_STATUS_SUCCESS"
    assert reply["partition"]["memoryBytes"] == "4194304"
    assert len(reply["token"]) >= 16


def test_grpc_health_command_exits_zero_for_a_serving_server(hypervisor) -> None:
    out = subprocess.run([sys.executable, "-m", "pvctl.cli", "grpc", "health", hypervisor.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"


def test_grpc_health_command_fails_fast_when_nothing_listens() -> None:
    out = subprocess.run([sys.executable, "-m", "pvctl.cli", "grpc", "health", "127.0.0.1:1", "--connect-timeout", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no gRPC server answered" in out.stderr


def test_grpc_cli_without_credential_fails_with_unauthenticated(hypervisor) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pvctl.cli", "grpc", "call", hypervisor.address, "pviommu.v1.Admin/ListPartitions"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 64 + grpc.StatusCode.UNAUTHENTICATED.value[0]  # grpcurl's convention: 64 + code
    assert "UNAUTHENTICATED" in out.stderr


@pytest.mark.parametrize(("argv", "needle"), [
    (["serve", "hypervisor", "--listen", "127.0.0.1:0"], "set PVIOMMU_ADMIN_TOKEN"),
    (["serve", "hypervisor", "--listen", "127.0.0.1:0", "--admin-token-file", "/nonexistent/t"],
     "cannot read the admin token file /nonexistent/t"),
    (["serve", "dsa", "--hypervisor", "127.0.0.1:1"], "set PVIOMMU_ADMIN_TOKEN"),
    (["serve", "guest", "--hypervisor", "127.0.0.1:1", "--bank-path", "/nonexistent/b"], "set PVIOMMU_TOKEN"),
    (["serve", "guest", "--hypervisor", "127.0.0.1:1", "--bank-path", "/nonexistent/b", "--token-file",
      "/nonexistent/t"], "cannot read the token file /nonexistent/t"),
    (["grpc", "call", "127.0.0.1:1", "pviommu.v1.Admin/ListPartitions", "--token-file", "/nonexistent/t"],
     "cannot read the token file /nonexistent/t"),
], ids=["hv-no-token", "hv-token-file", "dsa-no-token", "guest-no-token", "guest-token-file", "grpc-token-file"])
def test_a_missing_or_unreadable_credential_is_one_line_exit_2(argv: list[str], needle: str) -> None:
    """A user error (docs/cli.md: exit 2), not a failed job (1) or a traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("PVIOMMU_ADMIN_TOKEN", "PVIOMMU_TOKEN")}
    out = subprocess.run([sys.executable, "-m", "pvctl.cli", *argv], capture_output=True, text=True,
                         timeout=60, env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert (out.returncode, len(lines)) == (2, 1), (out.returncode, out.stderr[-2000:])
    assert needle in lines[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv", [[], ["run"], ["serve"], ["serve", "hypervisor"], ["serve", "guest"],
                                  ["serve", "dsa"], ["dmatest"], ["guest"], ["scenario"], ["bench"], ["inspect"],
                                  ["grpc"],
                                  ["grpc", "list"], ["grpc", "health"], ["grpc", "describe"], ["grpc", "call"],
                                  ["replay"], ["compose"], ["compose", "endpoints"], ["guest", "ADDR", "map"],
                                  ["guest", "ADDR", "submit"]])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: pviommu" in capsys.readouterr().out


def test_generated_stubs_are_not_tracked_by_git() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "pviommu/v1"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked == ["pviommu/v1/__init__.py"]


def test_stubs_regenerate_from_protos_into_a_fresh_tree(tmp_path: Path) -> None:
    """The build hook alone produces importable stubs from protos/ (what a
    fresh clone's set-up relies on)."""
    import shutil

    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    code = ("import sys; sys.argv=['setup.py']; import importlib.util as u;"
            "s=u.spec_from_file_location('s', 'setup.py'); m=u.module_from_spec(s);"
            "import setuptools; setuptools.setup=lambda **k: None; s.loader.exec_module(m); m.generate_protos()")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    generated = sorted(p.name for p in (tmp_path / "pviommu" / "v1").glob("*_pb2*.py"))
    assert "hypervisor_pb2.py" in generated and "hypervisor_pb2_grpc.py" in generated
    assert "dsa_pb2.py" in generated and "guest_pb2_grpc.py" in generated
