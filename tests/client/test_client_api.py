"""The public client against real processes (through the pytest plugin, as
users use it): named DSA operations checked against reference results,
decoded records, the error family, raw hypercalls, isolation helpers."""

from __future__ import annotations

import struct
import time

import crc32c
import pytest

from pviommu.abi import hv
from pviommu.abi.dsa import DELTA_ENTRY_SIZE, DescFlags, Opcode
from pviommu.client import (
    ClientError,
    Completion,
    Direction,
    DsaError,
    HvCallError,
    HvStatus,
    RpcError,
    System,
    Unreachable,
    build,
)
from pviommu.client.guest import Guest

pytestmark = [pytest.mark.system, pytest.mark.timeout(300), pytest.mark.pviommu(guests=2, devices=1, scope="module")]

PATTERN = bytes((i * 37 + 11) & 0xFF for i in range(8192))


def test_memmove_copies_through_the_nested_translation_and_the_record_is_decoded(pviommu_device) -> None:
    src = pviommu_device.alloc_map(8192, "to-device", data=PATTERN)
    dst = pviommu_device.alloc_map(8192, "from-device")
    rec = pviommu_device.memmove(dst, src)
    assert isinstance(rec, Completion) and rec.ok and rec.status_name == "DSA_COMP_SUCCESS"
    assert rec.opcode == Opcode.MEMMOVE and dst.read() == PATTERN
    assert "MEMMOVE" in repr(rec) and "DSA_COMP_SUCCESS" in repr(rec)


def test_fill_compare_pattern_and_compare_give_the_reference_results(pviommu_device) -> None:
    a = pviommu_device.alloc_map(4096, "bidirectional")
    b = pviommu_device.alloc_map(4096, "bidirectional", data=PATTERN[:4096])
    assert pviommu_device.fill(a, b"\xc3").ok and a.read() == b"\xc3" * 4096
    assert pviommu_device.compare_pattern(a, 0xC3C3C3C3C3C3C3C3).result == 0
    diff = pviommu_device.compare(a, b)
    first = next(i for i in range(4096) if PATTERN[i] != 0xC3)
    assert diff.ok and diff.result == 1 and diff.bytes_completed == first
    checked = pviommu_device.compare(a, b, expected=0)  # CR: a result other than expected is SUCCESS_PRED
    assert checked.status_name == "DSA_COMP_SUCCESS_PRED" and not checked.ok


def test_crc_and_copy_crc_equal_crc32c_of_the_data(pviommu_device) -> None:
    src = pviommu_device.alloc_map(4096, "to-device", data=PATTERN[:4096])
    dst = pviommu_device.alloc_map(4096, "from-device")
    want = crc32c.crc32c(PATTERN[:4096])
    assert pviommu_device.crc(src).crc == want
    rec = pviommu_device.copy_crc(dst, src)
    assert rec.crc == want and dst.read() == PATTERN[:4096]
    assert rec.as_dict()["crc"] == f"{want:#010x}"


def test_dualcast_writes_both_destinations(pviommu_device) -> None:
    src = pviommu_device.alloc_map(4096, "to-device", data=PATTERN[:4096])
    d1, d2 = (pviommu_device.alloc_map(4096, "from-device") for _ in range(2))
    assert pviommu_device.dualcast(d1, d2, src).ok
    assert d1.read() == d2.read() == PATTERN[:4096]


def test_a_delta_record_made_by_the_device_patches_the_original_back_into_the_copy(pviommu_device) -> None:
    original = bytearray(PATTERN[:4096])
    changed = bytearray(original)
    for off in (8, 800, 4000):
        changed[off : off + 8] = b"CHANGED!"
    a = pviommu_device.alloc_map(4096, "bidirectional", data=bytes(original))
    b = pviommu_device.alloc_map(4096, "to-device", data=bytes(changed))
    delta = pviommu_device.alloc_map(4096, "bidirectional")
    made = pviommu_device.delta_create(a, b, delta)
    assert made.ok and made.result == 1 and made.delta_rec_size == 3 * DELTA_ENTRY_SIZE
    assert pviommu_device.delta_apply(a, delta, made.delta_rec_size).ok
    assert a.read() == bytes(changed)


