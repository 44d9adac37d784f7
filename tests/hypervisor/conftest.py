"""Fixtures of the hypervisor service tests: real servers on 127.0.0.1:0,
real channels, everything stopped in teardown (STYLE.md conventions 10-11)."""

from __future__ import annotations

import pytest

from tests.kit.hvkit import HvEnv, make_hv  # noqa: F401  (make_hv: a shared fixture)


@pytest.fixture
def hv(request: pytest.FixtureRequest) -> HvEnv:
    """The latest revision with the map-by-hypercall baseline on (these suites exercise S2
    domains); ``make_hv()`` gives the default hypervisor, test_revisions.py each revision."""
    env: HvEnv = request.getfixturevalue("make_hv")("--s2-baseline")
    return env
