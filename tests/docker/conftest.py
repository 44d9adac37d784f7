"""Docker pipeline fixtures: build the image, start one virtual host as
containers on a private network with the banks on a shared tmpfs volume,
collect every container's logs when a test fails, remove everything after.

Skips (with the reason) where no Docker Engine answers. Where the official
Python image cannot be pulled, the local base image is built first with
deploy/docker/build-base-image.sh (mmdebstrap + docker import).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

docker = pytest.importorskip("docker")

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "docker-pipeline-admin-token"
LOG_DIR = ROOT / ".pviommu" / "docker-logs"


def _client() -> Any:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception as exc:  # no socket, no permission, daemon down
        pytest.skip(f"no Docker Engine answers ({type(exc).__name__}: {exc}); container tests skipped")


@pytest.fixture(scope="session")
def docker_client() -> Any:
    return _client()


def _has_image(client: Any, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def base_image(client: Any) -> str:
    """The Python base: $PVIOMMU_BASE_IMAGE, python:3.11-slim if present, else
    the local Debian base (built by deploy/docker/build-base-image.sh if missing)."""
    base = os.environ.get("PVIOMMU_BASE_IMAGE")
    if not base:
        base = "python:3.11-slim" if _has_image(client, "python:3.11-slim") else "pviommu-base:bookworm"
    if base == "pviommu-base:bookworm" and not _has_image(client, base):
        subprocess.run([str(ROOT / "deploy/docker/build-base-image.sh"), base], check=True, timeout=900)
    return base


@pytest.fixture(scope="session")
def base(docker_client: Any) -> str:
    """The base image the test image is built on."""
    return base_image(docker_client)


@pytest.fixture(scope="session")
def image(docker_client: Any) -> Iterator[str]:
    """Build the image from the working tree (wheels fetched on the host) under
    a tag of this run's own, so parallel runs never replace each other's image."""
    base = base_image(docker_client)
    subprocess.run([str(ROOT / "deploy/docker/fetch-wheels.sh")], check=True, timeout=900, cwd=ROOT)
    tag = f"pviommu:test-{uuid.uuid4().hex[:8]}"
    docker_client.images.build(path=str(ROOT), dockerfile="deploy/docker/Dockerfile", tag=tag,
                               buildargs={"BASE_IMAGE": base}, rm=True, forcerm=True)
    yield tag
    try:
        docker_client.images.remove(tag, noprune=False)
    except docker.errors.APIError:
        pass  # still used by a container that is being removed: the tag goes with the next prune


@dataclass
class DockerHost:
    """One virtual host as containers; addresses are container IPs the test reaches directly."""

    client: Any
    image: str
    run_id: str
    network: Any = None
    volume: Any = None
    containers: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return {"pviommu.test-run": self.run_id}

    def ip(self, name: str) -> str:
        c = self.containers[name]
        c.reload()
        return str(c.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"])

    def address(self, name: str, port: int) -> str:
        return f"{self.ip(name)}:{port}"

    def start(self, name: str, *args: str, port: int | None = None) -> Any:
        health = None
        if port is not None:
            health = {"test": ["CMD", "pviommu", "grpc", "health", f"127.0.0.1:{port}"],
                      "interval": 1_000_000_000, "timeout": 5_000_000_000, "retries": 60,
                      "start_period": 2_000_000_000}
        c = self.client.containers.run(
            self.image, list(args), name=f"{self.run_id}-{name}", hostname=name, detach=True, init=True,
            network=self.network.name, labels=self.labels, healthcheck=health,
            environment={"PVIOMMU_ADMIN_TOKEN": ADMIN_TOKEN, "PVIOMMU_LOG_FORMAT": "json"},
            volumes={self.volume.name: {"bind": "/banks", "mode": "rw"}})
        self.network.reload()
        self.containers[name] = c
        return c

    def wait_healthy(self, *names: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            c = self.containers[name]
            while True:
                c.reload()
                state = c.attrs["State"]
                if state.get("Health", {}).get("Status") == "healthy":
                    break
                if state["Status"] == "exited":
                    raise AssertionError(f"{name} exited:\n{c.logs(tail=50).decode(errors='replace')}")
                if time.monotonic() > deadline:
                    tail = c.logs(tail=50).decode(errors="replace")
                    raise AssertionError(f"{name} not healthy in {timeout}s:\n{tail}")
                time.sleep(0.5)

    def read_file(self, name: str, path: str) -> str:
        out = self.containers[name].exec_run(["cat", path])
        assert out.exit_code == 0, out.output
        return str(out.output.decode().strip())

    def save_logs(self, test_name: str) -> Path:
        folder = LOG_DIR / f"{test_name}-{self.run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, c in self.containers.items():
            try:
                (folder / f"{name}.log").write_bytes(c.logs(timestamps=True))
            except Exception as exc:
                (folder / f"{name}.log").write_text(f"logs unavailable: {exc}")
        return folder

    def cleanup(self) -> None:
        for c in self.client.containers.list(all=True, filters={"label": f"pviommu.test-run={self.run_id}"}):
            c.remove(force=True, v=True)
        if self.network is not None:
            self.network.remove()
        if self.volume is not None:
            self.volume.remove(force=True)


@pytest.fixture
def docker_host(request: pytest.FixtureRequest, docker_client: Any, image: str) -> Iterator[DockerHost]:
    """Hypervisor, guest0/guest1 (self-provisioned partitions), dsa0/dsa1 (assigned to them)."""
    run_id = f"pvt-{uuid.uuid4().hex[:8]}"
    host = DockerHost(docker_client, image, run_id)
    host.network = docker_client.networks.create(run_id, driver="bridge", labels=host.labels)
    host.volume = docker_client.volumes.create(run_id, driver="local", labels=host.labels,
                                               driver_opts={"type": "tmpfs", "device": "tmpfs", "o": "size=1g"})
    try:
        host.start("hypervisor", "serve", "hypervisor", "--listen", "0.0.0.0:50051", "--memory-dir", "/banks",
                   "--s2-baseline", port=50051)  # the scenario's baseline dmatest needs S2 domains
        host.wait_healthy("hypervisor")
        for g in ("guest0", "guest1"):
            host.start(g, "serve", "guest", "--listen", "0.0.0.0:50061", "--hypervisor", "hypervisor:50051",
                       "--provision", g, "--memory", "128M", "--token-out", f"/banks/tokens/{g}.token", port=50061)
        for d, g in (("dsa0", "guest0"), ("dsa1", "guest1")):
            host.start(d, "serve", "dsa", "--listen", "0.0.0.0:50071", "--advertise", f"{d}:50071",
                       "--hypervisor", "hypervisor:50051", "--name", d, "--assign", g, port=50071)
        host.wait_healthy("guest0", "guest1", "dsa0", "dsa1")
        yield host
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(f"container logs saved in {host.save_logs(request.node.name)}")
        host.cleanup()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
