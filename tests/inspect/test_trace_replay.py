"""``serve hypervisor --trace`` records every judged hypercall, admin change
and fault report as JSON lines; ``pviommu replay`` re-runs the trace against a
fresh hypervisor and gets the same statuses and the same domain state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pvctl.cli import main as cli
from pvctl.replay import read_trace, replay_file
from pviommu.abi import hv
from pviommu.v1 import admin_pb2, common_pb2, hypervisor_pb2_grpc
from tests.kit.hvkit import (
    ACCESS_DENIED,
    ADMIN_TOKEN,
    DEVICE_ALREADY_IN_DOMAIN,
    FLUSH,
    INVALID_DEVICE_STATE,
    INVALID_PARAMETER,
    S1,
    S2,
    SELF,
    SUCCESS,
    Guest,
    HvEnv,
    MiB,
)

#: The recording and every fresh hypervisor: the v1 semantics (ATTACH of a device in a domain is
#: refused with 0x66, one of the statuses the trace must show) and the S2 baseline (domain 5).
HV_OPTIONS = ("--revision", "v1", "--s2-baseline")


def _record(env: HvEnv, tmp: Path) -> tuple[list[int], Guest, Guest]:
    """A session of two guests: domains created, configured, attached, flushed,
    deleted, some calls refused; a baseline domain mapped; one partition reset,
    one destroyed. Returns the statuses in call order."""
    a, b = env.partition("alpha", 16 * MiB), env.partition("beta", 8 * MiB)
    dev_a, _, _ = env.device("dsa-a", a)
    dev_a2, _, _ = env.device("dsa-a2", a)
    dev_b, _, _ = env.device("dsa-b", b)
    st: list[int] = []
    st += [a.create(1), a.create(2), a.create(3), a.create(1)]                    # last: duplicate
    st += [a.configure(1, 0x10_0000), a.configure(2, 0x20_0000), a.configure(3, blocked=True, translation=True)]
    st += [a.configure(9, 0x10_0000), a.configure(1, 0x1234)]                       # unknown, unaligned
    st += [a.attach(1, dev_a), a.attach(2, dev_a2), a.attach(2, dev_a), a.attach(1, dev_b)]
    st += [a.flush(1), a.flush(2), a.flush(7)]
    st += [a.flush_list(1, [(0x400, 0), (0x800, 2)])[0], a.flush_list(1, [(0x401, 1)])[0]]
    st += [a.delete(2), a.detach(dev_a2), a.delete(2), a.detach(dev_a2)]          # first: devices still in
    st += [a.create(5, S2), a.map(5, 0x1000_0000, [0x100, 0x101, 0x102])[0], a.unmap(5, 0x1000_0000, 1)[0]]
    st += [a.create(4, partition_id=a.pid), a.create(6, partition_id=b.pid)]        # own id by number; another's
    caps_value, caps = hv.encode_request(hv.GetIommuCapabilitiesInput(SELF))
    st += [a.raw(caps_value.encode(), caps)[0]]
    st += [b.create(1), b.configure(1, 0x30_0000), b.attach(1, dev_b), b.attach(1, dev_a)]
    c = env.partition("gamma", 4 * MiB)
    st += [c.create(1)]
    assert env.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=c.pid)).result.status == SUCCESS
    reset = env.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=b.pid))
    assert reset.result.status == SUCCESS
    b2 = Guest(b.pid, reset.token, hypervisor_pb2_grpc.HypervisorStub(env.channel(reset.token)), b.bank_path,
               b.memory_bytes)  # the rebooted guest, with its new credential
    st += [b2.create(3), b2.configure(3, 0x1000), b2.attach(3, dev_b)]
    return st, a, b2


def _state(env: HvEnv) -> dict[tuple[str, int], tuple[Any, ...]]:
    """ListDomains by (partition name, domain id), devices by name."""
    names = {p.partition_id: p.name for p in env.admin.ListPartitions(common_pb2.Empty()).partitions}
    devs = {d.logical_device_id: d.name for d in env.admin_devices().values()}
    return {
        (names[d.partition_id], d.domain_id): (d.domain_type, d.configured, d.translation_enabled, d.blocked,
                                               d.five_level, d.page_table_root, sorted(devs[x] for x in d.devices))
        for d in env.admin.ListDomains(admin_pb2.ListDomainsRequest()).domains
    }


@pytest.fixture
def recorded(make_hv: Callable[..., HvEnv], tmp_path: Path) -> tuple[Path, HvEnv, list[int]]:
    trace = tmp_path / "trace.jsonl"
    env = make_hv("--trace", str(trace), *HV_OPTIONS)
    statuses, _, _ = _record(env, tmp_path)
    return trace, env, statuses


def test_trace_has_one_line_per_hypercall_with_its_bytes_and_status(recorded: tuple[Path, HvEnv, list[int]]
                                                                    ) -> None:
    trace, _, statuses = recorded
    records = list(read_trace(trace))
    assert records[0]["kind"] == "trace_start" and records[0]["config"]["max_domains_per_partition"] == 64
    calls = [r for r in records if r["kind"] == "hypercall"]
    assert [c["status"] for c in calls] == statuses
    assert {INVALID_PARAMETER, ACCESS_DENIED, INVALID_DEVICE_STATE, DEVICE_ALREADY_IN_DOMAIN} <= set(statuses)
    first = calls[0]
    assert first["partition"] == {"id": 1, "name": "alpha"} and first["call"] == "CREATE_DEVICE_DOMAIN"
    decoded = hv.decode_call(first["input_value"], bytes.fromhex(first["input"]))
    assert isinstance(decoded, hv.CreateDeviceDomainInput) and decoded.device_domain.domain_id.id == 1
    assert decoded.device_domain.domain_id.type == S1
    flush_list = [c for c in calls if c["call"] == "FLUSH_DEVICE_DOMAIN_LIST"]
    assert flush_list[0]["reps"] == 2 and flush_list[0]["input_value"] >> 32 & 0xFFF == 2
    assert [c["code"] for c in calls if c["call"] == "FLUSH_DEVICE_DOMAIN"] == [FLUSH] * 3
    ops = [r["op"] for r in records if r["kind"] == "admin"]
    assert ops == ["create_partition", "create_partition", "register_device", "assign_device", "register_device",
                   "assign_device", "register_device", "assign_device", "create_partition", "destroy_partition",
                   "reset_partition"]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def test_replay_against_a_fresh_hypervisor_reproduces_statuses_and_domain_state(
        recorded: tuple[Path, HvEnv, list[int]], make_hv: Callable[..., HvEnv]) -> None:
    trace, original, _ = recorded
    fresh = make_hv(*HV_OPTIONS)
    # a partition the recording never had: every replayed id is shifted by one
    fresh.partition("decoy", 4 * MiB)
    report = replay_file(trace, fresh.address, ADMIN_TOKEN)
    assert report.ok, report.mismatches
    assert report.partitions == {1: 2, 2: 3, 3: 4}
    assert report.hypercalls == len([r for r in read_trace(trace) if r["kind"] == "hypercall"])
    want = _state(original)
    got = _state(fresh)
    assert got == want
    assert got[("alpha", 1)][-1] == ["dsa-a"] and got[("beta", 3)][-1] == ["dsa-b"]
    assert got[("alpha", 5)][0] == S2 and ("beta", 1) not in got  # the reset dropped beta's first domain
    # the replayed devices have no process: the host gave up on them, the answers did not change
    assert not any(d.reachable for d in fresh.admin_devices().values())


def test_replay_reports_a_recorded_status_that_the_fresh_hypervisor_does_not_give(
        recorded: tuple[Path, HvEnv, list[int]], make_hv: Callable[..., HvEnv], tmp_path: Path) -> None:
    trace, _, _ = recorded
    lines = trace.read_text().splitlines()
    rec = [json.loads(x) for x in lines]
    i = next(k for k, r in enumerate(rec) if r["kind"] == "hypercall" and r["status"] == SUCCESS)
    rec[i]["status"], rec[i]["status_name"] = ACCESS_DENIED, "HV_STATUS_ACCESS_DENIED"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(json.dumps(r) for r in rec) + "\n" + lines[-1][:20])  # and a torn last line
    report = replay_file(tampered, make_hv(*HV_OPTIONS).address, ADMIN_TOKEN)
    assert [(m.seq, m.expected, m.got) for m in report.mismatches] == [
        (rec[i]["seq"], "HV_STATUS_ACCESS_DENIED", "HV_STATUS_SUCCESS")]
    assert report.bad_lines == 1


def test_replay_cli_exits_zero_when_every_status_matches(recorded: tuple[Path, HvEnv, list[int]],
                                                         make_hv: Callable[..., HvEnv],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    trace, _, _ = recorded
    rc = cli(["replay", str(trace), "--hypervisor", make_hv(*HV_OPTIONS).address, "--token", ADMIN_TOKEN, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and out["mismatches"] == []
