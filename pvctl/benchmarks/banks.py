"""Where the memory banks live: a tmpfs (``/dev/shm``) against a folder on a
disk file system, measured in one run (issue #19).

For each placement, alternately (tmpfs, disk, tmpfs, disk) so load drifts
hit both alike:

* ``touch``: write every page of a fresh 256 MiB bank (a guest zeroing its
  RAM, a DMA filling buffers): MiB/s;
* ``dirty``: how much of that the kernel now counts as dirty page cache,
  to be written back to the disk (``Dirty`` in /proc/meminfo, system-wide);
* ``msync``: the time to write those pages back (what the kernel does on
  its own within ~30 s, or under memory pressure);
* ``dmatest``: iops and KB/s of a real local system (hypervisor, a DSA
  device, a guest agent: ``pviommu.client.local.LocalHost``) with its banks
  there, 16 KiB buffers, 2 threads, polled completions.

``pviommu bench --banks`` prints the rows and replaces the "banks" block of
docs/benchmarks.md (after the kept analysis, so the full suite keeps it).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pviommu.mem.placement import SHM_ROOT, filesystem_of, make_bank_folder
from pviommu.units import MiB

BLOCK_START = "<!-- banks: written by pviommu bench --banks -->"
BLOCK_END = "<!-- /banks -->"


def _dirty_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) * 1024
    return 0


def touch_and_sync(folder: Path, size: int) -> dict[str, float]:
    """Write every page of a new ``size``-byte sparse file mapped shared, then msync it."""
    path = folder / "bench-bank.mem"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        page = b"\xa5" * mmap.PAGESIZE
        dirty0 = _dirty_bytes()
        t0 = time.perf_counter()
        for off in range(0, size, mmap.PAGESIZE):
            m[off : off + mmap.PAGESIZE] = page
        touch = time.perf_counter() - t0
        dirty = max(0, _dirty_bytes() - dirty0)
        t1 = time.perf_counter()
        m.flush()
        sync = time.perf_counter() - t1
    finally:
        m.close()
        path.unlink()
    return {"touch_mib_s": size / MiB / touch, "dirty_mib": dirty / MiB, "msync_s": sync}


def dmatest(folder: Path, seconds: float) -> dict[str, float]:
    from pviommu.client.local import LocalHost
    from pviommu.v1 import guest_pb2

    host = LocalHost(1, 1, 256 * MiB, memory_dir=folder)
    try:
        host.start()
        params = guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=2, iterations=0, duration_s=seconds,
                                         timeout=3000, design="nested", seed=1, polled=True)
        result = None
        for ev in host.guests[0].stub.RunDmatest(params, timeout=seconds + 120):
            if ev.HasField("result"):
                result = ev.result
        if result is None or result.failures or not result.tests:
            raise RuntimeError(f"dmatest with banks in {folder}: {result.summary if result else 'no result'}")
        return {"iops": result.iops, "kb_s": result.kb_per_s}
    finally:
        host.stop()


def run(quick: bool = False) -> dict[str, Any]:
    """Both placements, alternately; the best of the rounds for each figure."""
    size = (64 if quick else 256) * MiB
    seconds = 0.8 if quick else 4.0
    rounds = 1 if quick else 2
    shm = make_bank_folder("pviommu-bench-", need_bytes=2 * size + (1 << 30))
    disk = Path(tempfile.mkdtemp(prefix="pviommu-bench-"))
    places = {"tmpfs": shm.path, "disk": disk}
    out: dict[str, dict[str, list[float]]] = {k: {} for k in places}
    try:
        for _ in range(rounds):
            for name, folder in places.items():
                for key, value in {**touch_and_sync(folder, size), **dmatest(folder / "system", seconds)}.items():
                    out[name].setdefault(key, []).append(value)
    finally:
        shutil.rmtree(shm.path, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    best = {name: {k: (min(v) if k in ("msync_s", "dirty_mib") else max(v)) for k, v in figs.items()}
            for name, figs in out.items()}
    return {"size_mib": size // MiB, "seconds": seconds, "rounds": rounds,
            "filesystems": {name: filesystem_of(folder.parent if name == "tmpfs" else folder).describe()
                            for name, folder in places.items()},
            "tmpfs_is_memory": filesystem_of(SHM_ROOT).memory_backed if SHM_ROOT.is_dir() else False,
            "disk_is_memory": filesystem_of(Path(tempfile.gettempdir())).memory_backed, "best": best}


def rows(result: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(figure, tmpfs, disk, unit)."""
    t, d = result["best"]["tmpfs"], result["best"]["disk"]
    n = result["size_mib"]
    return [(f"touch every page of a {n} MiB bank", t["touch_mib_s"], d["touch_mib_s"], "MiB/s"),
            ("dirty page cache after the touch (to be written to disk)", t["dirty_mib"], d["dirty_mib"], "MiB"),
            (f"msync of the {n} MiB bank (the write-back)", t["msync_s"] * 1000, d["msync_s"] * 1000, "ms"),
            ("dmatest iops, 2 threads, 16 KiB, polled", t["iops"], d["iops"], "iops"),
            ("dmatest KB/s, 2 threads, 16 KiB, polled", t["kb_s"], d["kb_s"], "KB/s")]


def markdown(result: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    fs = result["filesystems"]
    lines = [BLOCK_START, "## Memory banks: tmpfs against a disk folder (issue #19)", "",
             f"Measured in one run by `{command}` ({machine['cores']} cores, load average "
             f"{machine['loadavg_at_start']} at the start): each placement {result['rounds']} time(s), alternately, "
             f"best of the rounds. tmpfs = {fs['tmpfs']}; disk = {fs['disk']}.", "",
             "| figure | tmpfs (/dev/shm) | disk folder | tmpfs / disk |", "|---|---:|---:|---:|"]
    for name, t, d, unit in rows(result):
        ratio = f"{t / d:.2f}x" if d else "-"
        lines.append(f"| {name} | {_num(t)} {unit} | {_num(d)} {unit} | {ratio} |")
    lines += ["", "The dirty figure is system-wide (other jobs add to it). On the tmpfs the touched pages are "
              "shared memory, which the kernel never writes back: the bank costs no disk I/O and no write-back, "
              "and first touches are cheaper (no page-cache and block allocation on the disk file system). "
              "dmatest throughput hardly moves: its time goes to the portal transport and the engine (see the "
              "analysis above), not to page faults on RAM it has already touched. Before this change `pviommu run` "
              "put the banks in the disk folder; it now puts them on /dev/shm when it has room and says so "
              "(`memory banks in ...: tmpfs (memory)`), and warns when a `--memory-dir` is disk-backed.", BLOCK_END]
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def replace_block(text: str, block: str) -> str:
    """``text`` with its banks block replaced (or appended)."""
    i, j = text.find(BLOCK_START), text.find(BLOCK_END)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(BLOCK_END):]
    return text.rstrip("\n") + "\n\n" + block + "\n"
