"""``pviommu replay TRACE --hypervisor ADDR``: re-run a recorded hypervisor
trace (``pviommu serve hypervisor --trace``) against a fresh hypervisor.

Admin lines are redone with the admin credential: partitions are created
again (old id -> new id, new tokens), devices are registered again by name
with a dummy control address -- no device process is needed: the hypervisor
cannot reach the unit, marks it unreachable and keeps going, which changes no
answer a guest sees -- and assigned by the mapped ids. Hypercall lines are
re-issued through the raw ``HvCall`` method with the recorded input bytes
(partition and device ids inside them rewritten to the new ones when they
differ), each with the credential of its partition. Every answer's HV status
(and reps completed) is compared with the recorded one; differences are
reported. Fault lines are counted, not replayed (a device produced them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pvctl import exitcodes
from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.rpc.client import connect, print_waiting
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hypervisor_pb2, hypervisor_pb2_grpc

#: where replayed devices "are": nothing listens there, so invalidations fail fast
DUMMY_DEVICE_ADDRESS = "127.0.0.1:1"
#: an id no partition of the fresh hypervisor has (for lines about partitions that never existed)
_NO_PARTITION = 0x7FFF_0000_0000


@dataclass
class Mismatch:
    seq: int
    what: str
    expected: str
    got: str
    detail: str = ""


@dataclass
class ReplayReport:
    lines: int = 0
    hypercalls: int = 0
    admin: int = 0
    faults_skipped: int = 0
    bad_lines: int = 0
    partitions: dict[int, int] = field(default_factory=dict)  # old id -> new id
    devices: dict[int, int] = field(default_factory=dict)  # old logical id -> new logical id
    mismatches: list[Mismatch] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["partitions"] = {str(k): v for k, v in self.partitions.items()}
        d["devices"] = {f"{k:#x}": f"{v:#x}" for k, v in self.devices.items()}
        return d


def read_trace(path: Path | str, report: ReplayReport | None = None) -> Iterator[dict[str, Any]]:
    """The trace's records; a line that is not JSON (a hypervisor killed
    mid-write leaves a torn last line) is counted and skipped."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if report is not None:
                    report.bad_lines += 1


def remap_request(request: Any, partitions: dict[int, int], devices: dict[int, int]) -> Any:
    """``request`` (a decoded ``pviommu.abi.hv`` structure) with every
    ``partition_id`` and logical device id translated by the maps."""
    if isinstance(request, hv.HvDeviceId):
        if request.type == hv.HvDeviceType.LOGICAL and request.id in devices:
            return dataclasses.replace(request, id=devices[request.id])
        return request
    if isinstance(request, tuple):
        items = tuple(remap_request(x, partitions, devices) for x in request)
        return items if any(a is not b for a, b in zip(items, request, strict=True)) else request
    if not dataclasses.is_dataclass(request) or isinstance(request, type):
        return request
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(request):
        if not f.init:
            continue
        value = getattr(request, f.name)
        if f.name == "partition_id" and isinstance(value, int):
            new = partitions.get(value, value)
        elif f.name == "logical_device_id" and isinstance(value, int):
            new = devices.get(value, value)
        else:
            new = remap_request(value, partitions, devices)
        if new is not value and new != value:
            changes[f.name] = new
    return dataclasses.replace(request, **changes) if changes else request


