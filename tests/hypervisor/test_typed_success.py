"""Every guest hypercall's success path through its typed gRPC method."""

from __future__ import annotations

from pviommu.addr import Iova
from pviommu.mem.bank import bank_base
from pviommu.pt.common import Perm
from tests.kit.hvkit import (
    CAP_PRESENT,
    CAP_S1,
    CAP_S1_5LVL,
    CAP_S2,
    PAGE,
    S1,
    S2,
    SUCCESS,
    HvEnv,
    MiB,
)

PGSIZES_4K_2M_1G = (1 << 12) | (1 << 21) | (1 << 30)


def test_capabilities_report_present_s1_48_bit_and_4k_2m_1g(make_hv) -> None:
    g = make_hv().partition()  # the default hypervisor: no S2 (the baseline option is off)
    r = g.caps()
    assert r.result.status == SUCCESS
    assert r.iommu_cap == CAP_PRESENT | CAP_S1
    assert not r.iommu_cap & (CAP_S2 | CAP_S1_5LVL)
    assert r.max_iova_width == 48
    assert r.pgsize_bitmap == PGSIZES_4K_2M_1G
    assert r.size == 24
    assert g.caps(partition_id=g.pid).result.status == SUCCESS  # own id works like SELF


def test_capabilities_with_the_s2_baseline_option_add_s2(make_hv) -> None:
    r = make_hv("--s2-baseline").partition().caps()
    assert r.result.status == SUCCESS
    assert r.iommu_cap == CAP_PRESENT | CAP_S2 | CAP_S1 == 0b111


def test_capabilities_with_five_level_add_s1_5lvl_and_57_bits(make_hv) -> None:
    g = make_hv("--five-level").partition()
    r = g.caps()
    assert r.result.status == SUCCESS
    assert r.iommu_cap == CAP_PRESENT | CAP_S1 | CAP_S1_5LVL
    assert r.max_iova_width == 57
    assert r.pgsize_bitmap == PGSIZES_4K_2M_1G


