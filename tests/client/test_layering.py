"""Imports point down: the core (pviommu/, including the client and the
pytest plugin) imports no service and not the command line; services import
no other service and not the command line. Checked on the source, so a lazy
import inside a function, one under TYPE_CHECKING and an
``importlib.import_module("...")`` with a literal name all count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("hypervisor_svc", "guest_agent", "dma_device")
#: floor of each top-level package: imports may only point at a lower floor or the same package
FLOOR = {"pviommu": 1, "hypervisor_svc": 2, "guest_agent": 2, "dma_device": 2, "pvctl": 3}


def _imported(source: str, filename: str) -> list[str]:
    """The top-level package of every absolute import in ``source``."""
    out: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append(node.args[0].value.split(".")[0])
    return out


def _wrong_way(package: str, imported: str) -> bool:
    """Up a floor, or sideways into another package of the same floor."""
    if imported == package or imported not in FLOOR:
        return False
    return FLOOR[imported] >= FLOOR[package]


def _violations(package: str) -> list[tuple[str, str]]:
    files = [p for p in sorted((ROOT / package).rglob("*.py")) if "/v1/" not in str(p)]
    assert files, f"no sources found under {ROOT / package}"
    return [(str(p.relative_to(ROOT)), m) for p in files for m in _imported(p.read_text(), str(p))
            if _wrong_way(package, m)]


def test_the_core_and_the_client_import_no_service_and_no_cli() -> None:
    assert _violations("pviommu") == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service_and_no_cli(service: str) -> None:
    assert _violations(service) == []


@pytest.mark.parametrize(("package", "source"), [
    ("pviommu", "import guest_agent.main\n"),
    ("pviommu", "def f():\n    from pvctl.cli import main\n"),
    ("pviommu", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dma_device.main import build\n"),
    ("guest_agent", "from hypervisor_svc.core import host\n"),
    ("dma_device", "import importlib\nimportlib.import_module('guest_agent.agent')\n"),
    ("hypervisor_svc", "from pvctl.units import parse_size\n"),
])
def test_the_check_sees_every_import_that_points_up_or_sideways(package: str, source: str) -> None:
    assert any(_wrong_way(package, m) for m in _imported(source, "<case>"))


@pytest.mark.parametrize(("package", "source"), [
    ("guest_agent", "from pviommu.units import parse_size\nfrom guest_agent.driver import domain\n"),
    ("pvctl", "import hypervisor_svc.main\nimport guest_agent.main\nimport dma_device.main\n"),
    ("pviommu", "import grpc\nfrom pviommu.addr import Iova\n"),
])
def test_the_check_lets_imports_that_point_down_through(package: str, source: str) -> None:
    assert not any(_wrong_way(package, m) for m in _imported(source, "<case>"))
