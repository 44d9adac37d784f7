"""Imports point down: the core (pviommu/, including the client and the
pytest plugin) imports no service and not the command line; services import
no other service and not the command line. Checked on the source, so a lazy
import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("hypervisor_svc", "guest_agent", "dma_device")


def _imports(package: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "/v1/" in str(path):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), alias.name.split(".")[0]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return out


def test_the_core_and_the_client_import_no_service_and_no_cli() -> None:
    bad = [(f, m) for f, m in _imports("pviommu") if m in (*SERVICES, "pvctl")]
    assert bad == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service_and_no_cli(service: str) -> None:
    bad = [(f, m) for f, m in _imports(service) if (m in SERVICES and m != service) or m == "pvctl"]
    assert bad == []
