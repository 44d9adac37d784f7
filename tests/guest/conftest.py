from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.guest_env import HvEnv, start_hypervisor


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[HvEnv]:
    """The latest revision, with the map-by-hypercall baseline on: these tests drive both
    designs (tests/guest/test_revisions.py covers the hypervisor without it)."""
    env = start_hypervisor(tmp_path, False, "--s2-baseline")
    yield env
    env.close()
