"""The memory banks live on a memory file system in every layout -- a tmpfs
volume under compose, an emptyDir with medium Memory on Kubernetes -- big
enough for the partitions each layout creates; compose stacks are
parameterised for parallel CI jobs and for host scripts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pviommu.units import parse_size

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PORTS = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.ports.yml").read_text())
JOB = yaml.safe_load((ROOT / "deploy" / "k8s" / "virtual-host-job.yaml").read_text())


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _k8s_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT])i", text)
    assert m, text
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def test_compose_banks_are_one_tmpfs_volume_mounted_by_every_service_at_the_hypervisors_memory_dir() -> None:
    opts = COMPOSE["volumes"]["banks"]["driver_opts"]
    assert opts["type"] == "tmpfs" and opts["device"] == "tmpfs"
    assert _arg(COMPOSE["services"]["hypervisor"]["command"], "--memory-dir") == "/banks"
    for name, svc in COMPOSE["services"].items():
        assert "banks:/banks" in svc["volumes"], name


def test_kubernetes_banks_are_an_in_memory_emptydir_at_the_hypervisors_memory_dir() -> None:
    spec = JOB["spec"]["template"]["spec"]
    banks = next(v for v in spec["volumes"] if v["name"] == "banks")
    assert banks["emptyDir"]["medium"] == "Memory"
    hv = next(c for c in spec["initContainers"] if c["name"] == "hypervisor")
    assert _arg(hv["args"], "--memory-dir") == "/banks"


def test_both_layouts_size_the_banks_alike_and_hold_every_partition() -> None:
    size = parse_size(re.fullmatch(r"size=(\S+)", COMPOSE["volumes"]["banks"]["driver_opts"]["o"]).group(1))
    spec = JOB["spec"]["template"]["spec"]
    limit = _k8s_size(next(v for v in spec["volumes"] if v["name"] == "banks")["emptyDir"]["sizeLimit"])
    assert size == limit
    compose_ram = sum(parse_size(_arg(s["command"], "--memory") or "0") for s in COMPOSE["services"].values()
                      if s["command"][:2] == ["serve", "guest"])
    k8s_ram = sum(parse_size(_arg(c["args"], "--memory") or "0") for c in spec["initContainers"]
                  if c["args"][:2] == ["serve", "guest"])
    assert 0 < compose_ram <= size and 0 < k8s_ram <= limit


def test_compose_image_tag_is_configurable_and_ports_publish_only_when_asked() -> None:
    anchor = COMPOSE["x-pviommu"]["image"]
    assert anchor.startswith("${PVIOMMU_IMAGE:-") and anchor.endswith("}")
    assert all("ports" not in svc for svc in COMPOSE["services"].values()), "no host port unless asked"
    published = {name: svc["ports"] for name, svc in PORTS["services"].items()}
    assert set(published) == {"hypervisor", "guest0", "guest1"}
    for ports in published.values():  # an ephemeral host port on loopback unless PVIOMMU_PUBLISH_HOST says more
        assert re.fullmatch(r"\$\{PVIOMMU_PUBLISH_HOST:-127\.0\.0\.1\}::(50051|50061)", ports[0]), ports
