from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.core_env import NestedSystem, build_system


@pytest.fixture
def system(tmp_path: Path) -> Iterator[NestedSystem]:
    sys_ = build_system(tmp_path)
    yield sys_
    sys_.host.close()
