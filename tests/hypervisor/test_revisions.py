"""The hypervisor enforcing each revision, through the raw ABI, against a real IOMMU unit.

Inputs are packed here from the reference layouts (hyperv-guest-iommu.md section 1), statuses are
the reference's HV_STATUS values and context-entry fields the VT-d PASID-entry layout
(vtd-nested.md section 3), so neither the project's encoders nor its constants are trusted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from pviommu.addr import Gpa, Iova
from pviommu.mem.bank import bank_base
from pviommu.pt.common import Perm
from pviommu.pt.walk import PageTable
from tests.kit.hvkit import (
    ACCESS_DENIED,
    DEVICE_ALREADY_IN_DOMAIN,
    INVALID_PARAMETER,
    PAGE,
    SELF,
    SUCCESS,
    FakeDevice,
    Guest,
    HvEnv,
    MiB,
)

CREATE, ATTACH, MAP, UNMAP, DETACH, CONFIGURE, GET_CAPS = 0xB1, 0xB2, 0xB3, 0xB4, 0xC4, 0xCE, 0x125
S2_TYPE, S1_TYPE = 0, 1
IOVA0 = 0x4000_0000
DATA_A, DATA_B = 4 * MiB, 6 * MiB
DOM_A, DOM_B, DOM_BLOCKED = 7, 8, 9


# -- inputs, packed from the reference ------------------------------------------------------
def dd(dom: int, dtype: int = S1_TYPE) -> bytes:
    """hv_input_device_domain: u64 partition_id, u8 owner_vtl, u8 pad[7], u64 domain_id (type 3:0, id 63:32)."""
    return struct.pack("<QB7xQ", SELF, 0, dtype | dom << 32)


def attach_in(dom: int, dev: int) -> bytes:
    return dd(dom) + struct.pack("<Q", dev)  # 32 B


def configure_in(dom: int, *, translation: bool, blocked: bool, root: int = 0) -> bytes:
    return dd(dom) + struct.pack("<QQ", int(translation) | int(blocked) << 1, root)  # 40 B


def create_in(dom: int, dtype: int) -> bytes:
    return dd(dom, dtype) + struct.pack("<I", 0)  # 28 B


def raw(g: Guest, code: int, data: bytes, reps: int = 0) -> int:
    return g.raw(code | reps << 32, data)[0]


@dataclass
class Rig:
    env: HvEnv
    g: Guest
    fake: FakeDevice
    dev: int
    slot: int
    tables: dict[int, PageTable[Iova, Gpa, Gpa]]

    def tag(self, dom: int) -> int:
        return int(self.env.domains(self.g.pid)[(self.g.pid, dom)].tag)

    def translate(self, i: int = 0):  # type: ignore[no-untyped-def]
        return self.fake.unit.translate(self.slot, Iova(IOVA0 + i * PAGE), PAGE, False)

    def cached(self, dom: int) -> bool:
        return self.fake.unit.iotlb.lookup(self.tag(dom), IOVA0, count=False) is not None

    def context_words(self) -> tuple[int, ...]:
        return struct.unpack("<8Q", self.env.host.tables.read_context_raw(self.slot))


def make_rig(env: HvEnv) -> Rig:
    """Two configured S1 domains over two stage-1 tables (same IOVAs, different data) and a
    blocked domain; the device in domain A with its IOTLB warm."""
    side = env.guest_device("g", 16 * MiB)
    g, fake, dev, slot = side.guest, side.fake, side.dev, side.slot
    tables = {}
    for dom, data in ((DOM_A, DATA_A), (DOM_B, DATA_B)):
        t = side.s1 if dom == DOM_A else side.tables.new_table()
        t.map(Iova(IOVA0), Gpa(data), 4 * PAGE, Perm.READ | Perm.WRITE)
        assert raw(g, CREATE, create_in(dom, S1_TYPE)) == SUCCESS
        assert raw(g, CONFIGURE, configure_in(dom, translation=True, blocked=False, root=int(t.root))) == SUCCESS
        tables[dom] = t
    assert raw(g, CREATE, create_in(DOM_BLOCKED, S1_TYPE)) == SUCCESS
    assert raw(g, CONFIGURE, configure_in(DOM_BLOCKED, translation=True, blocked=True)) == SUCCESS
    assert raw(g, ATTACH, attach_in(DOM_A, dev)) == SUCCESS
    rig = Rig(env, g, fake, dev, slot, tables)
    runs = rig.translate()
    assert runs.fault is None and runs.runs[0].hpa == bank_base(g.pid) + DATA_A
    assert rig.cached(DOM_A)
    return rig


# -- ATTACH of a device that is in another domain -------------------------------------------------
def test_v2_attach_replaces_the_translation_with_no_blocked_window_and_drops_old_iotlb_entries(
        make_hv, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(make_hv("--revision", "v2"))
    written: list[bytes] = []
    real = rig.env.host.tables.write_context

    def record(slot: int, entry):  # type: ignore[no-untyped-def]
        written.append(entry.pack())
        real(slot, entry)

    monkeypatch.setattr(rig.env.host.tables, "write_context", record)
    rig.fake.servicer.invalidations.clear()
    assert raw(rig.g, ATTACH, attach_in(DOM_B, rig.dev)) == SUCCESS
    # when the call has returned: the old domain's entries are gone, DMA uses B's tables
    assert not rig.cached(DOM_A)
    runs = rig.translate()
    assert runs.fault is None and runs.runs[0].hpa == bank_base(rig.g.pid) + DATA_B
    # one context write, straight to the nested entry of B: never a blocked (P=0) one between
    assert len(written) == 1
    qw0, qw1, qw2 = struct.unpack_from("<3Q", written[0])
    assert qw0 & 1 == 1 and (qw0 >> 6) & 0x7 == 3  # P, PGTT = 011b nested
    assert qw1 & 0xFFFF == rig.tag(DOM_B)  # DID
    assert qw2 & ~0xFFF == int(rig.tables[DOM_B].root)  # FSPTPTR
    assert rig.context_words()[:3] == (qw0, qw1, qw2)
    scopes = [(s, tag) for s, tag, *_ in rig.fake.servicer.invalidations]
    assert scopes.index(("domain", rig.tag(DOM_A))) > scopes.index(("context", 0))
    assert rig.env.admin_devices()[rig.dev].domain_id == DOM_B
    assert rig.env.domains(rig.g.pid)[(rig.g.pid, DOM_A)].devices == []


@pytest.mark.parametrize("revision", ["rfc", "v1"])
def test_rfc_and_v1_refuse_attach_of_a_device_in_a_domain_with_0x66_and_change_nothing(make_hv,
                                                                                       revision: str) -> None:
    rig = make_rig(make_hv("--revision", revision))
    before = rig.env.host.snapshot()
    assert raw(rig.g, ATTACH, attach_in(DOM_B, rig.dev)) == DEVICE_ALREADY_IN_DOMAIN == 0x66
    assert raw(rig.g, ATTACH, attach_in(DOM_BLOCKED, rig.dev)) == 0x66
    assert rig.env.host.snapshot() == before and rig.cached(DOM_A)
    # the RFC/v1 way: DETACH (16 B: u64 partition_id, u64 device_id), then ATTACH
    assert raw(rig.g, DETACH, struct.pack("<QQ", SELF, rig.dev)) == SUCCESS
    assert raw(rig.g, ATTACH, attach_in(DOM_B, rig.dev)) == SUCCESS
    assert rig.translate().runs[0].hpa == bank_base(rig.g.pid) + DATA_B


def test_v2_attaching_the_blocking_domain_succeeds_from_any_domain_and_blocks_dma(make_hv) -> None:
    rig = make_rig(make_hv("--revision", "v2"))
    assert raw(rig.g, ATTACH, attach_in(DOM_BLOCKED, rig.dev)) == SUCCESS
    assert rig.context_words()[0] & 1 == 0  # P = 0: every request faults
    assert rig.translate().fault is not None and not rig.cached(DOM_A)
    assert raw(rig.g, ATTACH, attach_in(DOM_A, rig.dev)) == SUCCESS  # and back, directly
    assert rig.translate().runs[0].hpa == bank_base(rig.g.pid) + DATA_A


@pytest.mark.parametrize("revision", ["rfc", "v1", "v2"])
def test_same_domain_attach_is_0x66_by_default_and_success_with_nothing_done_when_configured(
        make_hv, revision: str) -> None:
    rig = make_rig(make_hv("--revision", revision))
    before = rig.env.host.snapshot()
    assert raw(rig.g, ATTACH, attach_in(DOM_A, rig.dev)) == DEVICE_ALREADY_IN_DOMAIN
    assert rig.env.host.snapshot() == before
    lenient = make_rig(make_hv("--revision", revision, "--same-domain-attach", "success"))
    before = lenient.env.host.snapshot()
    lenient.fake.servicer.invalidations.clear()
    assert raw(lenient.g, ATTACH, attach_in(DOM_A, lenient.dev)) == SUCCESS
    assert lenient.env.host.snapshot() == before and lenient.fake.servicer.invalidations == []
    assert lenient.cached(DOM_A)


# -- ConfigureDeviceDomain settings -----------------------------------------------------------
@pytest.mark.parametrize("revision", ["rfc", "v1", "v2"])
def test_blocked_without_translation_enabled_is_invalid_parameter_in_every_revision(make_hv, revision: str) -> None:
    env = make_hv("--revision", revision)
    g = env.partition("g", 16 * MiB)
    assert raw(g, CREATE, create_in(3, S1_TYPE)) == SUCCESS
    before = env.host.snapshot()
    assert raw(g, CONFIGURE, configure_in(3, translation=False, blocked=True)) == INVALID_PARAMETER == 0x5
    assert env.host.snapshot() == before
    assert raw(g, CONFIGURE, configure_in(3, translation=True, blocked=True)) == SUCCESS
    assert raw(g, CONFIGURE, configure_in(3, translation=False, blocked=False)) == SUCCESS  # identity


def test_blocked_without_translation_can_be_accepted_as_blocked(make_hv) -> None:
    rig = make_rig(make_hv("--blocked-without-translation", "accept"))
    assert raw(rig.g, CONFIGURE, configure_in(DOM_A, translation=False, blocked=True)) == SUCCESS
    info = rig.env.domains(rig.g.pid)[(rig.g.pid, DOM_A)]
    assert info.blocked and not info.translation_enabled
    assert rig.context_words()[0] & 1 == 0 and rig.translate().fault is not None  # blocked, not identity


# -- the S2 baseline is an option ----------------------------------------------------------------
def caps(g: Guest) -> tuple[int, int]:
    status, _, out = g.raw(GET_CAPS, struct.pack("<QQ", SELF, 0))
    assert status == SUCCESS and len(out) == 24
    return struct.unpack_from("<Q", out, 8)[0], struct.unpack_from("<Q", out, 16)[0]  # iommu_cap, pgsize_bitmap


def test_without_the_s2_option_guests_get_no_s2_domains_and_no_map_calls(make_hv) -> None:
    env = make_hv()
    g = env.partition("g", 16 * MiB)
    assert caps(g)[0] & 0b10 == 0  # HV_IOMMU_CAP_S2 clear
    before = env.host.snapshot()
    assert raw(g, CREATE, create_in(5, S2_TYPE)) == INVALID_PARAMETER  # a type not offered
    map_in = dd(5, S2_TYPE) + struct.pack("<B3xIQ", 0, 0x3, 0x10_0000) + struct.pack("<2Q", 0x20, 0x21)
    assert raw(g, MAP, map_in, reps=2) == ACCESS_DENIED == 0x6  # a root-side call
    assert raw(g, UNMAP, dd(5, S2_TYPE) + struct.pack("<Q", 0x10_0000), reps=1) == ACCESS_DENIED
    assert env.host.snapshot() == before


def test_with_the_s2_option_caps_advertise_s2_and_the_baseline_works(make_hv) -> None:
    env = make_hv("--s2-baseline")
    g = env.partition("g", 16 * MiB)
    assert caps(g)[0] == 0b111  # PRESENT | S2 | S1
    assert raw(g, CREATE, create_in(5, S2_TYPE)) == SUCCESS
    map_in = dd(5, S2_TYPE) + struct.pack("<B3xIQ", 0, 0x3, 0x10_0000) + struct.pack("<2Q", 0x20, 0x21)
    status, reps, _ = g.raw(MAP | 2 << 32, map_in)
    assert (status, reps) == (SUCCESS, 2)


def test_pgsize_bitmap_option_is_what_the_capabilities_report(make_hv) -> None:
    g = make_hv("--pgsize-bitmap", "0x201000").partition("g", 16 * MiB)
    assert caps(g) == (0b101, 0x20_1000)
