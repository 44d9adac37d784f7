"""Start pviommu services as real processes and always stop them again.

Each service is started by command line -- ``python -m pvctl.cli serve
<service> --listen 127.0.0.1:0 --port-file F`` with this interpreter, or the
command in ``$PVIOMMU_SERVE_COMMAND`` -- never imported, so the client needs
nothing but gRPC to drive it. The chosen port is read back from the port
file once the server is serving. Every process is a child of a
``Supervisor`` that stops the lot (SIGTERM, then SIGKILL) on exit, on an
exception and on Ctrl-C, and keeps each service's log so a failure can show
it. If the supervising process itself is killed outright (SIGKILL: no
cleanup can run), each service notices within a second and stops itself
(``exit_with_supervisor``), so nothing is left running. Processes can be
launched together and waited for together, so a host with several devices
and guests comes up in parallel.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

#: Overrides the command that serves a service (e.g. "pviommu serve" or "docker run ... pviommu serve").
SERVE_COMMAND_ENV = "PVIOMMU_SERVE_COMMAND"
#: The PID of the supervising process, given to every service it launches.
SUPERVISOR_PID_ENV = "PVIOMMU_SUPERVISOR_PID"
#: How often a service checks that its supervisor still lives (seconds).
SUPERVISOR_CHECK_S = 0.5


def exit_with_supervisor() -> None:
    """In a service: SIGTERM ourselves (the services' normal, cleaning shutdown)
    once the process named by ``$PVIOMMU_SUPERVISOR_PID`` is gone. Checks the
    PID, not the parent, so wrapper commands in between do not matter."""
    value = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not value.isdigit():
        return
    pid = int(value)

    def watch() -> None:
        while True:
            time.sleep(SUPERVISOR_CHECK_S)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:  # alive, another user's (a reused PID cannot be ours to judge)
                continue

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def serve_command() -> list[str]:
    """The command line prefix that runs ``serve <service> ...``."""
    override = os.environ.get(SERVE_COMMAND_ENV)
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "pvctl.cli", "serve"]


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    port_file: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class ServiceStartError(RuntimeError):
    """A service exited, or did not serve in time; the message has its log tail."""

    def __init__(self, message: str, process: ServiceProcess) -> None:
        super().__init__(message)
        self.process = process


@dataclass
class Supervisor:
    workdir: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    command: Sequence[str] | None = None

    def launch(self, name: str, service: str, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        """Start ``serve <service> ...`` without waiting for it to serve."""
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        cmd = [*(self.command or serve_command()), service, "--listen", "127.0.0.1:0",
               "--port-file", str(port_file), *args]
        full_env = {**os.environ, **self.env, **(env or {}), "PVIOMMU_LOG_FORMAT": "json",
                    SUPERVISOR_PID_ENV: str(os.getpid())}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, start_new_session=True)
        sp = ServiceProcess(name, proc, log_path, port_file=port_file)
        self.processes.append(sp)
        return sp

    def wait_serving(self, *processes: ServiceProcess, timeout: float = 30.0) -> None:
        """Wait until each process has written its port file (it serves)."""
        deadline = time.monotonic() + timeout
        pending = [p for p in processes if not p.port]
        while pending:
            for sp in list(pending):
                assert sp.port_file is not None
                text = sp.port_file.read_text().strip() if sp.port_file.exists() else ""
                if text:
                    sp.port = int(text)
                    pending.remove(sp)
                elif not sp.alive():
                    raise ServiceStartError(
                        f"{sp.name} exited with {sp.proc.returncode} before serving:\n{sp.log_tail()}", sp)
            if pending and time.monotonic() > deadline:
                sp = pending[0]
                raise ServiceStartError(f"{sp.name} did not start serving within {timeout:g}s:\n{sp.log_tail()}",
                                        sp)
            if pending:
                time.sleep(0.02)

    def start(self, name: str, service: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> ServiceProcess:
        """Start ``serve <service> ...`` and wait until it serves."""
        sp = self.launch(name, service, *args, env=env)
        self.wait_serving(sp, timeout=timeout)
        return sp

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
        """Clients (guests, devices) before the hypervisor: signal every
        client at once, wait, then the first process (the hypervisor)."""
        clients, first = self.processes[1:], self.processes[:1]
        for group in (clients, first):
            for sp in group:
                if sp.alive():
                    try:
                        os.killpg(sp.proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for sp in group:
                try:
                    self.stop(sp)
                except Exception:  # keep stopping the others
                    pass

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()
