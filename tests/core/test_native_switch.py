"""The compiled core is optional: ``PVIOMMU_NATIVE=0`` (or no build) leaves
the Python implementation alone, with a clear reason, and its benchmark says
so and still measures the reference. These tests run with or without the build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pviommu.iommu import native

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_env_switch_forces_the_python_implementation_with_a_clear_error() -> None:
    out = _python(
        "from pathlib import Path\n"
        "from pviommu.iommu import native\n"
        "from pviommu.mem.bank import HostMemory\n"
        "print(native.AVAILABLE, native.UNAVAILABLE_REASON, sep='|')\n"
        "try:\n"
        "    native.NativeWalker(HostMemory(Path('/nonexistent')))\n"
        "except native.NativeUnavailable as exc:\n"
        "    print('refused:', exc)\n",
        PVIOMMU_NATIVE="0",
    )
    first, refused = out.split("\n")
    available, reason = first.split("|")
    assert available == "False" and "PVIOMMU_NATIVE=0" in reason
    assert refused == f"refused: {reason}"


def test_build_script_skips_quickly_when_switched_off() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "native" / "build.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PVIOMMU_NATIVE": "0"}, check=False)
    assert done.returncode == 0 and "not built" in done.stderr


def test_native_benchmark_quick_run_reports_both_sides_or_says_why_not() -> None:
    from pvctl.benchmarks import native as bench

    r = bench.run(quick=True)
    assert r["py_walks_per_s"] > 0 and r["py_lookup_span_per_s"] > 0 and r["memmove_MiB_per_s"] > 0
    if not native.AVAILABLE:
        assert r["native_unavailable_reason"] and "native_walks_per_s" not in r
        pytest.skip(f"compiled half not measured: {native.UNAVAILABLE_REASON}")
    for key in ("walks", "lookup_span", "lookup", "translate_warm", "translate_cold", "copy_MiB"):
        assert r[f"native_{key}_per_s"] > 0 and r[f"native_over_py_{key}"] > 0
    assert r["native_loop_walks_per_s"] > 0


def test_native_module_is_absent_from_a_tree_without_the_build() -> None:
    """A checkout without the built module imports the shim cleanly (what a
    machine without cargo sees): AVAILABLE is False and says the module is not built."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pviommu._native': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pviommu.iommu import native\n"
        "print(native.AVAILABLE, native.UNAVAILABLE_REASON, sep='|')\n"
    )
    out = _python(code, PVIOMMU_NATIVE="")  # not switched off: only the missing module speaks
    available, reason = out.split("|")
    assert available == "False" and "not built" in reason
