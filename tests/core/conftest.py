from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package; make the shared builder importable as ``core_env``.
sys.path.insert(0, str(Path(__file__).parent))

from core_env import NestedSystem, build_system


@pytest.fixture
def system(tmp_path: Path) -> Iterator[NestedSystem]:
    sys_ = build_system(tmp_path)
    yield sys_
    sys_.host.close()
