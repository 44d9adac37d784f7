"""Build the optional compiled core (native/pviommu_native) into pviommu/_native.abi3.so.

Run by ``./dev.sh setup`` with the venv's interpreter. It builds only from this
repository's files (Cargo.lock pins every crate, the only one fetched being pyo3
and its build helpers; ``--locked``), in release mode, with its cache in
``target/`` (git-ignored): about 20 s the first time on 2 cores, under a second
when nothing changed. Without cargo it stays silent (``--quiet``) and exits 0;
when the build fails it says so in one line and exits 0: the Python
implementation is the fallback. ``PVIOMMU_NATIVE=0`` skips the build (and the
import: see pviommu/iommu/native.py).

    python native/build.py [--quiet] [--require]

``--require`` makes a missing toolchain or a failed build an error (exit 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATE = ROOT / "native" / "pviommu_native"
TARGET = ROOT / "target"
LOG = TARGET / "native-build.log"
#: abi3 (CPython stable ABI, 3.11+): one build for every supported interpreter
OUT = ROOT / "pviommu" / "_native.abi3.so"


def _cargo() -> str | None:
    found = shutil.which("cargo")
    if found:
        return found
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "cargo"
    return str(home) if home.is_file() else None


def build(*, quiet: bool = False, require: bool = False) -> int:
    def say(msg: str, *, always: bool = False) -> None:
        """``--quiet`` keeps set-up silent unless a present toolchain failed."""
        if always or not quiet or require:
            print(msg, file=sys.stderr)

    if os.environ.get("PVIOMMU_NATIVE", "").strip() == "0":
        say("native core: PVIOMMU_NATIVE=0, not built (the Python implementation runs)")
        return 0
    cargo = _cargo()
    if cargo is None:
        say("native core: cargo not found, not built (the Python implementation runs)")
        return 1 if require else 0
    if sys.platform != "linux" or sysconfig.get_config_var("EXT_SUFFIX") is None:
        say(f"native core: not built on {sys.platform} (the Python implementation runs)")
        return 1 if require else 0
    TARGET.mkdir(exist_ok=True)
    env = {**os.environ, "PYO3_PYTHON": sys.executable}
    cmd = [cargo, "build", "--release", "--locked", "--manifest-path", str(CRATE / "Cargo.toml"),
           "--target-dir", str(TARGET)]
    with LOG.open("w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        say(f"native core: cargo build failed (see {LOG.relative_to(ROOT)}); the Python implementation runs",
            always=True)
        return 1 if require else 0
    lib = TARGET / "release" / "libpviommu_native.so"
    if not OUT.exists() or OUT.read_bytes() != lib.read_bytes():
        tmp = OUT.with_suffix(".tmp")
        shutil.copyfile(lib, tmp)
        os.replace(tmp, OUT)  # a new inode: processes that loaded the old one keep it
    say(f"native core: built {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(build(quiet="--quiet" in args, require="--require" in args))
