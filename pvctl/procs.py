"""Start pviommu services as real processes and always stop them again.

Used by ``pviommu run``, ``pviommu bench`` and the system tests: each service
is ``python -m pvctl.cli serve <service> --listen 127.0.0.1:0 --port-file F``;
the chosen port is read back from the port file once the server is serving.
Every process is a child of a ``Supervisor`` that kills the lot (SIGTERM, then
SIGKILL) on exit, on an exception and on Ctrl-C, and keeps each service's log
so a failure can show it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor:
    workdir: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, service: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> ServiceProcess:
        """Start ``pviommu serve <service> ...`` and wait until it serves."""
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "pvctl.cli", "serve", service,
               "--listen", "127.0.0.1:0", "--port-file", str(port_file), *args]
        full_env = {**os.environ, **self.env, **(env or {}), "PVIOMMU_LOG_FORMAT": "json"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                    start_new_session=True)
        sp = ServiceProcess(name, proc, log_path)
        self.processes.append(sp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_file.exists():
                text = port_file.read_text().strip()
                if text:
                    sp.port = int(text)
                    return sp
            if not sp.alive():
                raise RuntimeError(f"{name} exited with {proc.returncode} before serving:\n{sp.log_tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"{name} did not start serving within {timeout}s:\n{sp.log_tail()}")

    def stop(self, sp: ServiceProcess, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
        if sp.alive():
            try:
                os.killpg(sp.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                sp.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(sp.proc.pid, signal.SIGKILL)
                sp.proc.wait(5)

    def kill(self, sp: ServiceProcess) -> None:
        """SIGKILL: a crash, for fault-injection tests."""
        self.stop(sp, grace=0.1, sig=signal.SIGKILL)

    def stop_all(self) -> None:
        # Reverse order: clients (guests, devices) before the hypervisor.
        for sp in reversed(self.processes):
            try:
                self.stop(sp)
            except Exception:  # keep stopping the others
                pass

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()
