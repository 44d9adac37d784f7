"""A local virtual system: the hypervisor, N guests and M DSA devices each, as
real processes on loopback sharing memory banks in a temporary folder.

``VirtualSystem`` is the one way the command line, the benchmarks and the
system tests bring a host up; ``run_local`` is ``pviommu run``: bring it up,
run dmatest in every guest, print per-guest summaries and a total, and tear
everything down (processes and banks) even on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pvctl.procs import ServiceProcess, Supervisor
from pviommu.rpc.auth import new_token
from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, guest_pb2, guest_pb2_grpc

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


@dataclass
class Guest:
    index: int
    partition_id: int
    token: str
    bank_path: str
    process: ServiceProcess | None = None
    devices: list[int] = field(default_factory=list)
    channel: grpc.Channel | None = None

    @property
    def stub(self) -> guest_pb2_grpc.GuestAgentStub:
        assert self.channel is not None
        return guest_pb2_grpc.GuestAgentStub(self.channel)


class VirtualSystem:
    """Hypervisor + guests + DSA devices as processes; a context manager."""

    def __init__(self, guests: int = 1, devices_per_guest: int = 1, memory_bytes: int = 256 << 20,
                 memory_dir: str | None = None, guest_args: list[str] | None = None,
                 hypervisor_args: list[str] | None = None) -> None:
        self.n_guests = guests
        self.devices_per_guest = devices_per_guest
        self.memory_bytes = memory_bytes
        self._own_dir = memory_dir is None
        self.workdir = Path(memory_dir or tempfile.mkdtemp(prefix="pviommu-"))
        self.memory_dir = self.workdir / "banks"
        self.memory_dir.mkdir(parents=True, exist_ok=True)
        self.admin_token = new_token()
        self.supervisor = Supervisor(self.workdir, env={"PVIOMMU_ADMIN_TOKEN": self.admin_token})
        self.guests: list[Guest] = []
        self.devices: list[ServiceProcess] = []
        self.hypervisor: ServiceProcess | None = None
        self.admin_channel: grpc.Channel | None = None
        self.guest_args = guest_args or []
        #: e.g. ``--revision v1``, ``--s2-baseline`` (the map-by-hypercall design needs it)
        self.hypervisor_args = hypervisor_args or []

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        assert self.admin_channel is not None
        return admin_pb2_grpc.AdminStub(self.admin_channel)

    def start(self, on_step: Any = None) -> VirtualSystem:
        step = on_step or (lambda msg: None)
        step("starting hypervisor")
        self.hypervisor = self.supervisor.start("hypervisor", "hypervisor", "--memory-dir", str(self.memory_dir),
                                                *self.hypervisor_args)
        self.admin_channel = connect(self.hypervisor.address, self.admin_token)
        for g in range(self.n_guests):
            self.add_guest(g, step)
        return self

    def add_partition(self, g: int, step: Any = None, name: str | None = None) -> Guest:
        """A partition with its DSA devices started and assigned, but no guest
        agent process (the benchmarks drive an in-process agent on it)."""
        step = step or (lambda msg: None)
        assert self.hypervisor is not None
        reply = self.admin.CreatePartition(
            admin_pb2.CreatePartitionRequest(name=name or f"guest{g}", memory_bytes=self.memory_bytes), timeout=30
        )
        if reply.result.status != 0:
            raise RuntimeError(f"CreatePartition failed: {reply.result.status_name}: {reply.result.message}")
        guest = Guest(g, reply.partition.partition_id, reply.token, reply.partition.bank_path)
        for d in range(self.devices_per_guest):
            dname = f"dsa{g}.{d}"
            step(f"starting {dname}")
            dev = self.supervisor.start(dname, "dsa", "--hypervisor", self.hypervisor.address, "--name", dname)
            self.devices.append(dev)
            logical = self._device_id(dname)
            r = self.admin.AssignDevice(
                admin_pb2.AssignDeviceRequest(logical_device_id=logical, partition_id=guest.partition_id),
                timeout=30,
            )
            if r.result.status != 0:
                raise RuntimeError(f"AssignDevice {dname} failed: {r.result.status_name}: {r.result.message}")
            guest.devices.append(logical)
        return guest

    def add_guest(self, g: int, step: Any = None, extra_args: list[str] | None = None) -> Guest:
        step = step or (lambda msg: None)
        assert self.hypervisor is not None
        guest = self.add_partition(g, step)
        step(f"starting guest{g}")
        guest.process = self.supervisor.start(
            f"guest{g}", "guest", "--hypervisor", self.hypervisor.address, "--bank-path", guest.bank_path,
            *self.guest_args, *(extra_args or []), env={"PVIOMMU_TOKEN": guest.token},
        )
        guest.channel = connect(guest.process.address, guest.token)
        self.guests.append(guest)
        return guest

    def restart_guest(self, guest: Guest) -> Guest:
        """Reboot a guest: kill its agent if still running, reset its
        partition (everything it set up is reclaimed, new token) and start a
        new agent on the same RAM bank."""
        from pviommu.v1 import admin_pb2 as _admin

        assert self.hypervisor is not None
        if guest.channel is not None:
            guest.channel.close()
        if guest.process is not None:
            self.supervisor.kill(guest.process)
        reply = self.admin.ResetPartition(_admin.PartitionRequest(partition_id=guest.partition_id), timeout=60)
        if reply.result.status != 0:
            raise RuntimeError(f"ResetPartition failed: {reply.result.status_name}: {reply.result.message}")
        guest.token = reply.token
        guest.process = self.supervisor.start(
            f"guest{guest.index}-r", "guest", "--hypervisor", self.hypervisor.address, "--bank-path", guest.bank_path,
            *self.guest_args, env={"PVIOMMU_TOKEN": guest.token},
        )
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

    def stop(self) -> None:
        for g in self.guests:
            if g.channel is not None:
                g.channel.close()
        if self.admin_channel is not None:
            self.admin_channel.close()
        self.supervisor.stop_all()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            shutil.rmtree(self.memory_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(60)}" for p in self.supervisor.processes)

    def __enter__(self) -> VirtualSystem:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dmatest_params(args: argparse.Namespace) -> guest_pb2.DmatestParams:
    return guest_pb2.DmatestParams(
        test_buf_size=args.test_buf_size, threads_per_chan=args.threads_per_chan,
        max_channels=args.max_channels, iterations=args.iterations, timeout=args.timeout,
        noverify=args.noverify, norandom=args.norandom, alignment=args.alignment,
        transfer_size=args.transfer_size, polled=args.polled, design=args.design, seed=args.seed,
        verbose=getattr(args, "verbose", False), channel=getattr(args, "channel", ""),
        device=getattr(args, "device", ""),
    )


def run_dmatest_stream(stub: guest_pb2_grpc.GuestAgentStub, params: guest_pb2.DmatestParams,
                       on_event: Any = None, timeout: float | None = None) -> guest_pb2.DmatestResult:
    """Run dmatest in one guest; ``on_event(event)`` sees progress and lines."""
    result = None
    for event in stub.RunDmatest(params, timeout=timeout):
        if on_event is not None:
            on_event(event)
        if event.HasField("result"):
            result = event.result
    if result is None:
        raise RuntimeError("the guest agent ended dmatest without a result")
    return result


def run_local(args: argparse.Namespace) -> int:
    """``pviommu run``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    show_progress = console.is_terminal and not args.no_progress and not args.json
    from pviommu.abi.revision import DEFAULT_REVISION

    revision = getattr(args, "revision", None) or DEFAULT_REVISION.value
    guest_revision = getattr(args, "guest_revision", None) or revision
    system = VirtualSystem(args.guests, args.devices, parse_size(args.memory), args.memory_dir,
                           guest_args=[*(["--lazy"] if args.lazy else []), "--revision", guest_revision],
                           hypervisor_args=["--revision", revision,
                                            *(["--s2-baseline"] if args.design == "baseline" else [])])
    results: dict[int, guest_pb2.DmatestResult] = {}
    errors: dict[int, str] = {}
    try:
        system.start(on_step=(lambda m: console.log(m)) if not args.json else None)
        if not args.json:
            console.log(f"revision: hypervisor {revision}, guests {guest_revision}")
        params = dmatest_params(args)
        total = args.iterations * args.threads_per_chan * max(1, args.devices if not args.max_channels
                                                               else min(args.devices, args.max_channels))
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, disable=not show_progress)
        with progress:
            tasks = {g.index: progress.add_task(f"guest{g.index} dmatest", total=total) for g in system.guests}

            def worker(g: Guest) -> None:
                def on_event(ev: guest_pb2.DmatestEvent) -> None:
                    if ev.HasField("progress"):
                        progress.update(tasks[g.index], completed=ev.progress)
                    elif ev.HasField("line") and not args.json:
                        progress.console.print(f"[guest{g.index}] {ev.line}", markup=False, highlight=False)

                try:
                    results[g.index] = run_dmatest_stream(g.stub, params, on_event)
                except grpc.RpcError as exc:
                    errors[g.index] = f"{exc.code().name}: {exc.details()}"
                except Exception as exc:
                    errors[g.index] = f"{type(exc).__name__}: {exc}"

            threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in system.guests]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        if args.keep:
            hv = system.hypervisor.address if system.hypervisor else "?"
            console.print(f"services kept running: hypervisor {hv}, admin token {system.admin_token}; "
                          + ", ".join(f"guest{g.index} {g.process.address if g.process else '?'} token {g.token}"
                                      for g in system.guests) + "; Ctrl-C stops them", markup=False)
            threading.Event().wait()
    except KeyboardInterrupt:
        console.log("interrupted: stopping the services")
        return 130
    except Exception as exc:
        console.print(f"pviommu run: {exc}", markup=False)
        console.print(system.logs(), markup=False)
        return 1
    finally:
        system.stop()
    return report(results, errors, args.json, revisions={"hypervisor": revision, "guests": guest_revision})


