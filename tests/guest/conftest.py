from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package; make the shared builder importable as ``guest_env``.
sys.path.insert(0, str(Path(__file__).parent))

from guest_env import HvEnv, start_hypervisor


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[HvEnv]:
    """The latest revision, with the map-by-hypercall baseline on: these tests drive both
    designs (tests/guest/test_revisions.py covers the hypervisor without it)."""
    env = start_hypervisor(tmp_path, False, "--s2-baseline")
    yield env
    env.close()
