"""Shared plumbing of the atheris targets: make the test kits (tests.kit) importable and
quiet the services' logs (a fuzzer prints millions of lines otherwise)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import structlog

os.environ.setdefault("PVIOMMU_LOG_LEVEL", "critical")  # before the services configure logging
ROOT = Path(__file__).resolve().parent.parent
ROBUSTNESS = ROOT / "tests" / "robustness"
if str(ROOT) not in sys.path:  # a script run from fuzz/: the rigs are tests.kit.*, as under pytest
    sys.path.insert(0, str(ROOT))



def quiet() -> None:
    """Drop the services' log lines (call after importing them: they configure structlog)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.disable(logging.CRITICAL)


def load_test_module(name: str) -> ModuleType:
    """Import tests/robustness/<name>.py (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"robustness_{name}", ROBUSTNESS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def with_default_max_len(argv: list[str], max_len: int = 8192) -> list[str]:
    """hypothesis consumes a few bytes per choice: start atheris with room for a whole step."""
    extra = [] if any(a.startswith("-max_len=") for a in argv) else [f"-max_len={max_len}"]
    if not any(a.startswith("-len_control=") for a in argv):
        extra.append("-len_control=0")  # no slow ramp-up from 4-byte inputs
    return [*argv, *extra]
