"""A stalled IOMMU unit (alive, its queue not consumed): every state-changing
hypercall and admin call that needs its confirmation answers TIME_OUT and
leaves the host's state exactly as it was; the device is then UNSYNCED and is
handed to no one until a resync is confirmed; a bystander partition's calls
do not wait for the stalled unit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from pviommu.iommu.owner import read_owner
from pviommu.rpc.auth import token_digest
from pviommu.v1 import admin_pb2, common_pb2
from tests.kit.hvkit import CALL_TIMEOUT, INVALID_DEVICE_STATE, S2, SUCCESS, TIME_OUT, FakeDevice, Guest, HvEnv, MiB

FLUSH_TIMEOUT = 0.4
DOM, SPARE, BASE = 3, 4, 5


@dataclass
class Rig:
    env: HvEnv
    g: Guest
    h: Guest
    fake: FakeDevice
    dev: int
    slot: int

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """The unit stops consuming its queue (as a SIGSTOPped device process)."""
        self.fake.servicer.release.clear()
        self.fake.servicer.hang.set()
        try:
            yield
        finally:
            self.fake.servicer.hang.clear()
            self.fake.servicer.release.set()

    def sync(self) -> str:
        return self.env.admin_devices()[self.dev].sync

    def resync(self) -> int:
        return int(self.env.admin.ResyncDevice(admin_pb2.DeviceRequest(logical_device_id=self.dev),
                                               timeout=CALL_TIMEOUT).result.status)

    def admin(self, call: str, **fields: int) -> int:
        request = (admin_pb2.PartitionRequest(**fields) if "partition_id" in fields and len(fields) == 1
                   else admin_pb2.AssignDeviceRequest(**fields) if "partition_id" in fields
                   else admin_pb2.DeviceRequest(**fields))
        return int(getattr(self.env.admin, call)(request, timeout=CALL_TIMEOUT).result.status)


@pytest.fixture
def rig(make_hv: Callable[..., HvEnv]) -> Rig:
    env = make_hv("--flush-timeout", str(FLUSH_TIMEOUT), "--s2-baseline")
    g, h = env.partition("g", 16 * MiB), env.partition("h", 16 * MiB)
    fake = env.fake_device()
    dev, _, _ = env.device("dsa0", g, fake=fake)
    assert g.create(DOM) == SUCCESS and g.configure(DOM, MiB) == SUCCESS and g.attach(DOM, dev) == SUCCESS
    assert g.create(SPARE) == SUCCESS and g.configure(SPARE, 2 * MiB) == SUCCESS
    return Rig(env, g, h, fake, dev, env.admin_devices()[dev].slot)


def _detached(r: Rig) -> None:
    assert r.g.detach(r.dev) == SUCCESS


def _detached_spare_with_tag_held(r: Rig) -> None:
    """SPARE was attached once (its tag may be cached), now DOM is again."""
    assert r.g.detach(r.dev) == SUCCESS and r.g.attach(SPARE, r.dev) == SUCCESS
    assert r.g.detach(r.dev) == SUCCESS and r.g.attach(DOM, r.dev) == SUCCESS
    r.env.host.devices[r.dev].tags.add(r.env.domains(r.g.pid)[(r.g.pid, SPARE)].tag)


def _baseline_mapped(r: Rig) -> None:
    assert r.g.create(BASE, dtype=S2) == SUCCESS
    assert r.g.detach(r.dev) == SUCCESS and r.g.attach(BASE, r.dev, dtype=S2) == SUCCESS
    assert r.g.map(BASE, 0x10_0000, list(range(0x200, 0x210))) == (SUCCESS, 16)


# (name, set-up, the call -> its HV status)
HYPERCALLS: list[tuple[str, Callable[[Rig], None], Callable[[Rig], int]]] = [
    ("detach", lambda r: None, lambda r: r.g.detach(r.dev)),
    ("attach", lambda r: _detached(r), lambda r: r.g.attach(SPARE, r.dev)),
    ("configure an attached domain", lambda r: None, lambda r: r.g.configure(DOM, 3 * MiB)),
    ("block an attached domain", lambda r: None, lambda r: r.g.configure(DOM, 0, blocked=True)),
    ("delete a domain whose tag the unit holds", _detached_spare_with_tag_held, lambda r: r.g.delete(SPARE)),
    ("flush", lambda r: None, lambda r: r.g.flush(DOM)),
    ("flush list", lambda r: None, lambda r: r.g.flush_list(DOM, [(0, 0), (16, 4)])[0]),
    ("baseline unmap", _baseline_mapped, lambda r: r.g.unmap(BASE, 0x10_0000, 16)[0]),
]


@pytest.mark.parametrize(("name", "setup", "call"), HYPERCALLS, ids=[c[0] for c in HYPERCALLS])
def test_hypercall_that_times_out_on_a_stalled_unit_changes_nothing(
        rig: Rig, name: str, setup: Callable[[Rig], None], call: Callable[[Rig], int]) -> None:
    setup(rig)
    before = rig.env.host.snapshot()
    with rig.stalled():
        assert call(rig) == TIME_OUT, name
        assert rig.env.host.snapshot() == before, f"{name}: a refused call changed the host's state"
        assert rig.sync() == "unsynced"
    # once the unit answers again the same call succeeds
    assert rig.resync() == SUCCESS and rig.sync() == "synced"
    assert call(rig) == SUCCESS, name


ADMIN_CALLS: list[tuple[str, Callable[[Rig], int]]] = [
    ("unassign", lambda r: r.admin("UnassignDevice", logical_device_id=r.dev)),
    ("reset partition", lambda r: r.admin("ResetPartition", partition_id=r.g.pid)),
    ("destroy partition", lambda r: r.admin("DestroyPartition", partition_id=r.g.pid)),
]


@pytest.mark.parametrize(("name", "call"), ADMIN_CALLS, ids=[c[0] for c in ADMIN_CALLS])
def test_admin_change_that_times_out_on_a_stalled_unit_changes_nothing(
        rig: Rig, name: str, call: Callable[[Rig], int]) -> None:
    before = rig.env.host.snapshot()
    token_before = rig.env.host.partitions[rig.g.pid].token
    with rig.stalled():
        assert call(rig) == TIME_OUT, name
        assert rig.env.host.snapshot() == before, f"{name}: a refused call changed the host's state"
        assert rig.env.host.partitions[rig.g.pid].token == token_before
        rec = read_owner(rig.env.host.memory, rig.slot)
        assert (rec.partition_id, rec.token_sha256) == (rig.g.pid, token_digest(token_before))
        assert rig.sync() == "unsynced"
    assert rig.resync() == SUCCESS
    assert call(rig) == SUCCESS, name


def test_assigning_an_unsynced_device_times_out_and_leaves_it_with_nobody(rig: Rig) -> None:
    assert rig.admin("UnassignDevice", logical_device_id=rig.dev) == SUCCESS
    before = rig.env.host.snapshot()
    with rig.stalled():
        assert rig.admin("AssignDevice", logical_device_id=rig.dev, partition_id=rig.h.pid) == TIME_OUT
        assert rig.env.host.snapshot() == before
        rec = read_owner(rig.env.host.memory, rig.slot)
        assert rec.partition_id == 0 and not rec.owned  # the record names no owner: nobody's token works there
    assert rig.admin("AssignDevice", logical_device_id=rig.dev, partition_id=rig.h.pid) == SUCCESS
    rec = read_owner(rig.env.host.memory, rig.slot)
    assert (rec.partition_id, rec.token_sha256) == (rig.h.pid, token_digest(rig.h.token))


def test_a_device_written_off_while_alive_keeps_its_old_owner_until_a_confirmed_resync(rig: Rig) -> None:
    """The old failure: a move that timed out marked the live device lost, wrote
    the new owner's context and sent it nothing. Now nothing moves."""
    context = rig.env.host.tables.read_context_raw(rig.slot)
    with rig.stalled():
        assert rig.admin("UnassignDevice", logical_device_id=rig.dev) == TIME_OUT
        # the new owner cannot get it: it is still the old owner's, in its domain, with its context
        assert rig.admin("AssignDevice", logical_device_id=rig.dev, partition_id=rig.h.pid) == INVALID_DEVICE_STATE
        info = rig.env.admin_devices()[rig.dev]
        assert (info.partition_id, info.domain_id, info.reachable, info.sync) == (rig.g.pid, DOM, True, "unsynced")
        assert rig.env.host.tables.read_context_raw(rig.slot) == context
        assert rig.h.attach(DOM, rig.dev) != SUCCESS
    # a heartbeat from the (now running) device resynchronises it
    deadline = time.monotonic() + 5
    while rig.sync() != "synced" and time.monotonic() < deadline:
        rig.env.host.heartbeat(rig.dev)
        time.sleep(0.05)
    assert rig.sync() == "synced"
    assert rig.admin("UnassignDevice", logical_device_id=rig.dev) == SUCCESS
    assert rig.admin("AssignDevice", logical_device_id=rig.dev, partition_id=rig.h.pid) == SUCCESS
    assert rig.h.create(1) == SUCCESS and rig.h.configure(1, MiB) == SUCCESS and rig.h.attach(1, rig.dev) == SUCCESS