class Replayer:
    """Replays records one by one against the hypervisor at ``address``."""

    def __init__(self, address: str, admin_token: str, device_address: str = DUMMY_DEVICE_ADDRESS,
                 timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self.device_address = device_address
        self._admin_channel = connect(address, admin_token)
        self.admin = admin_pb2_grpc.AdminStub(self._admin_channel)
        self.report = ReplayReport()
        self._guests: dict[int, tuple[grpc.Channel, hypervisor_pb2_grpc.HypervisorStub]] = {}  # by NEW id
        self._started = False

    def close(self) -> None:
        for ch, _ in self._guests.values():
            ch.close()
        self._guests.clear()
        self._admin_channel.close()

    # -- ids ------------------------------------------------------------------------
    def _pid(self, old: int) -> int:
        return self.report.partitions.get(old, _NO_PARTITION + old)

    def _dev(self, old: int) -> int:
        return self.report.devices.get(old, old)

    def _guest(self, new_pid: int, token: str) -> None:
        old = self._guests.pop(new_pid, None)
        if old is not None:
            old[0].close()
        ch = connect(self.address, token)
        self._guests[new_pid] = (ch, hypervisor_pb2_grpc.HypervisorStub(ch))

    def _check(self, rec: dict[str, Any], what: str, status: int, status_name: str, detail: str = "") -> None:
        if status != rec.get("status", 0):
            self.report.mismatches.append(Mismatch(rec.get("seq", 0), what, rec.get("status_name", ""),
                                                   status_name, detail))

    # -- records --------------------------------------------------------------------
    def run(self, records: Iterable[dict[str, Any]]) -> ReplayReport:
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "trace_start": self._start, "admin": self._admin, "hypercall": self._hypercall, "fault": self._fault}
        for rec in records:
            self.report.lines += 1
            handler = handlers.get(rec.get("kind", ""))
            if handler is None:
                self.report.warnings.append(f"line {rec.get('seq')}: unknown kind {rec.get('kind')!r}, skipped")
                continue
            handler(rec)
        return self.report

    def _start(self, rec: dict[str, Any]) -> None:
        if self._started:  # the trace file was appended to by a restarted hypervisor
            self.report.warnings.append(
                f"line {rec.get('seq')}: the trace restarts here (a new hypervisor); state is not reset")
        self._started = True

    def _fault(self, rec: dict[str, Any]) -> None:
        self.report.faults_skipped += 1

    def _admin(self, rec: dict[str, Any]) -> None:
        self.report.admin += 1
        op = rec["op"]
        t = self.timeout
        what = f"admin {op}"
        if op == "create_partition":
            r = self.admin.CreatePartition(admin_pb2.CreatePartitionRequest(
                name=rec.get("name", ""), memory_bytes=rec.get("memory_bytes", 0),
                mmio_holes=[admin_pb2.GpaRange(gpa=g, size=n) for g, n in rec.get("mmio_holes", [])],
                read_only=[admin_pb2.GpaRange(gpa=g, size=n) for g, n in rec.get("read_only", [])]), timeout=t)
            self._check(rec, what, r.result.status, r.result.status_name, r.result.message)
            if r.result.status == 0 and "partition" in rec:
                self.report.partitions[rec["partition"]["id"]] = r.partition.partition_id
                self._guest(r.partition.partition_id, r.token)
        elif op == "reset_partition":
            new = self._pid(rec["partition"]["id"])
            r = self.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=new), timeout=t)
            self._check(rec, what, r.result.status, r.result.status_name, r.result.message)
            if r.result.status == 0:
                self._guest(new, r.token)
        elif op == "destroy_partition":
            new = self._pid(rec["partition"]["id"])
            h = self.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=new), timeout=t)
            self._check(rec, what, h.result.status, h.result.status_name, h.result.message)
            if h.result.status == 0:
                gone = self._guests.pop(new, None)
                if gone is not None:
                    gone[0].close()
        elif op == "register_device":
            g = rec.get("instance_guid", "")
            r2 = self.admin.RegisterDevice(admin_pb2.RegisterDeviceRequest(
                name=rec["device"]["name"], control_address=self.device_address,
                pci_vendor_id=rec.get("pci_vendor_id", 0), pci_device_id=rec.get("pci_device_id", 0),
                instance_guid=bytes.fromhex(g), pci_function=rec.get("pci_function", 0)), timeout=t)
            self._check(rec, what, r2.result.status, r2.result.status_name, r2.result.message)
            if r2.result.status == 0:
                self.report.devices[rec["device"]["id"]] = r2.device.logical_device_id
        elif op in ("unregister_device", "unassign_device"):
            req = admin_pb2.DeviceRequest(logical_device_id=self._dev(rec["device"]["id"]))
            fn = self.admin.UnregisterDevice if op == "unregister_device" else self.admin.UnassignDevice
            h = fn(req, timeout=t)
            self._check(rec, what, h.result.status, h.result.status_name, h.result.message)
        elif op == "assign_device":
            h = self.admin.AssignDevice(admin_pb2.AssignDeviceRequest(
                logical_device_id=self._dev(rec["device"]["id"]), partition_id=self._pid(rec["partition"]["id"])),
                timeout=t)
            self._check(rec, what, h.result.status, h.result.status_name, h.result.message)
        else:
            self.report.warnings.append(f"line {rec.get('seq')}: unknown admin op {op!r}, skipped")

    def _hypercall(self, rec: dict[str, Any]) -> None:
        self.report.hypercalls += 1
        new = self._pid(rec["partition"]["id"])
        guest = self._guests.get(new)
        what = f"hypercall {rec.get('call')} of partition {rec['partition'].get('name') or rec['partition']['id']}"
        if guest is None:
            self.report.mismatches.append(Mismatch(rec.get("seq", 0), what, rec.get("status_name", ""),
                                                   "NOT_REPLAYED", "the calling partition does not exist"))
            return
        value, data = int(rec["input_value"]), bytes.fromhex(rec["input"])
        try:
            request = hv.decode_call(value, data)
            mapped = remap_request(request, self.report.partitions, self.report.devices)
            if mapped is not request:
                v, data = hv.encode_request(mapped)
                value = v.encode()
        except Exception as exc:  # recorded bytes always decode; send them as they are otherwise
            self.report.warnings.append(f"line {rec.get('seq')}: input not re-encoded: {exc}")
        reply = guest[1].HvCall(hypervisor_pb2.HvCallRequest(input_value=value, input=data), timeout=self.timeout)
        result = hv.HypercallResult.decode(reply.result_value)
        status, reps = int(result.status), int(result.reps_completed)
        self._check(rec, what, status, HvStatus.name_of(status), reply.message)
        if status == rec.get("status") and reps != rec.get("reps", 0):
            self.report.mismatches.append(Mismatch(rec.get("seq", 0), what, f"reps {rec.get('reps')}",
                                                   f"reps {reps}", reply.message))


