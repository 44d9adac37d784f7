"""atheris target: hostile hypercalls against a real gRPC hypervisor.

Runs the step of tests/robustness/test_hostile_hypercalls.py (typed methods
and raw HvCall, every kind of credential; defined HV status, refusals change
nothing, no partition reaches the other) with atheris' bytes as the choices.

    .venv/bin/python fuzz/atheris_hypercall.py -runs=100000 [corpus_dir]
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import _common
import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

with atheris.instrument_imports():  # the product code, then the rig
    import hypervisor_svc.core.host
    import hypervisor_svc.core.hypercalls
    import hypervisor_svc.rpc.hypercall_servicer  # noqa: F401
    import pviommu.abi.hv
    import pviommu.rpc.auth  # noqa: F401
    from tests.kit import robustkit as rk

    t2 = _common.load_test_module("test_hostile_hypercalls")

_common.quiet()
TMP = Path(tempfile.mkdtemp(prefix="pviommu-atheris-hv-"))
_WORLD_CM = t2.make_world(TMP)
WORLD = _WORLD_CM.__enter__()


def _cleanup() -> None:
    _WORLD_CM.__exit__(None, None, None)
    shutil.rmtree(TMP, ignore_errors=True)
    print(rk.dump_counts(), file=sys.stderr)


atexit.register(_cleanup)


@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def step(data: st.DataObject) -> None:
    t2.hostile_calls(WORLD, data)
    rk.count("atheris_steps")
    if rk.COUNTS["atheris_steps"] % 50 == 0:
        rk.dump_counts()  # atheris leaves by os._exit: keep $PVIOMMU_FUZZ_COUNTS current


def main() -> None:
    atheris.Setup(_common.with_default_max_len(sys.argv), step.hypothesis.fuzz_one_input)  # type: ignore[attr-defined]
    atheris.Fuzz()


if __name__ == "__main__":
    main()
