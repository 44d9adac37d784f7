"""The pure core (layouts, addresses, page tables, the IOMMU unit, memory)
imports no transport: no sockets, no gRPC, not the core's own transport
packages (``pviommu.shm``: the invalidation queue, rings, session sockets;
``pviommu.rpc``, ``pviommu.client``, ``pviommu.v1``). Those sit beside it on
floor 1 only because two services share them and services cannot import
each other. Checked on the source, so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "pviommu"
TRANSPORT = ("pviommu.shm", "pviommu.rpc", "pviommu.client", "pviommu.v1", "pviommu.pytest_plugin")
FORBIDDEN = ("socket", "selectors", "select", "grpc", "grpc_health", "grpc_reflection", "grpc_status",
             "google.protobuf", *TRANSPORT)


def _pure_files() -> list[Path]:
    skip = {ROOT / "shm", ROOT / "rpc", ROOT / "client", ROOT / "v1"}
    return [p for p in sorted(ROOT.rglob("*.py"))
            if not any(p.is_relative_to(d) for d in skip) and p.name != "pytest_plugin.py"]


def _imported(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return out


def test_the_pure_core_imports_no_socket_grpc_or_transport_package() -> None:
    files = _pure_files()
    assert ROOT / "abi" / "invq.py" in files and ROOT / "iommu" / "unit.py" in files  # the check sees the core
    bad = sorted({(str(p.relative_to(ROOT.parent)), m) for p in files for m in _imported(p)
                  if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)})
    assert bad == []
