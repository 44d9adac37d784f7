"""Counters, long mode and hypothesis settings of the isolation / robustness fuzz suites
(tests/robustness and fuzz/; the atheris targets import it as ``tests.kit.robustkit`` with
the repository root on ``sys.path``).

The rigs live beside it: ``tests.kit.refwalk`` (the independent reference walker),
``tests.kit.dsarig`` (Host + Hypercalls + IommuUnit + DsaDevice in process, and the
isolation checks), ``tests.kit.descstrategies`` (drawing DSA descriptors).
"""

from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path

from hypothesis import HealthCheck, settings

# -- counts for the report in docs/security.md ----------------------------------------------
COUNTS: collections.Counter[str] = collections.Counter()
_COUNTS_LOCK = threading.Lock()


def count(name: str, n: int = 1) -> None:
    with _COUNTS_LOCK:
        COUNTS[name] += n


def long_mode() -> bool:
    return os.environ.get("PVIOMMU_LONG", "") not in ("", "0")


#: PVIOMMU_LONG=1 multiplies every fuzz test's examples by this
LONG_FACTOR = 20
settings.register_profile(
    "robustness-ci", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile(
    "robustness-long", settings.get_profile("robustness-ci"), max_examples=100 * LONG_FACTOR,
)
#: the hypothesis profile robust_settings(n) starts from (n scaled by LONG_FACTOR in long mode)
PROFILE = "robustness-long" if long_mode() else "robustness-ci"


def robust_settings(examples: int) -> settings:
    """Hypothesis settings of one fuzz test: ``examples`` in CI, ``LONG_FACTOR`` times
    that with PVIOMMU_LONG=1; deadline off (a DMA step is milliseconds, a walk of
    a 2 MiB transfer through the reference walker much more)."""
    base = settings.get_profile(PROFILE)
    return settings(base, max_examples=examples * (LONG_FACTOR if long_mode() else 1), deadline=None,
                    suppress_health_check=list(HealthCheck))


def dump_counts(path: str | os.PathLike[str] | None = None) -> dict[str, int]:
    data = dict(sorted(COUNTS.items()))
    target = path or os.environ.get("PVIOMMU_FUZZ_COUNTS")
    if target:
        Path(target).write_text(json.dumps(data, indent=2) + "\n")
    return data