def test_a_stalled_unit_stalls_only_its_own_partition(make_hv: Callable[..., HvEnv]) -> None:
    env = make_hv("--flush-timeout", "3")
    g, h = env.partition("g", 16 * MiB), env.partition("h", 16 * MiB)
    stuck = env.fake_device()
    dev, _, _ = env.device("stuck", g, fake=stuck)
    other, _, _ = env.device("other", h, fake=env.fake_device())
    assert g.create(DOM) == SUCCESS and g.configure(DOM, MiB) == SUCCESS and g.attach(DOM, dev) == SUCCESS
    assert h.create(DOM) == SUCCESS and h.configure(DOM, MiB) == SUCCESS and h.attach(DOM, other) == SUCCESS
    stuck.servicer.release.clear()
    stuck.servicer.hang.set()
    answer: list[int] = []
    blocked = threading.Thread(target=lambda: answer.append(g.flush(DOM)))
    blocked.start()
    try:
        time.sleep(0.2)  # g's flush is now waiting for its unit
        for i in range(10):  # the bystander's hypercalls, each needing its own unit's confirmation
            assert h.flush(DOM) == SUCCESS
            assert h.create(10 + i) == SUCCESS and h.configure(10 + i, MiB) == SUCCESS
        env.admin.ListPartitions(common_pb2.Empty(), timeout=CALL_TIMEOUT)
        # every bystander call finished while g's call was still stuck on its unit
        assert blocked.is_alive(), "g's flush returned before its unit answered"
    finally:
        blocked.join(10)
        stuck.servicer.hang.clear()
        stuck.servicer.release.set()
    assert answer == [TIME_OUT]
