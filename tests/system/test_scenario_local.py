"""The scripted scenario (the one docker-compose runs) against local processes."""

from __future__ import annotations

import pytest

from pvctl.local import VirtualSystem
from pvctl.scenario import GuestRef, Scenario

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]


def test_scenario_passes_against_a_local_two_guest_system() -> None:
    with VirtualSystem(guests=2, devices_per_guest=1, memory_bytes=128 << 20) as system:
        assert system.hypervisor is not None
        guests = [GuestRef(f"guest{g.index}", g.process.address, g.token) for g in system.guests if g.process]
        scenario = Scenario(system.hypervisor.address, system.admin_token, guests, iterations=30)
        ok = scenario.run()
        failed = [(s.name, s.detail) for s in scenario.steps if not s.ok]
        assert ok, failed
        assert [s.name for s in scenario.steps] == ["iommu-present", "devices-assigned", "dmatest-nested",
                                                    "dmatest-baseline", "isolation", "stale-iotlb-hazard"]
        stale = next(s for s in scenario.steps if s.name == "stale-iotlb-hazard").data
        assert stale["stale_status"] == 0x01 and stale["after_flush_status"] == 0x03
