"""Concurrency fuzz of ownership changes (racekit.py): DMA from every partition
on every device, honest and hostile (other partitions' IOVAs, stale sessions,
descriptors that arrive after their owner lost the device), while a seeded
scheduler attaches, detaches, reconfigures, remaps with and without flushes,
deletes domains (a pool of 6 tags, so tags are reused all the time), moves
devices between partitions and resets partitions. With the SVA proposal on
(racepasid.py; PVIOMMU_RACE_PASID=0 leaves it out) the scheduler also binds and
unbinds PASIDs to domains and a quarter of the descriptors are PASID-tagged on a
shared WQ, with PASIDs of a pool every partition uses. After every step: no
host run of any descriptor left its owner's pages, no PASID translation reached
memory without a binding of the owner, no never-mapped RAM changed.
Bounded in CI; PVIOMMU_LONG=1 runs 20x the steps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.kit import racekit, robustkit

STEPS = 150


@pytest.mark.parametrize("seed", [1, 2])
def test_no_descriptor_reaches_memory_outside_its_owner_while_ownership_and_domains_change(
        tmp_path: Path, seed: int) -> None:
    steps = STEPS * (robustkit.LONG_FACTOR if robustkit.long_mode() else 1)
    race = racekit.Race(tmp_path, seed)
    try:
        for s in race.submitters:
            s.start()
        time.sleep(0.05)
        done: dict[str, int] = {}
        for step in range(steps):
            op = race.step()
            done[op] = done.get(op, 0) + 1
            race.check(step, op)
        time.sleep(0.2)  # the last descriptors in flight complete (or are dropped) and are judged too
        race.check(steps, "end")
    finally:
        race.close()
    submitted = sum(s.submitted for s in race.submitters)
    stale = sum(s.stale for s in race.submitters)
    refused = sum(s.refused for s in race.submitters)
    moves = race.counts.get("move", 0) + race.counts.get("reset", 0)
    robustkit.count("race_steps", steps)
    robustkit.count("race_ownership_changes", moves)
    robustkit.count("race_domain_changes", sum(v for k, v in race.counts.items()
                                               if k not in ("move", "reset") and not k.startswith("pasid")))
    robustkit.count("race_descriptors", submitted)
    robustkit.count("race_stale_submissions", stale)
    robustkit.count("race_refused_sessions", refused)
    robustkit.count("race_runs_checked", race.oracle.runs_checked)
    robustkit.count("race_fences", sum(d.fences for d in race.devices))
    robustkit.count("race_escapes", len(race.oracle.violations))
    # the fuzz did what it claims: devices moved, sessions went stale and were refused, DMA ran
    assert moves >= 5 and submitted > 500 and race.oracle.runs_checked > 100
    assert refused + stale > 0
    if race.pasid:
        pasids = race.oracle.pasids
        pasid_submitted = sum(s.pasid_submitted for s in race.submitters)
        robustkit.count("race_pasid_binds", pasids.binds)
        robustkit.count("race_pasid_unbinds", pasids.unbinds)
        robustkit.count("race_pasid_refused", race.counts.get("pasid_refused", 0))
        robustkit.count("race_pasid_descriptors", pasid_submitted)
        robustkit.count("race_pasid_retries", sum(s.pasid_retries for s in race.submitters))
        robustkit.count("race_pasid_runs_checked", pasids.runs_checked)
        robustkit.count("race_pasid_faults", pasids.faults)
        # PASIDs were bound and unbound, PASID-tagged DMA ran and reached memory
        assert pasids.binds >= 3 and pasid_submitted > 100 and pasids.runs_checked > 20