def test_dif_insert_then_check_then_strip_round_trips_the_blocks(pviommu_device) -> None:
    plain = pviommu_device.alloc_map(2 * 512, "to-device", data=PATTERN[:1024])
    protected = pviommu_device.alloc_map(4096, "bidirectional")
    back = pviommu_device.alloc_map(4096, "from-device")
    ins = pviommu_device.dif_insert(protected, plain, 1024, block_size=512, ref_tag=7, app_tag=0x1234)
    assert ins.ok, ins
    assert pviommu_device.dif_check(protected, 2 * 520, block_size=512, ref_tag=7, app_tag=0x1234).ok
    bad = pviommu_device.dif_check(protected, 2 * 520, block_size=512, ref_tag=9, app_tag=0x1234)
    assert bad.status_name == "DSA_COMP_DIF_ERR"
    assert pviommu_device.dif_strip(back, protected, 2 * 520, block_size=512, ref_tag=7, app_tag=0x1234).ok
    assert back.read(0, 1024) == PATTERN[:1024]


def test_a_batch_runs_every_entry_and_reports_each_record(pviommu_device) -> None:
    src = pviommu_device.alloc_map(4096, "to-device", data=PATTERN[:4096])
    outs = [pviommu_device.alloc_map(4096, "from-device") for _ in range(3)]
    ro = pviommu_device.alloc_map(4096, "to-device")
    done = pviommu_device.batch([*(build("memmove", dst=o, src=src) for o in outs), build("memmove", dst=ro, src=src),
                                 build("noop")])
    assert done.status_name == "DSA_COMP_BATCH_FAIL" and done.descs_completed == 5
    assert [e.status_name for e in done.entries] == ["DSA_COMP_SUCCESS"] * 3 + ["DSA_COMP_PAGE_FAULT_NOBOF",
                                                                              "DSA_COMP_SUCCESS"]
    assert done.entries[3].fault_addr == ro.iova and done.entries[3].fault_was_write
    assert all(o.read() == PATTERN[:4096] for o in outs)


def test_the_stale_iotlb_hazard_and_its_fault_reach_the_guest(pviommu_system: System) -> None:
    g0 = pviommu_system.guests[0]
    dev = g0.devices[0]
    src = dev.alloc_map(4096, Direction.TO_DEVICE, data=PATTERN[:4096])
    dst = dev.alloc_map(4096, Direction.FROM_DEVICE)
    assert dev.memmove(dst, src).ok
    dst.buffer.fill(0)
    assert dst.unmap(skip_flush=True).flushed is False
    assert dev.memmove(dst, src).ok and dst.read() == PATTERN[:4096]  # through the stale entry
    dev.flush()
    rec = dev.memmove(dst, src)
    assert rec.status_name == "DSA_COMP_PAGE_FAULT_NOBOF" and rec.fault_addr == dst.iova
    with pytest.raises(DsaError) as failed:
        rec.check()
    assert failed.value.dsa_status_name == "DSA_COMP_PAGE_FAULT_NOBOF" and failed.value.record is rec
    fault = g0.wait_fault(dst, write=True, device=dev)
    assert fault.iova >> 12 == dst.iova >> 12 and f"iova={fault.iova:#x}" in repr(fault)


def test_cross_partition_refusal_carries_the_hv_status_by_name_and_changes_nothing(pviommu_system: System) -> None:
    g0, g1 = pviommu_system.guests
    foreign = g1.devices[0]
    before = pviommu_system.admin.devices()
    with pytest.raises(HvCallError) as refused:
        g0.hypervisor.attach(g0.devices[0].domain.domain_id, foreign.id)
    err = refused.value
    assert isinstance(err, ClientError) and err.hv_status == HvStatus.ACCESS_DENIED
    assert err.hv_status_name == "HV_STATUS_ACCESS_DENIED" and err.code is None  # answered in band
    assert not g0.hypervisor.device_property(g0.devices[0].id) == 0
    answer = g0.hypervisor.attach(g0.devices[0].domain.domain_id, foreign.id, check=False)
    assert answer.status_name == "HV_STATUS_ACCESS_DENIED" and not answer.ok
    assert pviommu_system.admin.devices() == before