def test_logical_device_property_says_device_is_behind_pviommu(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, _ = hv.device("dsa0", g)
    r = g.prop(dev)
    assert r.result.status == SUCCESS
    assert r.device_iommu & 1 == 1


def test_create_configure_attach_detach_delete_round_trip(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, fake = hv.device("dsa0", g)
    slot = hv.admin_devices()[dev].slot
    assert g.create(5) == SUCCESS
    info = hv.domains(g.pid)[(g.pid, 5)]
    assert (info.domain_type, info.configured, list(info.devices)) == (S1, False, [])

    assert g.configure(5, root=2 * MiB) == SUCCESS
    info = hv.domains(g.pid)[(g.pid, 5)]
    assert info.configured and info.translation_enabled and not info.blocked
    assert info.page_table_root == 2 * MiB

    assert g.attach(5, dev) == SUCCESS
    assert list(hv.domains(g.pid)[(g.pid, 5)].devices) == [dev]
    assert hv.admin_devices()[dev].domain_id == 5
    # the device's context entry is now nested, tagged with the domain's tag, rooted at the GPA
    ctx = hv.host.tables.read_context_raw(slot)
    qw0 = int.from_bytes(ctx[0:8], "little")
    assert qw0 & 1 and (qw0 >> 6) & 7 == 3  # present, PGTT nested
    assert int.from_bytes(ctx[8:16], "little") == info.tag
    assert int.from_bytes(ctx[16:24], "little") & ~0xFFF == 2 * MiB
    assert "context" in fake.servicer.scopes()

    assert g.detach(dev) == SUCCESS
    assert hv.admin_devices()[dev].domain_id == 0
    assert hv.host.tables.read_context_raw(slot) == bytes(64)  # blocked
    assert g.delete(5) == SUCCESS
    assert (g.pid, 5) not in hv.domains(g.pid)


def test_configure_identity_and_blocked_modes(hv: HvEnv) -> None:
    g = hv.partition()
    assert g.create(1) == SUCCESS
    assert g.configure(1, translation=False) == SUCCESS
    info = hv.domains(g.pid)[(g.pid, 1)]
    assert info.configured and not info.translation_enabled and info.page_table_root == 0
    assert g.configure(1, translation=True, blocked=True) == SUCCESS
    assert hv.domains(g.pid)[(g.pid, 1)].blocked


def test_flush_device_domain_succeeds_and_reaches_the_unit(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, fake = hv.device("dsa0", g)
    assert g.create(3) == SUCCESS
    assert g.configure(3, root=1 * MiB) == SUCCESS
    assert g.attach(3, dev) == SUCCESS
    tag = hv.domains(g.pid)[(g.pid, 3)].tag
    before = len(fake.servicer.invalidations)
    assert g.flush(3) == SUCCESS
    assert fake.servicer.invalidations[before:] == [("domain", tag, 0, 0, fake.servicer.invalidations[-1][4])]


def test_flush_device_domain_list_reports_every_rep_completed(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, fake = hv.device("dsa0", g)
    assert g.create(3) == SUCCESS
    assert g.configure(3, root=1 * MiB) == SUCCESS
    assert g.attach(3, dev) == SUCCESS
    tag = hv.domains(g.pid)[(g.pid, 3)].tag
    before = len(fake.servicer.invalidations)
    status, reps = g.flush_list(3, [(0x100, 0), (0x200, 1), (0x400, 2)])
    assert (status, reps) == (SUCCESS, 3)
    pages = [(c[0], c[1], c[2], c[3]) for c in fake.servicer.invalidations[before:]]
    assert pages == [("pages", tag, 0x100 * PAGE, 0), ("pages", tag, 0x200 * PAGE, 1),
                     ("pages", tag, 0x400 * PAGE, 2)]


def test_map_and_unmap_device_gpa_pages_fill_the_baseline_table(hv: HvEnv) -> None:
    g = hv.partition(read_only=[(8 * MiB, 2 * MiB)])
    assert g.create(9, dtype=S2) == SUCCESS
    info = hv.domains(g.pid)[(g.pid, 9)]
    assert info.domain_type == S2 and info.configured
    dom = hv.host.partitions[g.pid].domains[9]
    # the admin view names the domain's own table, not the partition's stage 2
    assert info.stage2_root_hpa == int(dom.table.root)
    assert info.stage2_root_hpa != int(hv.host.partitions[g.pid].stage2.root)

    base = 0x4000_0000
    pfns = [0x300, 0x301, 0x7FF]
    assert g.map(9, base, pfns) == (SUCCESS, 3)
    for i, pfn in enumerate(pfns):
        tr = dom.table.lookup(Iova(base + i * PAGE))
        assert tr is not None
        assert tr.oa == bank_base(g.pid) + pfn * PAGE  # HPA in the partition's bank, not the GPA
        assert tr.perm & (Perm.READ | Perm.WRITE) == Perm.READ | Perm.WRITE
    # read-only pages may be mapped readable
    ro_pfn = (8 * MiB) // PAGE
    assert g.map(9, base + 0x10_0000, [ro_pfn], flags=1) == (SUCCESS, 1)
    tr = dom.table.lookup(Iova(base + 0x10_0000))
    assert tr is not None and tr.perm & (Perm.READ | Perm.WRITE) == Perm.READ
    assert hv.host.snapshot()["partitions"][g.pid]["domains"][9][-1] == 4  # mapped pages

    assert g.unmap(9, base, 3) == (SUCCESS, 3)
    for i in range(3):
        assert dom.table.lookup(Iova(base + i * PAGE)) is None
    assert dom.table.lookup(Iova(base + 0x10_0000)) is not None
    assert hv.host.snapshot()["partitions"][g.pid]["domains"][9][-1] == 1


def test_s2_domain_attached_device_gets_s2_only_context_on_the_domain_table(hv: HvEnv) -> None:
    g = hv.partition()
    dev, _, _ = hv.device("dsa0", g)
    assert g.create(2, dtype=S2) == SUCCESS
    assert g.attach(2, dev, dtype=S2) == SUCCESS
    slot = hv.admin_devices()[dev].slot
    qw0 = int.from_bytes(hv.host.tables.read_context_raw(slot)[0:8], "little")
    assert qw0 & 1 and (qw0 >> 6) & 7 == 2
    assert qw0 & ~0xFFF == int(hv.host.partitions[g.pid].domains[2].table.root)
