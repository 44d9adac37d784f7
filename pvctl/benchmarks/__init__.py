"""Benchmarks: scripts that print figures (ratios measured in one run), not timed tests."""
