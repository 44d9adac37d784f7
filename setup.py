"""Build hook: generate the gRPC/protobuf stubs from protos/ at install time.

The stubs (``pviommu/v1/*_pb2*.py`` and their ``.pyi``) are never committed;
``pip install .`` and ``pip install -e .`` both run ``build_py``, which calls
``grpc_tools.protoc`` first. protos/ mirrors the package path
(``protos/pviommu/v1/x.proto`` with ``package pviommu.v1``), so the generated
absolute imports (``from pviommu.v1 import common_pb2``) resolve both from an
installed package and from a checkout, with no import rewriting.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_protos() -> None:
    from grpc_tools import protoc  # build requirement (pyproject.toml)

    bindir = Path(sys.executable).parent  # the plugins live beside the interpreter of a venv
    plugins = [
        f"--plugin=protoc-gen-{name}={bindir / ('protoc-gen-' + name)}"
        for name in ("mypy", "mypy_grpc")
        if (bindir / ("protoc-gen-" + name)).exists()
    ]
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        *plugins,
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed: see the messages above")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
