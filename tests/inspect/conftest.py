"""Fixtures of the inspection/trace tests: real hypervisors on 127.0.0.1:0
built by ``hypervisor_svc.main.build`` (the hypervisor tests' kit, hvkit),
stopped in teardown."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# tests/ is not a package (importlib mode): make the kits importable by name.
_HERE = Path(__file__).parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "hypervisor"))

from hvkit import ADMIN_TOKEN, HvEnv  # noqa: E402

settings.register_profile(
    "inspect", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


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
        if env.host.trace is not None:
            env.host.trace.close()
        env.close()
