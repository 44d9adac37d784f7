"""``pviommu run``: a local virtual system running dmatest in every guest.

The host itself is ``pviommu.client.local.LocalHost`` (kept here under its
old name ``VirtualSystem`` for the benchmarks and tests): the hypervisor, N
guests and M DSA devices each as processes on loopback, banks on a tmpfs.
``run_local`` brings it up, runs dmatest in every guest, prints per-guest
summaries and a total, and tears everything down -- processes, banks and
folders -- on success, failure, Ctrl-C, SIGTERM and SIGHUP alike.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from pvctl import exitcodes, junit
from pvctl.console import make_console, say
from pviommu.client.local import LocalGuest, LocalHost
from pviommu.client.procs import ServiceStartError
from pviommu.v1 import guest_pb2, guest_pb2_grpc

#: The old names (benchmarks and tests import them from here).
VirtualSystem = LocalHost
Guest = LocalGuest

#: Signals that stop ``pviommu run`` the way Ctrl-C does (timeout, Docker, CI runners send SIGTERM).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Stopped`` in the main thread while
    active, and ignore them while cleaning up (a second Ctrl-C must not
    leave processes behind)."""

    def __enter__(self) -> _StopSignals:
        self._old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    def cleaning_up(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


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


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What a result depends on, recorded with it (--json, JUnit properties)."""
    return {"design": args.design, "revision": _revisions(args), "lazy": args.lazy, "seed": args.seed,
            "guests": args.guests, "devices": args.devices, "memory_bytes": args.memory,
            "iterations": args.iterations, "threads_per_chan": args.threads_per_chan,
            "test_buf_size": args.test_buf_size, "polled": args.polled}


def _revisions(args: argparse.Namespace) -> dict[str, str]:
    """The revision of the hypervisor and of the guests' drivers (mixed runs are a real test)."""
    from pviommu.abi.revision import DEFAULT_REVISION

    hypervisor = getattr(args, "revision", None) or DEFAULT_REVISION.value
    return {"hypervisor": hypervisor, "guests": getattr(args, "guest_revision", None) or hypervisor}


def _endpoints(system: LocalHost, args: argparse.Namespace) -> dict[str, Any]:
    from pviommu.client.endpoints import Endpoints, ServiceEndpoint

    assert system.hypervisor is not None
    names = {p.name: p for p in system.supervisor.processes}
    ids = {f"dsa{g.index}.{k}": d for g in system.guests for k, d in enumerate(g.devices)}
    guests = [ServiceEndpoint(g.name, g.address, g.token, system.metrics_port(g.process), g.partition_id,
                              list(g.devices)) for g in system.guests]
    devices = [ServiceEndpoint(d.name, d.address, metrics_port=system.metrics_port(d),
                               logical_device_id=ids.get(d.name, 0)) for d in system.devices]
    hv = ServiceEndpoint("hypervisor", system.hypervisor.address,
                         metrics_port=system.metrics_port(names.get("hypervisor")))
    return Endpoints("local", hv, system.admin_token, guests, devices, str(system.memory_dir),
                     {"design": args.design, "lazy": args.lazy, "revision": _revisions(args),
                      "config": run_config(args), "filesystem": system.bank_fs.as_dict(),
                      "workdir": str(system.workdir)}).to_json()


def run_local(args: argparse.Namespace) -> int:
    """``pviommu run``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = make_console(stderr=True)
    show_bar = console.is_terminal and not args.no_progress and not args.json
    periodic = 0.0 if console.is_terminal or args.no_progress else float(args.progress_interval)
    step = (lambda m: say(console, m)) if not args.json else None
    results: dict[int, guest_pb2.DmatestResult] = {}
    errors: dict[int, str] = {}
    started_at: dict[int, float] = {}
    ended_at: dict[int, float] = {}
    endpoints_file: Path | None = None
    rc = exitcodes.OK
    with _StopSignals() as stop:
        revisions = _revisions(args)
        sva = ["--proposal-sva"] if getattr(args, "sva", False) else []  # the SVA proposal, not in the series
        system = VirtualSystem(args.guests, args.devices, args.memory, args.memory_dir,
                               guest_args=[*(["--lazy"] if args.lazy else []), "--revision", revisions["guests"],
                                           *sva],
                               hypervisor_args=["--revision", revisions["hypervisor"],
                                                *(["--s2-baseline"] if args.design == "baseline" else []), *sva],
                               metrics=args.keep or args.metrics)
        try:
            fs = system.bank_fs
            if system.bank_note:
                say(console, f"warning: {system.bank_note}")
            if not fs.memory_backed:
                say(console, f"warning: memory banks in {system.memory_dir} are on {fs.fs_type}, a disk-backed "
                             "file system: every DMA byte goes through the page cache of a disk file "
                             "(choose a tmpfs with --memory-dir, e.g. /dev/shm)")
            elif step is not None:
                step(f"memory banks in {system.memory_dir}: {fs.describe()}")
            system.start(on_step=step)
            if step is not None:
                step(f"revision: hypervisor {revisions['hypervisor']}, guests {revisions['guests']}")
            params = dmatest_params(args)
            chans = args.devices if not args.max_channels else min(args.devices, args.max_channels)
            total = args.iterations * args.threads_per_chan * max(1, chans)
            done: dict[int, int] = {g.index: 0 for g in system.guests}
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, disable=not show_bar)
            with progress:
                tasks = {g.index: progress.add_task(f"guest{g.index} dmatest", total=total) for g in system.guests}

                def worker(g: LocalGuest) -> None:
                    def on_event(ev: guest_pb2.DmatestEvent) -> None:
                        if ev.HasField("progress"):
                            done[g.index] = ev.progress
                            progress.update(tasks[g.index], completed=ev.progress)
                        elif ev.HasField("line") and not args.json:
                            progress.console.print(f"[guest{g.index}] {ev.line}", markup=False, highlight=False)

                    started_at[g.index] = time.monotonic()
                    try:
                        results[g.index] = run_dmatest_stream(g.stub, params, on_event)
                    except grpc.RpcError as exc:
                        errors[g.index] = f"{exc.code().name}: {exc.details()}"
                    except Exception as exc:
                        errors[g.index] = f"{type(exc).__name__}: {exc}"
                    finally:
                        ended_at[g.index] = time.monotonic()

                threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in system.guests]
                t0 = time.monotonic()
                next_line = t0 + periodic
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():
                        t.join(0.2)
                        if periodic and time.monotonic() >= next_line:
                            parts = ", ".join(f"guest{i} {n}/{total}" for i, n in sorted(done.items()))
                            say(console, f"progress: {parts} tests, {time.monotonic() - t0:.0f}s")
                            next_line = time.monotonic() + periodic
            rc = report(results, errors, args.json, run_config(args), fs.as_dict())
            if sva:
                sva_rc = run_sva(system, args)
                rc = rc if rc != exitcodes.OK else sva_rc
            if args.junit_xml:
                cases = []
                for g in system.guests:
                    secs = ended_at.get(g.index, 0.0) - started_at.get(g.index, 0.0)
                    r = results.get(g.index)
                    failure = None if r is not None and r.failures == 0 and r.tests > 0 else (
                        r.summary if r is not None else None)
                    cases.append(junit.Case(f"guest{g.index} dmatest ({args.design})", secs, failure,
                                            errors.get(g.index), "\n".join(r.lines) if r is not None else ""))
                junit.write(args.junit_xml, "pviommu run", cases, run_config(args))
            if args.keep:
                endpoints_file = Path(args.endpoints or system.workdir / "endpoints.json")
                from pviommu.client.endpoints import Endpoints

                Endpoints.from_json(_endpoints(system, args)).write(endpoints_file)
                hv = system.hypervisor.address if system.hypervisor else "?"
                say(console, f"services kept running: hypervisor {hv}; endpoints and tokens in {endpoints_file}; "
                             "Ctrl-C (or SIGTERM) stops them")
                threading.Event().wait()
        except Stopped as exc:
            stop.cleaning_up()
            say(console, f"interrupted by {signal.Signals(exc.signum).name}: stopping the services")
            rc = exitcodes.for_signal(exc.signum)
        except ServiceStartError as exc:
            stop.cleaning_up()
            console.print(f"pviommu run: {exc.process.name} did not start", markup=False)
            console.print(system.logs(), markup=False)
            rc = exitcodes.FAILED
        except Exception as exc:
            stop.cleaning_up()
            console.print(f"pviommu run: {exc}", markup=False)
            console.print(system.logs(), markup=False)
            rc = exitcodes.FAILED
        finally:
            stop.cleaning_up()
            system.stop()
            if endpoints_file is not None:
                endpoints_file.unlink(missing_ok=True)
    return rc


def run_sva(system: LocalHost, args: argparse.Namespace) -> int:
    """The SVA proposal's dsa_test in every guest (``RunSvaTest``); prints one
    summary line per guest (not with --json, whose document is dmatest's)."""
    ok = True
    for g in system.guests:
        try:
            r = g.stub.RunSvaTest(guest_pb2.SvaTestRequest(size=args.sva_size, iterations=args.sva_iterations),
                                  timeout=600)
        except grpc.RpcError as exc:
            ok = False
            if not args.json:
                print(f"guest{g.index}: sva_test error: {exc.code().name}: {exc.details()}")
            continue
        ok = ok and r.passed
        if not args.json:
            print(f"guest{g.index}: {r.summary}")
            for e in r.errors:
                print(f"guest{g.index}: sva_test: {e}")
    sys.stdout.flush()
    return exitcodes.OK if ok else exitcodes.FAILED


def report(results: dict[int, guest_pb2.DmatestResult], errors: dict[int, str], as_json: bool,
           config: dict[str, Any] | None = None, banks: dict[str, Any] | None = None) -> int:
    tests = sum(r.tests for r in results.values())
    failures = sum(r.failures for r in results.values()) + len(errors)
    iops = sum(r.iops for r in results.values())
    kbs = sum(r.kb_per_s for r in results.values())
    if as_json:
        out = {
            "config": config or {},
            "revision": (config or {}).get("revision", {}),
            "banks": banks or {},
            "guests": [
                {"guest": i, "tests": r.tests, "failures": r.failures, "iops": r.iops, "kb_per_s": r.kb_per_s,
                 "summary": r.summary, "runtime_s": r.runtime_s}
                for i, r in sorted(results.items())
            ],
            "errors": {str(k): v for k, v in errors.items()},
            "total": {"tests": tests, "failures": failures, "iops": iops, "kb_per_s": kbs},
        }
        print(json.dumps(out, indent=2))
    else:
        for i, r in sorted(results.items()):
            print(f"guest{i}: {r.summary}")
        for i, e in sorted(errors.items()):
            print(f"guest{i}: error: {e}")
        rev = (config or {}).get("revision")
        if rev:
            print(f"revision: hypervisor {rev['hypervisor']}, guests {rev['guests']}")
        print(f"total: {tests} tests, {failures} failures {iops:.2f} iops {kbs:.0f} KB/s")
    sys.stdout.flush()
    return exitcodes.OK if failures == 0 and not errors and tests > 0 else exitcodes.FAILED


__all__ = ["Guest", "VirtualSystem", "dmatest_params", "report", "run_dmatest_stream", "run_local"]
