"""Fixtures of the hypervisor service tests: real servers on 127.0.0.1:0,
real channels, everything stopped in teardown (STYLE.md conventions 10-11)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/ is not a package (importlib mode): make the kit importable as ``hvkit``.
sys.path.insert(0, str(Path(__file__).parent))

from hvkit import ADMIN_TOKEN, HvEnv


@pytest.fixture
def make_hv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., HvEnv]]:
    """``make_hv(*extra_args)`` starts a hypervisor built by ``main.build``."""
    monkeypatch.setenv("PVIOMMU_ADMIN_TOKEN", ADMIN_TOKEN)
    envs: list[HvEnv] = []

    def make(*extra: str) -> HvEnv:
        env = HvEnv.start(tmp_path / f"hv{len(envs)}", *extra)
        envs.append(env)
        return env

    yield make
    for env in reversed(envs):
        env.close()


@pytest.fixture
def hv(make_hv: Callable[..., HvEnv]) -> HvEnv:
    return make_hv()
