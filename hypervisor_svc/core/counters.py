"""The hypervisor's counters: one object with its own lock, so counting never waits for the host lock."""

from __future__ import annotations

import threading

from pviommu.abi.hv_status import HvStatus


class Counters:
    """Named event counts, hypercalls by (call, status) and faults by reason;
    what GetStats and the Prometheus endpoint export."""

    def __init__(self) -> None:
        self.stats: dict[str, int] = {}
        self.hypercalls: dict[tuple[str, str], int] = {}
        self.faults_by_reason: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def count_call(self, call: str, status: int) -> None:
        key = (call, HvStatus.name_of(status))
        with self._lock:
            self.hypercalls[key] = self.hypercalls.get(key, 0) + 1

    def count_fault(self, reason_name: str) -> None:
        with self._lock:
            self.faults_by_reason[reason_name] = self.faults_by_reason.get(reason_name, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """The named counts plus the two breakdowns, copied at one instant."""
        with self._lock:
            return {**self.stats, "hypercalls": dict(self.hypercalls),
                    "faults_by_reason": dict(self.faults_by_reason)}
