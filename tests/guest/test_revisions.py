"""The guest driver as each revision's driver, against a real hypervisor that traces every hypercall.

What the driver sent is read back from the hypervisor's trace (the packed input block and the
input value of each call); the expected bytes are packed here from the reference layouts
(hyperv-guest-iommu.md section 1) and the behaviour from hyperv-series-revisions.md tables 1-4.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent.agent import Agent
from guest_agent.driver.domain import PagingDomain
from guest_agent.driver.hypercalls import GuestDeviceInfo
from guest_agent.driver.pviommu import PvIommu, decide
from guest_agent.driver.stats import Stats
from guest_agent.errors import HypercallFailed, InvalidRequest, IommuAbsent
from pviommu.abi.hv import GetIommuCapabilitiesOutput
from pviommu.addr import Gpa, Iova
from pviommu.pt.common import Perm
from tests.kit.guest_env import HvEnv, PartitionInfo, start_hypervisor

SELF = 0xFFFF_FFFF_FFFF_FFFF
CREATE, ATTACH, DETACH, CONFIGURE, FLUSH, FLUSH_LIST = 0xB1, 0xB2, 0xC4, 0xCE, 0xD0, 0xD1
PRESENT, S1, S1_5LVL = 1 << 0, 1 << 2, 1 << 3
K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
REVISIONS = ["rfc", "v1", "v2"]


def dd(dom: int, dtype: int = 1) -> bytes:
    """hv_input_device_domain: u64 partition_id, u8 owner_vtl, u8 pad[7], u64 domain_id (type 3:0, id 63:32)."""
    return struct.pack("<QB7xQ", SELF, 0, dtype | dom << 32)


class Traced:
    """A hypervisor with ``--trace``, and the calls one partition made since ``mark()``."""

    def __init__(self, env: HvEnv, path: Path) -> None:
        self.env, self.path, self._seen = env, path, 0

    def calls(self, pid: int) -> list[tuple[int, int, bytes, int]]:
        """(code, input value, packed input, status) of ``pid``'s hypercalls since the mark."""
        lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        hc = [r for r in lines if r["kind"] == "hypercall" and r["partition"]["id"] == pid]
        return [(r["code"], r["input_value"], bytes.fromhex(r["input"]), r["status"]) for r in hc[self._seen:]]

    def codes(self, pid: int) -> list[int]:
        return [c for c, *_ in self.calls(pid)]

    def mark(self, pid: int) -> None:
        self._seen += len(self.calls(pid))


@pytest.fixture
def make_traced(tmp_path: Path) -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(*options: str) -> Traced:
        where = tmp_path / f"hv{len(made)}"
        where.mkdir()
        env = start_hypervisor(where, False, "--trace", str(where / "trace.jsonl"), *options)
        made.append(Traced(env, where / "trace.jsonl"))
        return made[-1]

    yield make
    for t in made:
        t.env.close()
        if t.env.host.trace is not None:
            t.env.host.trace.close()


def booted(t: Traced, revision: str) -> tuple[PartitionInfo, int, Agent]:
    p = t.env.partition()
    dev = t.env.device(p).logical_device_id
    return p, dev, t.env.agent(p, revision=revision)


# -- init (table 3) ------------------------------------------------------------------------------
@pytest.mark.parametrize(("pgsize", "want"), [
    # given bitmap: (rfc, v1, v2) -- None = init fails (-ENODEV)
    (K4 | 0x2000, (K4 | 0x2000, K4, None)),     # an 8K bit: v1 masks it away, v2 refuses
    (0x2000, (0x2000, K4, None)),               # nothing usable: v1 falls back to 4K
    (0, (0, K4, None)),                         # empty
    (M2, (M2, M2, M2)),                         # no 4K at all: fine for v2 ("require 4 KiB" is L, not v2)
    (K4 | M2 | G1, (K4 | M2 | G1,) * 3),
])
def test_pgsize_bitmap_init_check_of_each_revision(pgsize: int, want: tuple[int | None, ...]) -> None:
    for revision, expected in zip(REVISIONS, want, strict=True):
        caps = GetIommuCapabilitiesOutput(48, 0, PRESENT | S1, pgsize)
        if expected is None:
            with pytest.raises(IommuAbsent, match="page sizes"):
                decide(caps, revision=revision)
            assert decide(caps, revision=revision, allow_no_iommu=True) is None
        else:
            g = decide(caps, revision=revision)
            assert g is not None and g.pgsize_bitmap == expected, revision


