"""Fixtures and settings of the isolation / robustness fuzz suites.

Hypothesis profiles: ``robustness-ci`` (the default: bounded examples, the
whole folder runs in about a minute) and ``robustness-long`` (``PVIOMMU_LONG=1``:
20x the examples of every test). Tests take their settings from
``robustkit.robust_settings(n)``, so loading a profile here changes nothing for the
other test folders. Counts of what was fuzzed are printed at the end of the
session (and written as JSON to ``$PVIOMMU_FUZZ_COUNTS`` when set).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# tests/ is not a package (importlib mode): make the kits importable by name.
_HERE = Path(__file__).parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "hypervisor"))

import robustkit  # noqa: E402

LONG_FACTOR = 20

settings.register_profile(
    "robustness-ci", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile(
    "robustness-long", settings.get_profile("robustness-ci"), max_examples=100 * LONG_FACTOR,
)
#: the profile robustkit.robust_settings(n) starts from (it scales n by LONG_FACTOR in long mode)
robustkit.PROFILE = "robustness-long" if robustkit.long_mode() else "robustness-ci"
robustkit.LONG_FACTOR = LONG_FACTOR


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = robustkit.dump_counts()
    if counts:
        terminalreporter.write_sep("-", "robustness fuzz counts" + (" (long mode)" if robustkit.long_mode() else ""))
        for name, value in counts.items():
            terminalreporter.write_line(f"{name}: {value}")
