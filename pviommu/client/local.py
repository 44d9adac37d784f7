"""A local virtual host: the hypervisor, N guests and M DSA devices each, as
real processes on loopback sharing memory banks.

``LocalHost`` is the one way the client (``System.start_local``), the
command line (``pviommu run``), the benchmarks and the system tests bring a
host up. Services are started by command line (``pviommu.client.procs``),
never imported. Devices come up together, then guests together. The banks
go to a fresh folder on ``/dev/shm`` (a tmpfs) when it has room, else to the
temporary folder (``bank_note`` says why), or under ``memory_dir``; logs and
port files stay in a temporary folder on disk. ``stop()`` removes all of it;
the work folder of a host whose process was killed outright (its services
stop by themselves) is removed when the next local host starts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pviommu.client.procs import ServiceProcess, ServiceStartError, Supervisor
from pviommu.mem.placement import FsInfo, claim, filesystem_of, make_bank_folder, sweep_stale
from pviommu.rpc.auth import new_token
from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, guest_pb2_grpc

#: The hypervisor's default private bank (sparse): counted when checking room for the banks.
BANK0_BYTES = 1 << 30

#: The work folders (logs, port files) of local hosts, in the temporary folder.
WORKDIR_PREFIX = "pviommu-"

Step = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


@dataclass
class LocalGuest:
    """One guest partition of a local host: its credential, bank and agent."""

    index: int
    partition_id: int
    token: str
    bank_path: str
    process: ServiceProcess | None = None
    devices: list[int] = field(default_factory=list)
    channel: grpc.Channel | None = None
    name: str = ""

    @property
    def stub(self) -> guest_pb2_grpc.GuestAgentStub:
        assert self.channel is not None
        return guest_pb2_grpc.GuestAgentStub(self.channel)

    @property
    def address(self) -> str:
        return self.process.address if self.process is not None else ""


class LocalHost:
    """Hypervisor + guests + DSA devices as processes; a context manager."""

    def __init__(self, guests: int = 1, devices_per_guest: int = 1, memory_bytes: int = 256 << 20,
                 memory_dir: str | Path | None = None, guest_args: Sequence[str] | None = None, *,
                 hypervisor_args: Sequence[str] = (), device_args: Sequence[str] = (), revision: str | None = None,
                 start_timeout: float = 60.0, metrics: bool = False) -> None:
        self.n_guests = guests
        self.devices_per_guest = devices_per_guest
        self.memory_bytes = memory_bytes
        self.revision = revision
        self.start_timeout = start_timeout
        self._own_dir = memory_dir is None
        self.bank_note = ""
        if memory_dir is None:
            sweep_stale(Path(tempfile.gettempdir()), WORKDIR_PREFIX)  # what a kill -9 of an earlier host left
            self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
            claim(self.workdir)
            folder = make_bank_folder("pviommu-banks-", need_bytes=BANK0_BYTES + guests * memory_bytes)
            self.memory_dir = folder.path
            self.bank_note = folder.note
        else:
            self.workdir = Path(memory_dir)
            self.memory_dir = self.workdir / "banks"
            self.memory_dir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_token = new_token()
        while self.admin_token.startswith("-"):  # "--token -x..." would read as an option on a command line
            self.admin_token = new_token()
        self.supervisor = Supervisor(self.workdir, env={"PVIOMMU_ADMIN_TOKEN": self.admin_token})
        self.guests: list[LocalGuest] = []
        self.devices: list[ServiceProcess] = []
        self.hypervisor: ServiceProcess | None = None
        self.admin_channel: grpc.Channel | None = None
        rev = ["--revision", revision] if revision else []
        #: Every service serves Prometheus metrics on a free port (``metrics_port`` finds it).
        self.metrics = metrics
        met = ["--metrics-port", "0"] if metrics else []
        self.hypervisor_args = [*rev, *met, *hypervisor_args]
        self.guest_args = [*rev, *met, *(guest_args or [])]
        self.device_args = [*met, *device_args]
        self._stopped = False

    @property
    def bank_fs(self) -> FsInfo:
        """The file system holding the banks."""
        return filesystem_of(self.memory_dir)

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        assert self.admin_channel is not None
        return admin_pb2_grpc.AdminStub(self.admin_channel)

    # -- start ------------------------------------------------------------------------------
    def start(self, on_step: Step | None = None) -> LocalHost:
        step = on_step or _quiet
        step("starting hypervisor")
        self.hypervisor = self.supervisor.start("hypervisor", "hypervisor", "--memory-dir", str(self.memory_dir),
                                                *self.hypervisor_args, timeout=self.start_timeout)
        self.admin_channel = connect(self.hypervisor.address, self.admin_token)
        parts = [self.add_partition(g, step, start_devices=False) for g in range(self.n_guests)]
        self._start_devices(parts, step)
        self._start_guests(parts, step)
        return self

    def _create_partition(self, g: int, name: str | None) -> LocalGuest:
        reply = self.admin.CreatePartition(
            admin_pb2.CreatePartitionRequest(name=name or f"guest{g}", memory_bytes=self.memory_bytes), timeout=30)
        if reply.result.status != 0:
            raise RuntimeError(f"CreatePartition failed: {reply.result.status_name}: {reply.result.message}")
        return LocalGuest(g, reply.partition.partition_id, reply.token, reply.partition.bank_path,
                          name=name or f"guest{g}")

    def _start_devices(self, parts: list[LocalGuest], step: Step) -> None:
        assert self.hypervisor is not None
        launched: list[tuple[LocalGuest, str, ServiceProcess]] = []
        for guest in parts:
            for d in range(self.devices_per_guest):
                dname = f"dsa{guest.index}.{d}"
                step(f"starting {dname}")
                dev = self.supervisor.launch(dname, "dsa", "--hypervisor", self.hypervisor.address, "--name", dname,
                                             *self.device_args)
                self.devices.append(dev)
                launched.append((guest, dname, dev))
        self.supervisor.wait_serving(*(dev for _, _, dev in launched), timeout=self.start_timeout)
        for guest, dname, _ in launched:
            logical = self._device_id(dname)
            r = self.admin.AssignDevice(
                admin_pb2.AssignDeviceRequest(logical_device_id=logical, partition_id=guest.partition_id), timeout=30)
            if r.result.status != 0:
                raise RuntimeError(f"AssignDevice {dname} failed: {r.result.status_name}: {r.result.message}")
            guest.devices.append(logical)

    def _launch_guest(self, guest: LocalGuest, extra_args: Sequence[str] = (), suffix: str = "") -> ServiceProcess:
        assert self.hypervisor is not None
        return self.supervisor.launch(
            f"guest{guest.index}{suffix}", "guest", "--hypervisor", self.hypervisor.address,
            "--bank-path", guest.bank_path, *self.guest_args, *extra_args, env={"PVIOMMU_TOKEN": guest.token})

    def _start_guests(self, parts: list[LocalGuest], step: Step, extra_args: Sequence[str] = ()) -> None:
        for guest in parts:
            step(f"starting guest{guest.index}")
            guest.process = self._launch_guest(guest, extra_args)
        self.supervisor.wait_serving(*(g.process for g in parts if g.process is not None),
                                     timeout=self.start_timeout)
        for guest in parts:
            assert guest.process is not None
            guest.channel = connect(guest.process.address, guest.token)
            self.guests.append(guest)

    def add_partition(self, g: int, step: Step | None = None, name: str | None = None, *,
                      start_devices: bool = True) -> LocalGuest:
        """A partition with its DSA devices started and assigned, but no guest
        agent process (the benchmarks drive an in-process agent on it)."""
        assert self.hypervisor is not None
        guest = self._create_partition(g, name)
        if start_devices:
            self._start_devices([guest], step or _quiet)
        return guest

    def add_guest(self, g: int, step: Step | None = None, extra_args: Sequence[str] | None = None) -> LocalGuest:
        """One more guest: a partition, its devices and its agent."""
        step = step or _quiet
        guest = self.add_partition(g, step)
        self._start_guests([guest], step, extra_args or ())
        return guest

    def restart_guest(self, guest: LocalGuest) -> LocalGuest:
        """Reboot a guest: kill its agent if still running, reset its
        partition (everything it set up is reclaimed, new token) and start a
        new agent on the same RAM bank."""
        if guest.channel is not None:
            guest.channel.close()
        if guest.process is not None:
            self.supervisor.kill(guest.process)
        reply = self.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=guest.partition_id), timeout=60)
        if reply.result.status != 0:
            raise RuntimeError(f"ResetPartition failed: {reply.result.status_name}: {reply.result.message}")
        guest.token = reply.token
        guest.process = self._launch_guest(guest, suffix="-r")
        self.supervisor.wait_serving(guest.process, timeout=self.start_timeout)
        guest.channel = connect(guest.process.address, guest.token)
        return guest

    def _device_id(self, name: str, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for dev in self.admin.ListDevices(common_pb2.Empty(), timeout=10).devices:
                if dev.name == name:
                    return int(dev.logical_device_id)
            time.sleep(0.05)
        raise RuntimeError(f"device {name} never registered with the hypervisor")

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process and remove the banks (and the work folder when
        it is ours). Safe to call twice, and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        for g in self.guests:
            if g.channel is not None:
                g.channel.close()
        if self.admin_channel is not None:
            self.admin_channel.close()
        self.supervisor.stop_all()
        shutil.rmtree(self.memory_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def metrics_port(process: ServiceProcess | None) -> int | None:
        """The port a service (started with ``metrics=True``) serves metrics on,
        from its ``<service>.metrics`` log line."""
        if process is None:
            return None
        for line in process.log_text().splitlines():
            if '.metrics"' not in line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if str(rec.get("event", "")).endswith(".metrics") and "port" in rec:
                return int(rec["port"])
        return None

    def logs(self, lines: int = 60) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(lines)}" for p in self.supervisor.processes)

    def __enter__(self) -> LocalHost:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LocalGuest", "LocalHost", "ServiceStartError"]
