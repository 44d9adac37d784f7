"""``pviommu bench --quick``: the suite runs against real services and reports
every section with numeric ratios. No assertion on speed (the figures are
machine- and load-dependent; docs/benchmarks.md holds a full run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from pvctl.bench import SECTIONS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_json_reports_every_section_with_numeric_ratios() -> None:
    proc = subprocess.run([sys.executable, "-m", "pvctl.cli", "bench", "--quick", "--json", "--output", ""],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["machine"]["cores"] >= 1 and report["machine"]["python"]
    assert report["command"].startswith("pviommu bench")
    for section in SECTIONS:
        rows = report["sections"].get(section)
        assert rows, f"section {section} is missing"
        for row in rows:
            for key in ("value", "reference_value", "ratio"):
                assert isinstance(row[key], int | float) and math.isfinite(row[key]), (section, row)
            assert row["reference_value"] > 0 and row["ratio"] > 0, (section, row)
    names = [r["name"] for r in report["sections"]["dma"]]
    assert any(n.startswith("engine") for n in names) and any(n.startswith("e2e") for n in names)
    reads = next(r for r in report["sections"]["translation"] if r["name"] == "reads per cold walk")
    assert reads["value"] == 24.0
