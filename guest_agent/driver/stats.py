"""Thread-safe event counters of the agent (what ``GetStats`` reports)."""

from __future__ import annotations

import threading
from collections import Counter


class Stats:
    """Named counters; every increment is one decision the driver took."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)
