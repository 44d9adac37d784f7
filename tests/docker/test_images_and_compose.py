"""Containers for pipelines: a runtime-only image, compose stacks that
parallel CI jobs can run side by side (own project, own image tag) and that
host scripts find (published ports + ``pviommu compose endpoints``), and the
README's container steps, run in the order written in a fresh copy of the
checkout. Selected with ``-m docker``; skipped where no Docker Engine answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pviommu.client import System

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

COMPOSE = ["docker-compose", "-f", "docker-compose.yml", "-f", "deploy/docker/compose.ports.yml"]


def _compose_env(project: str, image: str) -> dict[str, str]:
    return {**os.environ, "COMPOSE_PROJECT_NAME": project, "PVIOMMU_IMAGE": image,
            "PVIOMMU_ADMIN_TOKEN": f"admin-{project}"}


def _labelled(client: Any, project: str) -> tuple[list[Any], list[Any]]:
    label = {"label": f"com.docker.compose.project={project}"}
    return client.containers.list(all=True, filters=label), client.volumes.list(filters=label)


def test_the_runtime_image_holds_runtime_dependencies_only(docker_client: Any, image: str, base: str) -> None:
    probe = ("import importlib.util as u, json; print(json.dumps({m: bool(u.find_spec(m)) for m in "
             "['grpc_tools', 'docker', 'requests', 'setuptools', 'pip', 'pytest', 'grpc', 'rich', 'pviommu.client', "
             "'pvctl', 'hypervisor_svc', 'guest_agent', 'dma_device']}))")
    out = docker_client.containers.run(image, ["-c", probe], entrypoint="python3", remove=True)
    found = json.loads(out.decode().strip().splitlines()[-1])
    assert [m for m in ("grpc_tools", "docker", "requests", "setuptools", "pip", "pytest") if found[m]] == []
    assert all(found[m] for m in ("grpc", "rich", "pviommu.client", "pvctl", "hypervisor_svc", "guest_agent",
                                  "dma_device"))
    size = docker_client.images.get(image).attrs["Size"]
    added = size - docker_client.images.get(base).attrs["Size"]
    assert added < 80 * 1024 * 1024, f"the pviommu layers add {added >> 20} MiB to the base"


@pytest.fixture
def stack(docker_client: Any, image: str) -> Iterator[tuple[str, dict[str, str]]]:
    project = f"pvt{uuid.uuid4().hex[:8]}"
    env = _compose_env(project, image)
    try:
        subprocess.run([*COMPOSE, "up", "-d", "--no-build", "hypervisor", "guest0", "guest1", "dsa0", "dsa1"],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        yield project, env
    finally:
        subprocess.run([*COMPOSE, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env, capture_output=True,
                       timeout=300)


def test_a_compose_stack_runs_under_its_own_project_and_tag_and_host_scripts_find_it(
        docker_client: Any, image: str, stack: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    project, env = stack
    containers, volumes = _labelled(docker_client, project)
    assert len(containers) == 5 and all(c.name.startswith(f"{project}_") for c in containers)
    assert {c.image.tags[0] for c in containers} == {image}
    assert [v.name for v in volumes] == [f"{project}_banks"]
    ep = tmp_path / "endpoints.json"
    out = subprocess.run([sys.executable, "-m", "pvctl.cli", "compose", "endpoints", "-p", project, "-o", str(ep),
                          "--wait", "120"], capture_output=True, text=True, timeout=200, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(ep.read_text())
    assert data["kind"] == "compose" and data["hypervisor"]["admin_token"] == f"admin-{project}"
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", g["address"]) for g in data["guests"])  # published ports
    system = System.from_endpoints(ep).wait_ready(timeout=120)
    try:
        dev = system.guests[0].devices[0]
        src = dev.alloc_map(4096, "to-device", fill=0x42)
        dst = dev.alloc_map(4096, "from-device")
        assert dev.memmove(dst, src).ok and dst.read() == b"\x42" * 4096
        assert {p.name for p in system.admin.partitions()} == {"guest0", "guest1"}
        assert system.cleanup() == []
    finally:
        system.close()


def _fresh_copy(dest: Path) -> Path:
    """The checkout as a new clone would have it: tracked files and this
    change, no .venv, no wheels, no build output."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file() and not name.startswith(("deploy/docker/wheels/", ".venv/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_the_readme_container_steps_work_in_the_order_written(docker_client: Any, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- container-steps -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    steps = [ln.split("  #", 1)[0].strip() for ln in block.splitlines() if ln.strip()]
    assert steps[-2].startswith("docker-compose up") and steps[-1] == "docker-compose down -v"
    copy = _fresh_copy(tmp_path / "checkout")
    assert not (copy / ".venv").exists() and not (copy / "deploy/docker/wheels").exists()
    project, tag = f"pvreadme{uuid.uuid4().hex[:6]}", f"pviommu:readme-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST_"))}
    env.update(COMPOSE_PROJECT_NAME=project, PVIOMMU_IMAGE=tag, PATH=os.environ["PATH"])
    script = "set -euo pipefail\n" + "\n".join(steps) + "\n"
    started = time.monotonic()
    try:
        out = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                             timeout=1500)
        assert out.returncode == 0, (out.stdout[-6000:], out.stderr[-4000:])
        assert "scenario: 6 passed, 0 failed" in out.stdout, out.stdout[-4000:]
    finally:
        subprocess.run(["docker-compose", "down", "-v", "--remove-orphans"], cwd=copy, env=env, capture_output=True,
                       timeout=300)
        try:
            docker_client.images.remove(tag)
        except Exception:
            pass
    print(f"README container steps: {time.monotonic() - started:.0f}s")
    assert _labelled(docker_client, project) == ([], [])
