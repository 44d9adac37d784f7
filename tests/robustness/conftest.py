"""Fixtures and settings of the isolation / robustness fuzz suites.

Hypothesis profiles (registered in ``tests.kit.robustkit``): ``robustness-ci``
(the default: bounded examples, the whole folder runs in about a minute) and
``robustness-long`` (``PVIOMMU_LONG=1``: 20x the examples of every test). Tests
take their settings from ``robustkit.robust_settings(n)``, so no profile is loaded
for the other test folders. Counts of what was fuzzed are printed at the end of the
session (and written as JSON to ``$PVIOMMU_FUZZ_COUNTS`` when set).
"""

from __future__ import annotations

import pytest

from tests.kit import robustkit


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = robustkit.dump_counts()
    if counts:
        terminalreporter.write_sep("-", "robustness fuzz counts" + (" (long mode)" if robustkit.long_mode() else ""))
        for name, value in counts.items():
            terminalreporter.write_line(f"{name}: {value}")