def replay_file(path: Path | str, address: str, admin_token: str,
                device_address: str = DUMMY_DEVICE_ADDRESS) -> ReplayReport:
    replayer = Replayer(address, admin_token, device_address)
    try:
        report = replayer.report
        replayer.run(read_trace(path, report))
        return report
    finally:
        replayer.close()


def not_fresh(address: str, admin_token: str) -> str:
    """"" for a fresh hypervisor, else what it already has ("2 partitions, 1 device")."""
    channel = connect(address, admin_token, what="the hypervisor", on_wait=print_waiting)
    try:
        admin = admin_pb2_grpc.AdminStub(channel)
        parts = len(admin.ListPartitions(common_pb2.Empty(), timeout=30).partitions)
        devs = len(admin.ListDevices(common_pb2.Empty(), timeout=30).devices)
    finally:
        channel.close()
    said = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in ((parts, "partition"), (devs, "device")) if n]
    return ", ".join(said)


def run_replay(args: argparse.Namespace, token: str | None) -> int:
    token = token or os.environ.get("PVIOMMU_ADMIN_TOKEN")
    if not token:
        print("pviommu replay: the admin token is needed (--token, --token-file, $PVIOMMU_TOKEN or "
              "$PVIOMMU_ADMIN_TOKEN)", file=sys.stderr)
        return exitcodes.USAGE
    try:
        state = not_fresh(args.hypervisor, token)
        if state and not args.force:
            print(f"pviommu replay: the hypervisor at {args.hypervisor} is not fresh ({state}); a replay needs one "
                  "with no partitions and no devices, or the ids and answers will differ (--force replays anyway)",
                  file=sys.stderr)
            return exitcodes.USAGE
        if state:
            print(f"pviommu replay: warning: the hypervisor is not fresh ({state}); replaying anyway (--force)",
                  file=sys.stderr)
        report = replay_file(args.trace, args.hypervisor, token)
    except ConnectionError as exc:
        print(f"pviommu replay: {exc}", file=sys.stderr)
        return exitcodes.CONNECT
    except OSError as exc:
        print(f"pviommu replay: cannot read {args.trace}: {exc.strerror}", file=sys.stderr)
        return exitcodes.USAGE
    except grpc.RpcError as exc:
        print(f"pviommu replay: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return exitcodes.for_rpc(exc.code())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"replayed {report.lines} lines: {report.admin} admin changes, {report.hypercalls} hypercalls, "
              f"{report.faults_skipped} fault reports skipped, {report.bad_lines} unreadable lines")
        for w in report.warnings:
            print(f"warning: {w}")
        for m in report.mismatches:
            print(f"MISMATCH line {m.seq}: {m.what}: recorded {m.expected}, got {m.got} {m.detail}".rstrip())
        print("OK: every status matched" if report.ok else f"{len(report.mismatches)} mismatches")
    return exitcodes.OK if report.ok else exitcodes.FAILED
