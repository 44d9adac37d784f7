"""Per-partition quota on the hypervisor's table memory (bank-0 frames).

A guest with the map-by-hypercall baseline makes the hypervisor build tables
in bank 0 for it; ``--table-quota FRAMES`` bounds what one partition may hold.
The hypercall that needs one frame more answers INSUFFICIENT_MEMORY and
changes nothing; freed tables give their frames back; the admin sees used/quota.
"""

from __future__ import annotations

from pviommu.v1 import admin_pb2, common_pb2
from tests.kit.hvkit import PAGE, S2, SUCCESS, Guest, HvEnv, MiB

INSUFFICIENT_MEMORY = 0xB  # HV_STATUS_INSUFFICIENT_MEMORY (reference section 4)
SZ_2M = 2 * MiB


def _info(hv: HvEnv, pid: int) -> admin_pb2.Partition:
    parts = {p.partition_id: p for p in hv.admin.ListPartitions(common_pb2.Empty(), timeout=10).partitions}
    return parts[pid]


def _fill_to_quota(hv: HvEnv, g: Guest, dom: int) -> int:
    """Map one page per 2 MiB region (each needs a new last-level table) until
    refused; returns the IOVA base of the refused map."""
    quota = _info(hv, g.pid).table_frames_quota
    for k in range(1, quota + 2):
        status, reps = g.map(dom, k * SZ_2M, [0x10])
        if status != SUCCESS:
            assert (status, reps) == (INSUFFICIENT_MEMORY, 0)
            return k * SZ_2M
    raise AssertionError(f"{quota + 1} table-building maps were all accepted with a quota of {quota}")


def test_admin_sees_used_and_quota_with_a_default_quota(make_hv) -> None:
    hv = make_hv("--s2-baseline")
    g = hv.partition()
    info = _info(hv, g.pid)
    assert info.table_frames_quota == 4096
    assert info.table_frames_used == info.stage2_table_pages > 0  # its stage 2 is charged to it
    assert g.create(5, dtype=S2) == SUCCESS
    assert _info(hv, g.pid).table_frames_used == info.table_frames_used + 1  # the domain table's root


def test_map_beyond_the_quota_is_refused_with_insufficient_memory_and_changes_nothing(make_hv) -> None:
    hv = make_hv("--s2-baseline", "--table-quota", "12")
    g = hv.partition()
    assert g.create(5, dtype=S2) == SUCCESS
    refused_at = _fill_to_quota(hv, g, 5)
    assert _info(hv, g.pid).table_frames_used == 12
    # refused again, and the refusal changes nothing (tables, frames, domains, contexts)
    status, reps = hv.unchanged(g.map, 5, refused_at, [0x10])
    assert (status, reps) == (INSUFFICIENT_MEMORY, 0)
    assert hv.host.partitions[g.pid].domains[5].table.lookup(refused_at) is None
    # a new baseline domain needs a root frame: refused the same way, no domain left behind
    assert hv.unchanged(g.create, 6, dtype=S2) == INSUFFICIENT_MEMORY
    assert (g.pid, 6) not in hv.domains(g.pid)


def test_a_rep_map_stops_at_the_rep_that_needs_a_frame_beyond_the_quota(make_hv) -> None:
    hv = make_hv("--s2-baseline", "--table-quota", "10")
    g = hv.partition()
    assert g.create(5, dtype=S2) == SUCCESS
    refused_at = _fill_to_quota(hv, g, 5)
    used = _info(hv, g.pid).table_frames_used
    # two reps at the end of the last region that has a table, two in the next one (none)
    base = refused_at - 2 * PAGE
    status, reps = g.map(5, base, [0x100, 0x101, 0x102, 0x103])
    assert (status, reps) == (INSUFFICIENT_MEMORY, 2)
    table = hv.host.partitions[g.pid].domains[5].table
    assert [table.lookup(base + i * PAGE) is not None for i in range(4)] == [True, True, False, False]
    assert _info(hv, g.pid).table_frames_used == used
    assert hv.host.snapshot()["partitions"][g.pid]["domains"][5][-1] == (refused_at // SZ_2M - 1) + 2


def test_unmap_delete_and_destroy_give_the_frames_back(make_hv) -> None:
    hv = make_hv("--s2-baseline", "--table-quota", "12")
    host_before = hv.host.tables.allocated_frames()
    g = hv.partition()
    empty = _info(hv, g.pid).table_frames_used
    assert g.create(5, dtype=S2) == SUCCESS
    refused_at = _fill_to_quota(hv, g, 5)
    # unmapping the page of one region frees its last-level table: the refused map now fits
    assert g.unmap(5, SZ_2M, 1) == (SUCCESS, 1)
    assert _info(hv, g.pid).table_frames_used == 11
    assert g.map(5, refused_at, [0x10]) == (SUCCESS, 1)
    assert _info(hv, g.pid).table_frames_used == 12
    # deleting the domain gives back every frame of its table
    assert g.delete(5, dtype=S2) == SUCCESS
    assert _info(hv, g.pid).table_frames_used == empty
    assert g.create(6, dtype=S2) == SUCCESS
    _fill_to_quota(hv, g, 6)
    # destroying the partition gives bank 0 back everything it held
    r = hv.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=g.pid), timeout=10)
    assert r.result.status == SUCCESS, r.result.message
    assert hv.host.tables.allocated_frames() == host_before


def test_one_partition_at_its_quota_leaves_another_partitions_maps_working(make_hv) -> None:
    hv = make_hv("--s2-baseline", "--table-quota", "12")
    greedy, other = hv.partition("greedy"), hv.partition("other")
    assert greedy.create(5, dtype=S2) == SUCCESS and other.create(5, dtype=S2) == SUCCESS
    _fill_to_quota(hv, greedy, 5)
    for k in range(1, 4):
        assert other.map(5, k * SZ_2M, [0x20]) == (SUCCESS, 1)


def test_a_partition_whose_stage2_exceeds_the_quota_is_refused(make_hv) -> None:
    hv = make_hv("--table-quota", "2")
    frames = hv.host.tables.allocated_frames()
    r = hv.admin.CreatePartition(admin_pb2.CreatePartitionRequest(name="big", memory_bytes=16 * MiB), timeout=10)
    assert r.result.status == INSUFFICIENT_MEMORY, r.result.message
    assert "quota" in r.result.message
    assert not hv.admin.ListPartitions(common_pb2.Empty(), timeout=10).partitions
    assert hv.host.tables.allocated_frames() == frames
