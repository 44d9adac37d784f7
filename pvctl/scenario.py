"""The scripted scenario: what a user checks first on a fresh virtual host.

One ``Scenario`` runs against any running system -- local processes
(``VirtualSystem``, the system tests) or containers (docker-compose's one-shot
``scenario`` service, the Docker pipeline) -- over gRPC only:

1. every guest found its pv-IOMMU (PRESENT|S1) and its assigned device;
2. dmatest passes in every guest, in the nested design and in the
   map-by-hypercall baseline;
3. isolation: a guest naming another partition's device is refused with
   HV_STATUS_ACCESS_DENIED and nothing changes;
4. the stale-IOTLB hazard is real: after an unmap without flush the device
   still reaches the old page; after the flush it faults, the completion
   record says PAGE_FAULT_NOBOF and the guest's fault stream shows it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pvctl import exitcodes
from pviommu.abi import hv
from pviommu.abi.dsa import CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.abi.hv_status import HvStatus
from pviommu.rpc.client import connect
from pviommu.v1 import (
    admin_pb2_grpc,
    common_pb2,
    guest_pb2,
    guest_pb2_grpc,
    hypervisor_pb2,
    hypervisor_pb2_grpc,
)


@dataclass
class GuestRef:
    name: str
    address: str
    token: str
    channel: grpc.Channel | None = None

    @property
    def agent(self) -> guest_pb2_grpc.GuestAgentStub:
        assert self.channel is not None
        return guest_pb2_grpc.GuestAgentStub(self.channel)


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class ScenarioFailed(AssertionError):
    pass


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ScenarioFailed(message)


class Scenario:
    def __init__(self, hypervisor: str, admin_token: str, guests: list[GuestRef], *, iterations: int = 100,
                 threads: int = 1, buf_size: int = 16384, log: Callable[[str], None] | None = None) -> None:
        self.hypervisor_address = hypervisor
        self.admin_token = admin_token
        self.guests = guests
        self.iterations = iterations
        self.threads = threads
        self.buf_size = buf_size
        self.log = log or (lambda m: None)
        self.steps: list[Step] = []

    # -- plumbing -------------------------------------------------------------
    def _connect(self) -> None:
        for g in self.guests:
            if g.channel is None:
                g.channel = connect(g.address, g.token, ready_timeout=60, what=f"guest {g.name}", on_wait=self.log)
        self.admin_channel = connect(self.hypervisor_address, self.admin_token, ready_timeout=60,
                                     what="the hypervisor", on_wait=self.log)

    def close(self) -> None:
        for g in self.guests:
            if g.channel is not None:
                g.channel.close()
                g.channel = None
        if getattr(self, "admin_channel", None) is not None:
            self.admin_channel.close()

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> Step:
        self.log(f"scenario: {name} ...")
        started = time.monotonic()
        try:
            data = fn() or {}
            st = Step(name, True, f"{time.monotonic() - started:.2f}s", data)
        except ScenarioFailed as exc:
            st = Step(name, False, str(exc))
        except grpc.RpcError as exc:
            st = Step(name, False, f"{exc.code().name}: {exc.details()}")
        st.seconds = time.monotonic() - started
        self.log(f"scenario: {name}: {'ok' if st.ok else 'FAILED: ' + st.detail}")
        self.steps.append(st)
        return st

    def run(self) -> bool:
        self._connect()
        try:
            self.step("iommu-present", self.check_iommu)
            self.step("devices-assigned", self.check_devices)
            self.step("dmatest-nested", lambda: self.check_dmatest("nested"))
            self.step("dmatest-baseline", lambda: self.check_dmatest("baseline"))
            if len(self.guests) >= 2:
                self.step("isolation", self.check_isolation)
            self.step("stale-iotlb-hazard", self.check_stale_iotlb)
        finally:
            self.close()
        return all(s.ok for s in self.steps)

    # -- steps -------------------------------------------------------------------
    def check_iommu(self) -> dict[str, Any]:
        out = {}
        for g in self.guests:
            info = g.agent.GetIommuInfo(common_pb2.Empty(), timeout=30)
            _check(info.present, f"{g.name}: no pv-IOMMU detected")
            _check(bool(info.iommu_cap & hv.IommuCap.S1), f"{g.name}: no stage-1 support")
            out[g.name] = {"iova_width": info.iova_width, "cap": info.iommu_cap, "revision": info.revision}
        return out

    def check_devices(self, timeout: float = 60.0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in self.guests:
            deadline = time.monotonic() + timeout
            while True:
                devs = g.agent.ListDevices(common_pb2.Empty(), timeout=30).devices
                if devs or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            _check(bool(devs), f"{g.name}: no device assigned after {timeout}s")
            _check(all(d.behind_pviommu for d in devs), f"{g.name}: a device is not behind the pv-IOMMU")
            out[g.name] = [f"{d.logical_device_id:#x}" for d in devs]
        return out

    def check_dmatest(self, design: str) -> dict[str, Any]:
        if design == "baseline":  # the map-by-hypercall design is a hypervisor option (it advertises S2)
            for g in self.guests:
                cap = g.agent.GetIommuInfo(common_pb2.Empty(), timeout=30).iommu_cap
                _check(bool(cap & hv.IommuCap.S2), f"{g.name}: the hypervisor offers no S2 domains "
                                                   "(start it with --s2-baseline for the baseline design)")
        params = guest_pb2.DmatestParams(test_buf_size=self.buf_size, threads_per_chan=self.threads,
                                         iterations=self.iterations, timeout=3000, alignment=-1, design=design)
        out = {}
        for g in self.guests:
            result = None
            for ev in g.agent.RunDmatest(params, timeout=600):
                if ev.HasField("result"):
                    result = ev.result
            _check(result is not None, f"{g.name}: dmatest gave no result")
            assert result is not None
            _check(result.tests > 0, f"{g.name}: dmatest ran no test")
            _check(result.failures == 0, f"{g.name}: {result.summary}")
            out[g.name] = result.summary
        return out

    def check_isolation(self) -> dict[str, Any]:
        a, b = self.guests[0], self.guests[1]
        b_devices = [d.logical_device_id for d in b.agent.ListDevices(common_pb2.Empty(), timeout=30).devices]
        _check(bool(b_devices), f"{b.name} has no device to attack")
        admin = admin_pb2_grpc.AdminStub(self.admin_channel)
        before = [(d.logical_device_id, d.partition_id, d.domain_id)
                  for d in admin.ListDevices(common_pb2.Empty(), timeout=30).devices]
        hv_a = hypervisor_pb2_grpc.HypervisorStub(connect(self.hypervisor_address, a.token))
        dom = hypervisor_pb2.DeviceDomain(partition_id=hv.HV_PARTITION_ID_SELF, domain_type=hv.DeviceDomainType.S1,
                                          domain_id=0x5C0FF)
        created = hv_a.CreateDeviceDomain(hypervisor_pb2.CreateDeviceDomainRequest(device_domain=dom), timeout=30)
        _check(created.result.status == HvStatus.SUCCESS, f"create: {created.result.status_name}")
        try:
            answers = {}
            for dev in b_devices:
                r = hv_a.AttachDeviceDomain(hypervisor_pb2.AttachDeviceDomainRequest(device_domain=dom, device_id=dev),
                                            timeout=30)
                answers[f"{dev:#x}"] = r.result.status_name
                _check(r.result.status == HvStatus.ACCESS_DENIED,
                       f"{a.name} attaching {b.name}'s device got {r.result.status_name}")
                p = hv_a.GetLogicalDeviceProperty(hypervisor_pb2.GetLogicalDevicePropertyRequest(
                    partition_id=hv.HV_PARTITION_ID_SELF, logical_device_id=dev,
                    code=hv.HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU), timeout=30)
                _check(p.result.status == HvStatus.ACCESS_DENIED,
                       f"property of a foreign device: {p.result.status_name}")
        finally:
            hv_a.DeleteDeviceDomain(hypervisor_pb2.DeleteDeviceDomainRequest(device_domain=dom), timeout=30)
        after = [(d.logical_device_id, d.partition_id, d.domain_id)
                 for d in admin.ListDevices(common_pb2.Empty(), timeout=30).devices]
        _check(sorted(before) == sorted(after), "a refused attach changed the device table")
        return answers

    def check_stale_iotlb(self) -> dict[str, Any]:
        g = self.guests[0]
        agent = g.agent
        dev = agent.ListDevices(common_pb2.Empty(), timeout=30).devices[0].logical_device_id
        size = 4096
        src = agent.AllocBuffer(guest_pb2.AllocRequest(size=size), timeout=30)
        dst = agent.AllocBuffer(guest_pb2.AllocRequest(size=size), timeout=30)
        rec = agent.AllocBuffer(guest_pb2.AllocRequest(size=4096), timeout=30)
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(size))
        agent.WriteMemory(guest_pb2.WriteRequest(gpa=src.gpa, data=pattern), timeout=30)
        m_src = agent.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=src.gpa, size=size,
                                               direction=guest_pb2.TO_DEVICE), timeout=30)
        m_dst = agent.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=dst.gpa, size=size,
                                               direction=guest_pb2.FROM_DEVICE), timeout=30)
        m_rec = agent.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=rec.gpa, size=4096,
                                               direction=guest_pb2.BIDIRECTIONAL), timeout=30)

        def copy() -> CompletionRecord:
            agent.WriteMemory(guest_pb2.WriteRequest(gpa=rec.gpa, data=bytes(32)), timeout=30)
            desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR),
                              completion_addr=m_rec.iova, src_addr=m_src.iova, dst_addr=m_dst.iova,
                              xfer_size=size)
            reply = agent.SubmitDescriptor(guest_pb2.DescriptorRequest(
                logical_device_id=dev, descriptor=desc.pack(), wait=True, timeout_ms=5000,
                completion_gpa=rec.gpa), timeout=30)
            _check(reply.accepted, "the device did not accept the descriptor")
            return CompletionRecord.unpack(reply.completion_record)

        first = copy()
        _check(first.code == DsaStatus.SUCCESS, f"copy through a live mapping: status {first.code:#x}")
        copied = agent.ReadMemory(guest_pb2.ReadRequest(gpa=dst.gpa, size=size), timeout=30).data
        _check(copied == pattern, "the copy through the nested translation is wrong")
        agent.WriteMemory(guest_pb2.WriteRequest(gpa=dst.gpa, data=bytes(size)), timeout=30)
        un = agent.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=m_dst.iova, size=size, skip_flush=True),
                         timeout=30)
        _check(not un.flushed, "unmap with skip_flush reported a flush")
        stale = copy()
        _check(stale.code == DsaStatus.SUCCESS, f"stale IOTLB entry not used: status {stale.code:#x}")
        leaked = agent.ReadMemory(guest_pb2.ReadRequest(gpa=dst.gpa, size=size), timeout=30).data
        _check(leaked == pattern, "the device did not reach the unmapped page through the stale entry")
        agent.Flush(guest_pb2.FlushRequest(logical_device_id=dev), timeout=30)
        after = copy()
        _check(after.code == DsaStatus.PAGE_FAULT_NOBOF,
               f"after the flush the copy should fault, got status {after.code:#x}")
        _check(after.fault_addr == m_dst.iova, f"fault address {after.fault_addr:#x} != unmapped IOVA {m_dst.iova:#x}")
        # Devices report faults asynchronously (never from the DMA path): allow it a moment.
        deadline = time.monotonic() + 10
        while True:
            faults = list(agent.StreamFaults(guest_pb2.FaultsRequest(follow=False), timeout=30))
            if any(f.iova == m_dst.iova and f.write for f in faults) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        _check(any(f.iova == m_dst.iova and f.write for f in faults), "the fault is not in the guest's fault stream")
        for m in (m_src, m_rec):
            agent.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=m.iova, size=m.size), timeout=30)
        for b in (src, dst, rec):
            agent.FreeBuffer(b, timeout=30)
        return {"stale_status": int(stale.code), "after_flush_status": int(after.code),
                "fault_addr": f"{after.fault_addr:#x}"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hypervisor", required=True, help="hypervisor address")
    p.add_argument("--guest", action="append", default=[], metavar="ADDR=TOKENFILE",
                   help="a guest agent and the file holding its partition token (repeat)")
    p.add_argument("--admin-token-file", help="default: $PVIOMMU_ADMIN_TOKEN")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--threads-per-chan", type=int, default=1)
    p.add_argument("--test-buf-size", type=int, default=16384)
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for token files")
    p.add_argument("--json", action="store_true")
    p.add_argument("--junit-xml", metavar="FILE", help="also write the steps as a JUnit XML report")


def run_cli(args: argparse.Namespace) -> int:
    from pviommu.rpc.auth import admin_token_from

    admin = admin_token_from(args.admin_token_file, "pviommu scenario")
    guests = []
    for i, spec in enumerate(args.guest):
        addr, _, token_file = spec.partition("=")
        path = Path(token_file)
        started = time.monotonic()
        deadline = started + args.wait
        next_notice = started + 1.0
        while not path.exists() and time.monotonic() < deadline:
            if time.monotonic() >= next_notice:
                print(f"waiting for the token file {path} ({time.monotonic() - started:.0f}s of {args.wait:g}s) ...",
                      file=sys.stderr, flush=True)
                next_notice = time.monotonic() + 5.0
            time.sleep(0.5)
        if not path.exists():
            print(f"pviommu scenario: no token file {path} after {args.wait:g}s", file=sys.stderr)
            return exitcodes.USAGE
        guests.append(GuestRef(f"guest{i}", addr, path.read_text().strip()))
    sc = Scenario(args.hypervisor, admin, guests, iterations=args.iterations, threads=args.threads_per_chan,
                  buf_size=args.test_buf_size, log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        ok = sc.run()
    except ConnectionError as exc:
        print(f"pviommu scenario: {exc}", file=sys.stderr)
        return exitcodes.CONNECT
    if args.junit_xml:
        from pvctl import junit

        junit.write(args.junit_xml, "pviommu scenario",
                    [junit.Case(s.name, s.seconds, None if s.ok else s.detail,
                                output=json.dumps(s.data) if s.data else "") for s in sc.steps],
                    {"hypervisor": args.hypervisor, "guests": len(guests), "iterations": args.iterations})
    if args.json:
        print(json.dumps({"ok": ok, "steps": [s.__dict__ for s in sc.steps]}, indent=2))
    else:
        for s in sc.steps:
            print(f"{'PASS' if s.ok else 'FAIL'} {s.name}: {s.detail}")
        print(f"scenario: {sum(s.ok for s in sc.steps)} passed, {sum(not s.ok for s in sc.steps)} failed")
    return exitcodes.OK if ok else exitcodes.FAILED
