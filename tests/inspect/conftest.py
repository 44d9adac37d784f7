"""Fixtures of the inspection/trace tests: real hypervisors on 127.0.0.1:0
built by ``hypervisor_svc.main.build`` (the hypervisor tests' kit, hvkit),
stopped in teardown."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from tests.kit.hvkit import make_hv  # noqa: F401  (a shared fixture)

settings.register_profile(
    "inspect", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