@pytest.mark.parametrize("revision", REVISIONS)
def test_widths_are_clamped_to_48_without_5lvl_and_only_the_rfc_keeps_the_reported_aperture(revision: str) -> None:
    g = decide(GetIommuCapabilitiesOutput(57, 0, PRESENT | S1, K4), revision=revision)
    assert g is not None and g.iova_width == 48 and g.levels == 4
    assert g.aperture_end == (1 << 57) - 1 if revision == "rfc" else (1 << 48) - 1
    assert g.top_level == (None if revision == "rfc" else 3)
    g5 = decide(GetIommuCapabilitiesOutput(57, 0, PRESENT | S1 | S1_5LVL, K4), revision=revision)
    assert g5 is not None and g5.iova_width == 57 and g5.levels == 5
    assert g5.top_level == (None if revision == "rfc" else 4)


class _FailingCaps:
    """Just enough HvClient for init: GetIommuCapabilities answers ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status

    def get_iommu_capabilities(self) -> GetIommuCapabilitiesOutput:
        raise HypercallFailed(self.status, "GetIommuCapabilities refused", call="GetIommuCapabilities")

    def list_devices(self) -> list[GuestDeviceInfo]:
        return []


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("status", [0x2, 0x5, 0x6])
def test_a_failed_capability_call_means_no_iommu_in_every_revision(revision: str, status: int) -> None:
    drv = PvIommu(_FailingCaps(status), None, None, Stats(), revision=revision)  # type: ignore[arg-type]
    with pytest.raises(IommuAbsent, match="GetIommuCapabilities failed"):
        drv.init()
    relaxed = PvIommu(_FailingCaps(status), None, None, Stats(), revision=revision,  # type: ignore[arg-type]
                      allow_no_iommu=True)
    relaxed.init()
    assert relaxed.geometry is None


def test_v2_agent_refuses_to_start_on_a_bitmap_v1_and_the_rfc_accept(make_traced: Callable[..., Traced]) -> None:
    t = make_traced("--pgsize-bitmap", hex(K4 | 0x2000 | M2))
    p = t.env.partition()
    with pytest.raises(IommuAbsent, match="unsupported page sizes: pgsize_bitmap=0x203000"):
        t.env.agent(p, revision="v2")
    assert t.env.agent(p, revision="v1").iommu.geometry.pgsize_bitmap == K4 | M2  # type: ignore[union-attr]


# -- static domains (table 2) --------------------------------------------------------------------
@pytest.mark.parametrize("revision", REVISIONS)
def test_identity_then_blocked_are_created_and_configured_first_with_ids_1_and_2(
        make_traced: Callable[..., Traced], revision: str) -> None:
    t = make_traced("--revision", revision)
    p, _, agent = booted(t, revision)
    calls = t.calls(p.partition_id)[:5]
    assert [(c, data) for c, _, data, _ in calls] == [
        (0x125, struct.pack("<QQ", SELF, 0)),                     # GetIommuCapabilities(SELF)
        (CREATE, dd(1) + struct.pack("<I", 1)),                   # 28 B, forward_progress_required = 1
        (CONFIGURE, dd(1) + struct.pack("<QQ", 0b00, 0)),         # identity: translation_enabled = 0
        (CREATE, dd(2) + struct.pack("<I", 1)),
        (CONFIGURE, dd(2) + struct.pack("<QQ", 0b11, 0)),         # blocked: translation_enabled = 1, blocked = 1
    ]
    assert agent.iommu.identity is not None and agent.iommu.blocked is not None
    assert (agent.iommu.identity.domain_id, agent.iommu.blocked.domain_id) == (1, 2)
    for static in (agent.iommu.identity, agent.iommu.blocked):  # v2: static initializers, no geometry/pgsize
        assert (static.aperture is None) is (revision == "v2")
        assert static.pgsize_bitmap == (0 if revision == "v2" else K4 | M2 | G1)


# -- attach (table 1) ------------------------------------------------------------------------------
@pytest.mark.parametrize("revision", REVISIONS)
def test_changing_domain_is_detach_flush_attach_before_v2_and_one_attach_in_v2(
        make_traced: Callable[..., Traced], revision: str) -> None:
    t = make_traced("--revision", revision)
    p, dev, agent = booted(t, revision)
    old = agent.iommu.device(dev).domain
    assert old is not None
    new = agent.create_domain("paging")
    t.mark(p.partition_id)
    agent.attach(new.domain_id, dev)
    calls = [(c, v, data, s) for c, v, data, s in t.calls(p.partition_id)]
    attach = (ATTACH, ATTACH, dd(new.domain_id) + struct.pack("<Q", dev), 0)
    if revision == "v2":
        assert calls == [attach]
    else:
        assert calls == [
            (DETACH, DETACH, struct.pack("<QQ", SELF, dev), 0),           # 16 B
            (FLUSH, FLUSH, dd(old.domain_id) + struct.pack("<II", 0, 0), 0),  # 32 B
            attach,
        ]
    assert agent.iommu.device(dev).domain is new and dev in new.devices and dev not in old.devices
    t.mark(p.partition_id)
    agent.attach(new.domain_id, dev)  # the current domain is tracked: nothing is sent
    assert t.calls(p.partition_id) == []


def test_v2_never_sends_detach_through_attach_vfio_release_release_device_and_shutdown(
        make_traced: Callable[..., Traced]) -> None:
    t = make_traced("--revision", "v2")
    p, dev, agent = booted(t, "v2")
    state = agent.iommu.device(dev)
    other = agent.create_domain("paging")
    agent.attach(other.domain_id, dev)
    agent.detach(dev)  # VFIO-style: back to the default domain
    agent.iommu.release(state)
    agent.close()
    codes = t.codes(p.partition_id)
    assert DETACH not in codes and codes.count(ATTACH) >= 4


@pytest.mark.parametrize("revision", REVISIONS)
def test_release_device_of_each_revision(make_traced: Callable[..., Traced], revision: str) -> None:
    t = make_traced("--revision", revision)
    p, dev, agent = booted(t, revision)
    state = agent.iommu.device(dev)
    assert state.dma_ops is (revision != "v2")  # RFC/v1 install dma_ops at probe
    state.ats_enabled = True  # as if the capability had offered ATS
    t.mark(p.partition_id)
    agent.iommu.release(state)
    codes = t.codes(p.partition_id)
    blocked = agent.iommu.blocked
    assert blocked is not None
    if revision == "rfc":  # blocking domain (DETACH + FLUSH + ATTACH), then release_device's DETACH
        assert codes == [DETACH, FLUSH, ATTACH, DETACH] and state.domain is None
        assert state.ats_enabled and not state.dma_ops
    elif revision == "v1":  # release_device: disable ATS, clear dma_ops
        assert codes == [DETACH, FLUSH, ATTACH] and state.domain is blocked
        assert not state.ats_enabled and not state.dma_ops
    else:  # v2: the blocking attach, then release_device only disables ATS
        assert codes == [ATTACH] and state.domain is blocked and not state.ats_enabled
    assert state.released


def test_v2_blocking_attach_op_warns_and_returns_the_status_and_the_claim_fails(
        make_traced: Callable[..., Traced], monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_traced("--revision", "v2")
    _, dev, agent = booted(t, "v2")
    state = agent.iommu.device(dev)
    before = state.domain

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise HypercallFailed(0x66, "AttachDeviceDomain refused: HV_STATUS_DEVICE_ALREADY_IN_DOMAIN",
                              call="AttachDeviceDomain")

    monkeypatch.setattr(agent.hv, "attach", refuse)
    assert agent.iommu.blocking_attach(state) == 0x66
    with pytest.raises(HypercallFailed) as err:
        agent.iommu.attach(state, agent.iommu.blocked)  # type: ignore[arg-type]
    assert err.value.raw_status == 0x66
    assert state.domain is before and agent.stats.get("blocking_attach_failed") == 2


# -- page-selective flush (section 4) ---------------------------------------------------------------
@pytest.mark.parametrize("revision", REVISIONS)
def test_unmap_flush_is_each_revisions_list_call_byte_for_byte(make_traced: Callable[..., Traced],
                                                               revision: str) -> None:
    t = make_traced("--revision", revision)
    p, dev, agent = booted(t, revision)
    dom = agent.iommu.device(dev).domain
    assert isinstance(dom, PagingDomain)
    gpa, _ = agent.alloc_buffer(7 * K4)
    dom.dma_map(Gpa(gpa), 7 * K4, Perm.READ | Perm.WRITE, iova=Iova(0x3000))  # pages 3..9
    t.mark(p.partition_id)
    r = dom.dma_unmap(Iova(0x3000), 7 * K4)
    assert r.flushed
    calls = t.calls(p.partition_id)
    header = dd(dom.domain_id) + struct.pack("<II", 1, 0)  # flags = HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT
    if revision == "rfc":  # no page-selective flush: FlushDeviceDomain, flags 0
        assert calls == [(FLUSH, FLUSH, dd(dom.domain_id) + struct.pack("<II", 0, 0), 0)]
    elif revision == "v1":  # blocks (3, 0), (4, 2), (8, 1): u64 = page_number << 12 | page_mask_shift
        assert calls == [(FLUSH_LIST, FLUSH_LIST | 3 << 32, header + struct.pack("<3Q", 0x3000, 0x4002, 0x8001), 0)]
    else:  # one block: pages 3 ^ 9 = 0b1010 -> shift 4 from page 0, rep count 1, start index 0
        assert calls == [(FLUSH_LIST, FLUSH_LIST | 1 << 32, header + struct.pack("<Q", 0x0004), 0)]


@pytest.mark.parametrize("revision", ["v1", "v2"])
def test_a_failed_list_call_is_only_logged_in_v1_and_falls_back_to_a_domain_flush_in_v2(
        make_traced: Callable[..., Traced], monkeypatch: pytest.MonkeyPatch, revision: str) -> None:
    t = make_traced("--revision", revision)
    p, dev, agent = booted(t, revision)
    dom = agent.iommu.device(dev).domain
    assert isinstance(dom, PagingDomain)

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise HypercallFailed(0x5, "FlushDeviceDomainList refused", call="FlushDeviceDomainList")

    monkeypatch.setattr(agent.hv, "flush_domain_list", refuse)
    gpa, _ = agent.alloc_buffer(K4)
    iova = dom.dma_map(Gpa(gpa), K4, Perm.READ)
    t.mark(p.partition_id)
    assert dom.dma_unmap(iova, K4).flushed
    assert agent.stats.get("flush_list_failed") == 1
    assert t.codes(p.partition_id) == ([] if revision == "v1" else [FLUSH])


# -- mixed revisions ----------------------------------------------------------------------------------
def test_a_v1_driver_on_a_v2_hypervisor_changes_domains_with_detach_and_attach(
        make_traced: Callable[..., Traced]) -> None:
    t = make_traced("--revision", "v2", "--s2-baseline")
    p, dev, agent = booted(t, "v1")
    base = agent.create_domain("baseline")
    t.mark(p.partition_id)
    agent.attach(base.domain_id, dev)
    agent.detach(dev)
    assert [(c, s) for c, _, _, s in t.calls(p.partition_id)] == [
        (DETACH, 0), (FLUSH, 0), (ATTACH, 0), (DETACH, 0), (FLUSH, 0), (ATTACH, 0)]
    assert agent.iommu.device(dev).domain is agent.iommu.device(dev).default_domain


def test_a_v2_driver_on_a_v1_hypervisor_boots_but_cannot_change_a_devices_domain(
        make_traced: Callable[..., Traced]) -> None:
    t = make_traced("--revision", "v1", "--s2-baseline")
    p, dev, agent = booted(t, "v2")  # probe attaches a device in no domain: that works
    state = agent.iommu.device(dev)
    default = state.domain
    assert isinstance(default, PagingDomain)
    base = agent.create_domain("baseline")
    t.mark(p.partition_id)
    with pytest.raises(HypercallFailed) as err:
        agent.attach(base.domain_id, dev)
    assert err.value.raw_status == 0x66  # "detach it first", which v2 never does
    assert t.calls(p.partition_id)[0][0] == ATTACH and t.calls(p.partition_id)[0][3] == 0x66
    assert state.domain is default and dev in default.devices  # still translated by its default domain
    gpa, _ = agent.alloc_buffer(K4)
    iova = default.dma_map(Gpa(gpa), K4, Perm.READ)
    assert default.translate(iova) == Gpa(gpa) and default.dma_unmap(iova, K4).flushed


# -- the baseline needs the hypervisor's S2 option ----------------------------------------------------
def test_the_driver_refuses_a_baseline_domain_when_s2_is_not_advertised(make_traced: Callable[..., Traced]) -> None:
    t = make_traced()
    p, _, agent = booted(t, "v2")
    t.mark(p.partition_id)
    with pytest.raises(InvalidRequest, match=r"HV_IOMMU_CAP_S2 is clear.*--s2-baseline"):
        agent.create_domain("baseline")
    assert t.calls(p.partition_id) == []  # refused before any hypercall


def test_info_and_counters_name_the_revision(make_traced: Callable[..., Traced]) -> None:
    t = make_traced("--revision", "v1")
    _, _, agent = booted(t, "v1")
    assert agent.iommu.revision.value == "v1"
    counters = agent.counters()
    assert counters["revision_v1"] == 1 and "revision_v2" not in counters


