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
    env = start_hypervisor(tmp_path)
    yield env
    env.close()
