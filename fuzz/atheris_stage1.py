"""atheris target: hostile stage-1 tables driven by coverage-guided input.

Runs exactly the step of tests/robustness/test_hostile_stage1.py (same rig:
real Host + Hypercalls + IommuUnit + DsaDevice, same invariant after every
step) with hypothesis's ``fuzz_one_input`` turning atheris' bytes into the
step's choices. A violated invariant raises, and atheris saves the input.

    .venv/bin/python fuzz/atheris_stage1.py -runs=100000 [corpus_dir]
    .venv/bin/python fuzz/atheris_stage1.py -max_total_time=3600 -five_level   (5-level rig)
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
    import dma_device.dsa.access
    import dma_device.dsa.checks
    import dma_device.dsa.device
    import dma_device.dsa.ops  # noqa: F401
    import hypervisor_svc.core.host
    import hypervisor_svc.core.hypercalls  # noqa: F401
    import pviommu.iommu.context
    import pviommu.iommu.iotlb
    import pviommu.iommu.nested
    import pviommu.iommu.unit
    import pviommu.mem.dma
    import pviommu.pt.fmt.x86_64  # noqa: F401
    from tests.kit import dsarig
    from tests.kit import robustkit as rk

    t1 = _common.load_test_module("test_hostile_stage1")

_common.quiet()
FIVE = "-five_level" in sys.argv
ARGS = [a for a in sys.argv if a != "-five_level"]
TMP = Path(tempfile.mkdtemp(prefix="pviommu-atheris-stage1-"))
RIG = dsarig.DsaRig(TMP, five_level=FIVE)


def _cleanup() -> None:
    RIG.close()
    shutil.rmtree(TMP, ignore_errors=True)
    print(rk.dump_counts(), file=sys.stderr)


atexit.register(_cleanup)


@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def step(data: st.DataObject) -> None:
    t1.hostile_step(RIG, data)
    rk.count("atheris_steps")
    if rk.COUNTS["atheris_steps"] % 50 == 0:
        rk.dump_counts()  # atheris leaves by os._exit: keep $PVIOMMU_FUZZ_COUNTS current


def main() -> None:
    atheris.Setup(_common.with_default_max_len(ARGS), step.hypothesis.fuzz_one_input)  # type: ignore[attr-defined]
    atheris.Fuzz()


if __name__ == "__main__":
    main()
