"""The guest agent's operations from the command line, against real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pvctl.local import VirtualSystem

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]


def _cli(address: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PVIOMMU_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "pvctl.cli", "guest", address, *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_guest_cli_allocates_maps_unmaps_and_reports_refusals() -> None:
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=64 << 20) as system:
        g = system.guests[0]
        assert g.process is not None
        addr, dev = g.process.address, g.devices[0]
        info = json.loads(_cli(addr, g.token, "info").stdout)
        assert info["present"] is True and info["iovaWidth"] == 48
        buf = json.loads(_cli(addr, g.token, "alloc", "size=0x2000").stdout)
        out = _cli(addr, g.token, "map", f"logical_device_id={dev:#x}", f"gpa={buf['gpa']}", "size=8192",
                   "direction=TO_DEVICE")
        assert out.returncode == 0, out.stderr
        mapped = json.loads(out.stdout)
        iova = int(mapped["iova"], 16)  # addresses print in hex
        assert not 0xFEE00000 <= iova <= 0xFEEFFFFF
        out = _cli(addr, g.token, "unmap", f"logical_device_id={dev:#x}", f"iova={iova:#x}", "size=8192")
        assert json.loads(out.stdout)["flushed"] is True
        # an IOVA in the MSI window is refused clearly, and the agent keeps answering
        bad = _cli(addr, g.token, "map", f"logical_device_id={dev:#x}", f"gpa={buf['gpa']}", "size=4096",
                   "iova=0xfee00000")
        assert bad.returncode == 64 + 3 and "INVALID_ARGUMENT" in bad.stderr and "MSI" in bad.stderr
        wrong = _cli(addr, g.token, "map", "nosuchfield=1")
        assert wrong.returncode == 2 and "no field 'nosuchfield'" in wrong.stderr
        assert json.loads(_cli(addr, g.token, "stats").stdout)["counters"]["maps"] >= "1"
