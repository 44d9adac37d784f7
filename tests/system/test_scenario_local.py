"""The scripted scenario (the one docker-compose runs) against local processes."""

from __future__ import annotations

import pytest

from pvctl.local import VirtualSystem
from pvctl.scenario import GuestRef, Scenario

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]


@pytest.mark.parametrize("revision", ["rfc", "v1", "v2"])
def test_scenario_passes_against_a_local_two_guest_system(revision: str) -> None:
    with VirtualSystem(guests=2, devices_per_guest=1, memory_bytes=128 << 20, guest_args=["--revision", revision],
                       hypervisor_args=["--revision", revision, "--s2-baseline"]) as system:
        assert system.hypervisor is not None
        guests = [GuestRef(f"guest{g.index}", g.process.address, g.token) for g in system.guests if g.process]
        # the latest revision gets the full run; the older ones a shorter one (CI time)
        scenario = Scenario(system.hypervisor.address, system.admin_token, guests,
                            iterations=30 if revision == "v2" else 10)
        ok = scenario.run()
        failed = [(s.name, s.detail) for s in scenario.steps if not s.ok]
        assert ok, failed
        assert [s.name for s in scenario.steps] == ["iommu-present", "devices-assigned", "dmatest-nested",
                                                    "dmatest-baseline", "isolation", "stale-iotlb-hazard"]
        stale = next(s for s in scenario.steps if s.name == "stale-iotlb-hazard").data
        assert stale["stale_status"] == 0x01 and stale["after_flush_status"] == 0x03
        present = next(s for s in scenario.steps if s.name == "iommu-present").data
        assert {g["revision"] for g in present.values()} == {revision}


def test_scenario_baseline_step_fails_clearly_without_the_s2_option() -> None:
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=64 << 20) as system:
        assert system.hypervisor is not None
        guests = [GuestRef("guest0", g.process.address, g.token) for g in system.guests if g.process]
        scenario = Scenario(system.hypervisor.address, system.admin_token, guests, iterations=5)
        scenario._connect()
        try:
            step = scenario.step("dmatest-baseline", lambda: scenario.check_dmatest("baseline"))
        finally:
            scenario.close()
        assert not step.ok and "--s2-baseline" in step.detail
