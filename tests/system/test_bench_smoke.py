"""``pviommu bench --quick``: the suite runs against real services and reports
every section with numeric ratios. No assertion on speed (the figures are
machine- and load-dependent; docs/benchmarks.md holds a full run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from pvctl.benchmarks.report import SECTIONS

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


def test_bench_banks_compares_tmpfs_with_a_disk_folder_and_keeps_one_block(tmp_path: Path) -> None:
    from pvctl.benchmarks.banks import BLOCK_END, BLOCK_START

    out = tmp_path / "benchmarks.md"
    out.write_text(f"# report\n\nkept text\n\n{BLOCK_START}\nold figures\n{BLOCK_END}\n\ntail\n")
    proc = subprocess.run([sys.executable, "-m", "pvctl.cli", "bench", "--banks", "--quick", "--json", "--output",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert set(result["best"]) == {"tmpfs", "disk"}
    for figures in result["best"].values():
        assert figures["touch_mib_s"] > 0 and figures["iops"] > 0 and figures["kb_s"] > 0
    if result["tmpfs_is_memory"] and not result["disk_is_memory"]:
        assert result["best"]["disk"]["dirty_mib"] >= 32, "touching a disk-backed bank leaves dirty page cache"
        assert result["best"]["tmpfs"]["msync_s"] < result["best"]["disk"]["msync_s"]
    text = out.read_text()
    assert text.count(BLOCK_START) == 1 and "old figures" not in text
    assert text.startswith("# report\n\nkept text") and text.rstrip().endswith("tail")
    assert "| dmatest iops, 2 threads, 16 KiB, polled |" in text
