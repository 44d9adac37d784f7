"""What every benchmark reports: a figure next to a reference measured in the
same run, as a ratio (absolute times on shared machines are noisy), and the
helpers that measure rates, percentiles and the memmove reference."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pviommu.units import KiB, MiB

#: the report's sections, in the order they are printed
SECTIONS = ("map_unmap", "dma", "translation", "hypercall", "hypercall_page", "dmatest", "load")


@dataclass
class Row:
    """One figure, its same-run reference and their ratio."""

    name: str
    value: float
    unit: str
    reference: str
    reference_value: float
    ratio: float = 0.0
    target: str = ""
    met: bool | None = None

    def __post_init__(self) -> None:
        self.ratio = self.value / self.reference_value if self.reference_value else 0.0


@dataclass
class Report:
    quick: bool
    command: str
    machine: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, list[Row]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, section: str, row: Row) -> Row:
        self.sections.setdefault(section, []).append(row)
        return row

    def note(self, section: str, text: str) -> None:
        """Add ``text`` to the note printed under ``section`` (benchmarks sharing a section each add theirs)."""
        self.notes[section] = f"{self.notes[section]}; {text}" if section in self.notes else text

    def to_json(self) -> dict[str, Any]:
        return {"quick": self.quick, "command": self.command, "machine": self.machine, "seconds": self.seconds,
                "sections": {k: [asdict(r) for r in v] for k, v in self.sections.items()}, "notes": self.notes}


def machine_facts() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count() or 0, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "system": f"{platform.system()} {platform.release()}",
            "loadavg_at_start": round(os.getloadavg()[0], 2)}


def rate(fn: Callable[[], int], min_time: float, min_calls: int = 1) -> float:
    """Units per second of ``fn`` (which returns how many units it did)."""
    done = calls = 0
    start = time.perf_counter()
    while True:
        done += fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and calls >= min_calls:
            return done / elapsed


def timed_rate(fn: Callable[[], tuple[int, float]], min_time: float, min_calls: int = 1) -> float:
    """Like ``_rate`` for ``fn`` that returns (units, seconds it counts), so
    set-up inside ``fn`` (a cold-IOTLB flush) is left out."""
    done = calls = 0
    spent = 0.0
    start = time.perf_counter()
    while True:
        n, dt = fn()
        done += n
        spent += dt
        calls += 1
        if time.perf_counter() - start >= min_time and calls >= min_calls:
            return done / spent if spent else 0.0


def memmove_rate(size: int, min_time: float) -> float:
    """Bytes/s of a plain memoryview copy of ``size`` bytes between two
    page-aligned anonymous buffers (the reference for DMA bandwidth)."""
    import mmap

    a, b = mmap.mmap(-1, size), mmap.mmap(-1, size)
    a.write(bytes(range(256)) * (size // 256))
    src, dst = memoryview(a), memoryview(b)

    def one() -> int:
        dst[:] = src
        return size

    one()
    try:
        return rate(one, min_time, 3)
    finally:
        src.release()
        dst.release()
        a.close()
        b.close()


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def table(report: Report) -> str:
    lines = []
    for section in SECTIONS:
        rows = report.sections.get(section, [])
        lines.append(f"\n### {section}\n")
        lines.append("| figure | value | reference | ratio | target |")
        lines.append("|---|---:|---:|---:|---|")
        for r in rows:
            target = "" if not r.target else f"{r.target}: {'met' if r.met else 'NOT met'}"
            lines.append(f"| {r.name} | {num(r.value)} {r.unit} | {r.reference}: {num(r.reference_value)} "
                         f"| {r.ratio:.2f}x | {target} |")
        if section in report.notes:
            lines.append(f"\n{report.notes[section]}.")
    return "\n".join(lines)


def num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def render_markdown(report: Report, analysis: str) -> str:
    m = report.machine
    head = [
        "# pviommu benchmarks",
        "",
        "Every figure is next to its reference measured in the same run, as a ratio (absolute times on",
        "shared machines are noisy). Produced by:",
        "",
        "```sh",
        report.command,
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']}, {m['system']}. "
        f"The run took {report.seconds:.0f} s{' (quick)' if report.quick else ''}; the 1-minute load average "
        f"when it started was {m['loadavg_at_start']} (other jobs shared the machine).",
    ]
    return "\n".join(head) + "\n" + table(report) + "\n" + analysis


ANALYSIS_MARK = "<!-- analysis: kept by pviommu bench -->"


def kept_analysis(path: Path) -> str:
    """The hand-written analysis below ``ANALYSIS_MARK`` of an existing report."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    i = text.find(ANALYSIS_MARK)
    return "" if i < 0 else "\n" + text[i:]