def test_a_refused_rpc_carries_the_grpc_code_and_the_hv_status(pviommu_guest: Guest) -> None:
    buf = pviommu_guest.alloc(4096)
    with pytest.raises(RpcError) as refused:
        pviommu_guest.map(buf, device=pviommu_guest.devices[0], iova=0xFEE00000)  # the MSI window
    err = refused.value
    assert err.code_name == "INVALID_ARGUMENT" and err.hv_status_name == "HV_STATUS_INVALID_PARAMETER"
    assert "MSI" in str(err) and err.as_dict()["code"] == "INVALID_ARGUMENT"


def test_nothing_listening_is_unreachable_quickly_with_no_grpc_code() -> None:
    started = time.monotonic()
    guest = Guest("127.0.0.1:1", "token", connect_timeout=1.0)
    with pytest.raises(Unreachable) as err:
        guest.info()
    assert time.monotonic() - started < 10 and err.value.code is None and "127.0.0.1:1" in str(err.value)


def test_raw_hypercalls_use_the_abi_encoders_and_never_raise_on_a_status(pviommu_system: System) -> None:
    hyper = pviommu_system.hypervisor(0)
    caps = hyper.capabilities()
    raw = hyper.call(hv.GetIommuCapabilitiesInput())
    assert raw.ok and raw.decoded.iommu_cap == caps.iommu_cap and raw.decoded.pgsize_bitmap == caps.pgsize_bitmap
    bogus = hyper.hvcall(0x7777, b"")
    assert bogus.status_name == "HV_STATUS_INVALID_HYPERCALL_CODE" and not bogus.ok
    assert "status=" in repr(bogus) and "call_code=0x7777" in repr(bogus)


def test_typed_hypercalls_raise_only_when_checked(pviommu_system: System) -> None:
    hyper = pviommu_system.hypervisor(1)
    assert hyper.create_domain(0x5C0FF).ok
    try:
        dup = hyper.create_domain(0x5C0FF, check=False)
        assert not dup.ok and dup.status_name.startswith("HV_STATUS_")
        with pytest.raises(HvCallError):
            hyper.create_domain(0x5C0FF)
    finally:
        hyper.delete_domain(0x5C0FF)


def test_admin_dumps_and_explains_what_the_guest_mapped(pviommu_system: System) -> None:
    g0 = pviommu_system.guests[0]
    dev = g0.devices[0]
    m = dev.alloc_map(8192, "to-device")
    dom = dev.domain
    assert dom is not None
    dump = pviommu_system.admin.dump_stage1(g0.partition_id, dom.domain_id)
    assert any(va <= m.iova < va + size and oa == m.gpa - (m.iova - va) for va, oa, size, _ in dump.ranges)
    assert f"{m.iova:#x}" in dump.text()
    walk = pviommu_system.admin.explain(g0.partition_id, m.iova + 8, device=dev.id)
    assert walk.ok and walk.hpa & 0xFFF == 8 and "result: HPA" in walk.text()
    s2 = pviommu_system.admin.dump_stage2(g0.partition_id)
    assert s2.ranges and "stage 2" in s2.text()


