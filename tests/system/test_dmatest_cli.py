"""``pviommu dmatest`` against real processes: iterations=0 runs until Ctrl-C,
which stops it as ``echo 0 > run`` does (summaries printed, clean exit)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pvctl.local import VirtualSystem

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

THREAD_SUMMARY = re.compile(r"^dmatest: dma0chan0-copy[01]: summary (\d+) tests, 0 failures \d+\.\d\d iops "
                            r"\d+ KB/s \(0\)$")
AGGREGATE = re.compile(r"^pviommu aggregate of 2 threads \(not a dmatest line\): (\d+) tests, 0 failures ")


def test_ctrl_c_stops_an_endless_dmatest_and_prints_every_summary() -> None:
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=64 << 20) as system:
        g = system.guests[0]
        assert g.process is not None
        env = {**os.environ, "PVIOMMU_TOKEN": g.token}
        proc = subprocess.Popen([sys.executable, "-m", "pvctl.cli", "dmatest", g.process.address, "--iterations", "0",
                                 "--threads-per-chan", "2", "--verbose"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        passed = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if sum("'test passed'" in x for x in lines) >= 20:
                    passed.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert passed.wait(120), lines[-20:]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(10)
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert rc == 0, (rc, err, lines[-10:])
        assert "stopping (as echo 0 > run)" in err
        counts = [int(m[1]) for x in lines if (m := THREAD_SUMMARY.match(x))]
        assert len(counts) == 2 and all(n >= 1 for n in counts), lines[-10:]
        total = AGGREGATE.match(lines[-1])
        assert total is not None and int(total[1]) == sum(counts), lines[-1]
        # the agent stopped its threads: a fresh run still works
        time.sleep(0.2)
        again = subprocess.run([sys.executable, "-m", "pvctl.cli", "dmatest", g.process.address, "--iterations", "3"],
                               capture_output=True, text=True, timeout=120, env=env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[-1].startswith("pviommu aggregate of 1 thread (not a dmatest line): 3 tests")
