"""Where bank files live: which file system, how much room, and who cleans up.

Banks are sparse files mapped ``MAP_SHARED``. On a tmpfs (``/dev/shm``, a
Docker tmpfs volume, a Kubernetes ``emptyDir`` with ``medium: Memory``) their
pages are plain shared memory; on a disk file system every DMA byte lives in
the page cache of a disk file and is written back by the kernel, I/O nobody
asked for. So the default bank folder is on ``/dev/shm`` when it has room,
and every service says which file system its banks are on.

A sparse bank larger than the free space of its tmpfs is accepted by
``ftruncate`` and fails later, with SIGBUS on the first touch of a page the
tmpfs cannot supply. ``check_capacity`` refuses such a partition up front.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError
from pviommu.units import format_size

#: File systems whose pages are memory (no backing disk).
MEMORY_FS_TYPES = frozenset({"tmpfs", "ramfs", "hugetlbfs", "shm"})
SHM_ROOT = Path("/dev/shm")
#: Written into every bank folder this module creates: the pid that owns it.
OWNER_FILE = ".pviommu-owner"
#: Set to 1 to accept partitions larger than the tmpfs can hold (warn only).
OVERCOMMIT_ENV = "PVIOMMU_ALLOW_OVERCOMMIT"


@dataclass(frozen=True)
class FsInfo:
    """The file system under a path."""

    path: Path
    mount_point: str
    fs_type: str
    total_bytes: int
    free_bytes: int

    @property
    def memory_backed(self) -> bool:
        return self.fs_type in MEMORY_FS_TYPES

    def describe(self) -> str:
        """``"tmpfs (memory), 23.5 GiB free of 24 GiB"``, for logs and ``pviommu run``."""
        kind = "memory" if self.memory_backed else "disk-backed"
        return (f"{self.fs_type} ({kind}) at {self.mount_point}, {format_size(self.free_bytes)} free "
                f"of {format_size(self.total_bytes)}")

    def as_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "mount_point": self.mount_point, "fs_type": self.fs_type,
                "memory_backed": self.memory_backed, "total_bytes": self.total_bytes, "free_bytes": self.free_bytes}


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, fs type) of every line of /proc/self/mountinfo."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        out.append((_unescape(fields[4]), right.split()[0]))
    return out


def filesystem_of(path: Path | str, mountinfo: str | None = None) -> FsInfo:
    """The file system holding ``path`` (or its nearest existing parent)."""
    target = Path(path).resolve()
    p = target
    while not p.exists() and p != p.parent:  # statvfs needs a path that exists
        p = p.parent
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            mountinfo = ""
    best, fs_type = "/", "unknown"
    for mount_point, kind in _mounts(mountinfo):
        inside = str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fs_type = mount_point, kind  # later lines shadow earlier ones at the same point
    st = os.statvfs(p)
    return FsInfo(Path(path), best, fs_type, st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return True  # not ours, or being created: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: Path = SHM_ROOT, prefix: str = "pviommu-") -> list[Path]:
    """Remove bank folders under ``root`` whose owning process is gone (a
    service killed with SIGKILL cannot clean up, and on a tmpfs its banks
    would keep holding memory). Only folders carrying ``OWNER_FILE`` with a
    dead pid are touched."""
    removed: list[Path] = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        if (folder / OWNER_FILE).exists() and not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@dataclass(frozen=True)
class BankFolder:
    """A bank folder made by ``make_bank_folder``; ``note`` says why it is where it is."""

    path: Path
    fs: FsInfo
    note: str = ""


def make_bank_folder(prefix: str = "pviommu-", need_bytes: int = 0, root: Path | None = None) -> BankFolder:
    """A new folder for bank files: on ``/dev/shm`` when it is a tmpfs with
    ``need_bytes`` free, else in the system temporary folder, with ``note``
    saying why (``/dev/shm`` missing or too small). ``root`` forces a place.
    Stale folders of dead owners are swept first."""
    note = ""
    if root is None:
        shm = filesystem_of(SHM_ROOT) if SHM_ROOT.is_dir() and os.access(SHM_ROOT, os.W_OK) else None
        if shm is None:
            note = f"{SHM_ROOT} is not available here; banks go to the temporary folder"
        elif not shm.memory_backed:
            note = f"{SHM_ROOT} is {shm.fs_type}, not a tmpfs; banks go to the temporary folder"
        elif need_bytes > shm.free_bytes:
            note = (f"{SHM_ROOT} is too small for the banks: {format_size(shm.free_bytes)} free, "
                    f"{format_size(need_bytes)} needed (raise its size, e.g. docker --shm-size, or choose "
                    f"--memory-dir); banks go to the temporary folder")
        else:
            root = SHM_ROOT
        if root is None:
            root = Path(tempfile.gettempdir())
    sweep_stale(root, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return BankFolder(path, filesystem_of(path), note)


def claim(folder: Path, pid: int | None = None) -> None:
    """Record ``pid`` (default: this process) as the owner of ``folder``, so
    ``sweep_stale`` removes it once that process is gone."""
    (Path(folder) / OWNER_FILE).write_text(str(pid or os.getpid()))


def allocated_bytes(path: Path) -> int:
    """Bytes a (sparse) file really holds."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def check_capacity(directory: Path, new_bytes: int, existing: Iterable[tuple[Path, int]] = (),
                   *, allow_overcommit: bool | None = None) -> str | None:
    """Refuse a new bank of ``new_bytes`` that its file system could not
    back once every bank is fully touched.

    ``existing`` is (path, size) of the partition banks already there: what
    they have not touched yet is still owed to them, so the new bank fits
    when ``new_bytes + sum(size - allocated) <= free``. On a memory file
    system an overcommit raises HvError(INSUFFICIENT_MEMORY) unless
    ``allow_overcommit`` (default: ``$PVIOMMU_ALLOW_OVERCOMMIT=1``); on a
    disk, or when allowed, the warning text is returned instead (None when
    it fits)."""
    fs = filesystem_of(directory)
    owed = sum(max(0, size - allocated_bytes(path)) for path, size in existing)
    if new_bytes + owed <= fs.free_bytes:
        return None
    message = (f"a bank of {format_size(new_bytes)} does not fit in {fs.mount_point} ({fs.fs_type}): "
               f"{format_size(fs.free_bytes)} free, {format_size(owed)} already promised to existing partitions")
    if allow_overcommit is None:
        allow_overcommit = os.environ.get(OVERCOMMIT_ENV, "") in ("1", "true", "yes")
    if fs.memory_backed and not allow_overcommit:
        raise HvError(HvStatus.INSUFFICIENT_MEMORY,
                      f"{message}; the first touch past that would be SIGBUS (set {OVERCOMMIT_ENV}=1 to allow it)")
    return message