def report(results: dict[int, guest_pb2.DmatestResult], errors: dict[int, str], as_json: bool,
           revisions: dict[str, str] | None = None) -> int:
    tests = sum(r.tests for r in results.values())
    failures = sum(r.failures for r in results.values()) + len(errors)
    iops = sum(r.iops for r in results.values())
    kbs = sum(r.kb_per_s for r in results.values())
    if as_json:
        out = {
            "guests": [
                {"guest": i, "tests": r.tests, "failures": r.failures, "iops": r.iops, "kb_per_s": r.kb_per_s,
                 "summary": r.summary, "runtime_s": r.runtime_s}
                for i, r in sorted(results.items())
            ],
            "errors": {str(k): v for k, v in errors.items()},
            "total": {"tests": tests, "failures": failures, "iops": iops, "kb_per_s": kbs},
        }
        if revisions:
            out["revision"] = revisions
        print(json.dumps(out, indent=2))
    else:
        for i, r in sorted(results.items()):
            print(f"guest{i}: {r.summary}")
        for i, e in sorted(errors.items()):
            print(f"guest{i}: error: {e}")
        if revisions:
            print(f"revision: hypervisor {revisions['hypervisor']}, guests {revisions['guests']}")
        print(f"total: {tests} tests, {failures} failures {iops:.2f} iops {kbs:.0f} KB/s")
    sys.stdout.flush()
    return 0 if failures == 0 and not errors and tests > 0 else 1
