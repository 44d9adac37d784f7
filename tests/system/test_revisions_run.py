"""``pviommu run`` against every revision, and with the driver and hypervisor of different revisions.

A quick dmatest per revision (real processes: hypervisor, guest agent, DSA device), in the nested
design and in the map-by-hypercall baseline, which changes the device's domain and back. The mixed
runs pin the outcome docs/revisions.md describes: a v1 driver on a v2 hypervisor works (DETACH still
exists), a v2 driver on a v1 hypervisor cannot move a device to another domain (0x66).
"""

from __future__ import annotations

import json

import pytest

from pvctl.cli import main as cli

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    rc = cli(["run", "--iterations", "20", "--no-progress", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("revision", ["rfc", "v1", "v2"])
@pytest.mark.parametrize("design", ["nested", "baseline"])
def test_pviommu_run_passes_for_every_revision(capsys: pytest.CaptureFixture[str], revision: str,
                                               design: str) -> None:
    rc, out = run(capsys, "--revision", revision, "--design", design)
    assert rc == 0, out
    assert out["revision"] == {"hypervisor": revision, "guests": revision}
    total = out["total"]
    assert isinstance(total, dict) and (total["tests"], total["failures"]) == (20, 0)


def test_a_v1_driver_on_a_v2_hypervisor_passes_both_designs(capsys: pytest.CaptureFixture[str]) -> None:
    for design in ("nested", "baseline"):
        rc, out = run(capsys, "--revision", "v2", "--guest-revision", "v1", "--design", design)
        assert rc == 0 and out["revision"] == {"hypervisor": "v2", "guests": "v1"}, out


def test_a_v2_driver_on_a_v1_hypervisor_passes_nested_but_cannot_attach_the_baseline_domain(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "--revision", "v1", "--guest-revision", "v2")
    assert rc == 0, out
    rc, out = run(capsys, "--revision", "v1", "--guest-revision", "v2", "--design", "baseline")
    assert rc == 1 and out["total"]["tests"] == 0  # type: ignore[index]
    assert "HV_STATUS_DEVICE_ALREADY_IN_DOMAIN" in out["errors"]["0"]  # type: ignore[index]
