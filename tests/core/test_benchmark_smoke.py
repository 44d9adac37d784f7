from __future__ import annotations

from pvctl.benchmarks import translation


def test_translation_benchmark_quick_run_reports_24_reads_and_ratios() -> None:
    result = translation.run(quick=True)
    assert result["reads_per_cold_walk"] == 24.0
    # neighbouring pages after a flush: the first walk full, the others from the paging-structure caches
    assert result["reads_per_walk_pscache"] < 6.0
    # warm translations are IOTLB hits that read no table (a count: which is faster is the benchmark's row)
    assert result["reads_per_warm_translation"] == 0.0
    assert result["warm_translations_per_s"] > 0 and result["cold_translations_per_s"] > 0
    assert result["copy_4k_runs_per_MiB"] == 1 and result["copy_2m_runs_per_MiB"] == 1
    assert 0 < result["copy_4k_over_memmove"] and 0 < result["copy_2m_over_memmove"]