def test_cleanup_undoes_buffers_mappings_and_domains_and_forgets_old_faults(pviommu_system: System) -> None:
    g1 = pviommu_system.guests[1]
    g1.cleanup()
    stats0, domains0 = g1.stats(), {d.domain_id for d in g1.domains()}
    dev = g1.devices[0]
    dom = g1.create_domain("paging")
    g1.attach(dom, dev)
    m = dev.alloc_map(4096, "to-device")
    ro = dev.alloc_map(4096, "to-device")
    assert not dev.memmove(ro, m).ok  # a fault
    g1.wait_fault(ro)
    assert g1.stats()["buffers"] > stats0["buffers"]
    assert g1.cleanup() == []
    assert {d.domain_id for d in g1.domains()} == domains0
    assert g1.stats()["buffers"] == stats0["buffers"] and g1.faults() == []
    assert dev.domain is not None and dev.domain.domain_id != dom.domain_id


def test_dmatest_runs_in_the_guest_and_reports_linux_lines(pviommu_guest: Guest) -> None:
    lines: list[str] = []
    result = pviommu_guest.dmatest(iterations=20, on_line=lines.append)
    assert result.ok and result.tests == 20 and "20 tests, 0 failures" in result.summary
    assert any("Started" in line for line in lines)
    with pytest.raises(ValueError, match=r"parameters: .*iterations"):
        pviommu_guest.dmatest(iteration=5)


def test_endpoints_of_a_local_system_attach_a_second_client(pviommu_system: System) -> None:
    ep = pviommu_system.endpoints()
    data = ep.to_json()
    assert data["guests"][0]["partition_id"].startswith("0x") and data["filesystem"]["fs_type"]
    other = System.from_endpoints(data)
    try:
        assert [g.info().partition_id for g in other.guests] == [g.partition_id for g in pviommu_system.guests]
        assert other.admin.devices() == pviommu_system.admin.devices()
    finally:
        other.close()


def test_raw_descriptors_still_go_through_as_bytes(pviommu_device) -> None:
    src = pviommu_device.alloc_map(4096, "to-device", data=PATTERN[:4096])
    dst = pviommu_device.alloc_map(4096, "from-device")
    desc = build("memmove", dst=dst, src=src).with_(flags=int(DescFlags.CRAV | DescFlags.RCR))
    rec = pviommu_device.submit(desc.pack())
    assert rec.ok and dst.read() == PATTERN[:4096]
    assert struct.unpack_from("<B", desc.pack(), 7)[0] == Opcode.MEMMOVE


def test_a_device_id_reads_the_same_hex_in_every_service_log(pviommu_system: System) -> None:
    import json

    dev = pviommu_system.guests[0].devices[0]
    assert dev.noop().ok
    assert pviommu_system.local is not None
    seen: dict[str, set[object]] = {}
    for proc in pviommu_system.local.supervisor.processes:
        for line in proc.log_text().splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            for key in ("device", "logical_device_id", "device_id"):
                if key in rec:
                    seen.setdefault(proc.name, set()).add(rec[key])
    want = f"{dev.id:#x}"
    for name in ("hypervisor", "guest0", "dsa0.0"):
        assert want in seen.get(name, set()), (name, seen.get(name))
    assert all(isinstance(v, str) and v.startswith("0x") for values in seen.values() for v in values), seen


def test_a_partition_the_tmpfs_could_not_back_is_refused_instead_of_sigbus_later(pviommu_system: System) -> None:
    from pviommu.mem.placement import filesystem_of
    from pviommu.units import MiB

    assert pviommu_system.local is not None
    fs = filesystem_of(pviommu_system.local.memory_dir)
    if not fs.memory_backed:
        pytest.skip("the banks are not on a tmpfs here")
    too_big = (fs.free_bytes + (2 << 30)) // (2 * MiB) * (2 * MiB)
    with pytest.raises(HvCallError) as refused:
        pviommu_system.admin.create_partition("too-big", too_big)
    assert refused.value.hv_status_name == "HV_STATUS_INSUFFICIENT_MEMORY" and "SIGBUS" in str(refused.value)
    assert "too-big" not in {p.name for p in pviommu_system.admin.partitions()}
    fits = pviommu_system.admin.create_partition("fits", "4M")
    pviommu_system.admin.destroy_partition(fits.partition_id)
