"""Every hypercall the decoder accepts has exactly one handler, named for its code."""

from __future__ import annotations

from pathlib import Path

from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls
from pviommu.abi import hv
from pviommu.abi.hv import sva as sva_abi


def test_every_decodable_call_code_has_exactly_its_own_handler(tmp_path: Path) -> None:
    host = Host(tmp_path, "admin-token")
    try:
        calls = Hypercalls(host)
        codes = {int(c) for c in hv.CALLS} | {int(c) for c in sva_abi.SVA_CALLS}
        assert set(calls.handlers) == codes
        for code, handler in calls.handlers.items():
            name = (hv.HvCallCode(code) if code in hv.CALLS else sva_abi.SvaCallCode(code)).name
            assert handler.__name__ == "do_" + name.lower()
    finally:
        host.close()
