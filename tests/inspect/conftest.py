"""Fixtures of the inspection/trace tests: real hypervisors on 127.0.0.1:0
built by ``hypervisor_svc.main.build`` (the hypervisor tests' kit, hvkit),
stopped in teardown."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# tests/ is not a package (importlib mode): make the kits importable by name.
_HERE = Path(__file__).parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "hypervisor"))

from hvkit import make_hv  # noqa: E402, F401  (a shared fixture)

settings.register_profile(
    "inspect", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
