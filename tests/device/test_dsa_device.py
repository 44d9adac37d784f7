"""Device-level behaviour: registers, commands, portals, ordering, counters."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dma_device.dsa import DsaDevice, DsaDeviceConfig, Portal
from dma_device.dsa.device import SUPPORTED_OPCODES, DsaConfigError
from pviommu.abi.dsa import (
    Cmd,
    CmdErr,
    DescFlags,
    Descriptor,
    DeviceState,
    DsaStatus,
    GenCap,
    Opcode,
    WqCap,
    WqCfg,
    WqState,
    opcap_has,
)
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE
from pviommu.mem.dma import DmaFault
from tests.kit.rig import DEDICATED_WQ, SHARED_WQ, Rig, default_wqs

F = DescFlags.CRAV | DescFlags.RCR


def test_capability_registers(rig: Rig) -> None:
    dev = rig.device
    assert dev.version == 0x100
    assert GenCap.decode(dev.gencap).max_xfer_shift == 21
    cap = WqCap.decode(dev.wqcap)
    assert (cap.total_wq_size, cap.num_wqs, cap.shared_mode, cap.dedicated_mode) == (128, 8, True, True)
    assert dev.grpcap & 0xFF == 4 and dev.engcap == 4
    for op in Opcode:
        assert opcap_has(dev.opcap, op) == (op in SUPPORTED_OPCODES)
    assert not opcap_has(dev.opcap, Opcode.TRANSL_FETCH)
    assert dev.gensts == DeviceState.ENABLED
    cfg = dev.wqcfg(SHARED_WQ)
    assert cfg.wq_state == WqState.ENABLED and not cfg.dedicated and cfg.wq_size == 16


def test_commands_report_cmdsts(tmp_path: Path) -> None:
    rig = Rig(tmp_path, enable=False)
    dev = rig.device
    try:
        assert dev.command(Cmd.ENABLE_WQ, 1) & 0xFF == CmdErr.DEV_NOTEN
        default_wqs(dev)
        dev.configure_wq(2, WqCfg(wq_size=4, max_xfer_shift=30))
        dev.configure_group(2, [2], [])
        assert dev.command(Cmd.ENABLE_DEVICE) == 0
        assert dev.command(Cmd.ENABLE_DEVICE) & 0xFF == CmdErr.DEV_ENABLED
        assert dev.command(Cmd.ENABLE_WQ, 2) & 0xFF == CmdErr.MAX_XFER_SIZE
        assert dev.command(Cmd.ENABLE_WQ, 9) & 0xFF == CmdErr.INVAL_WQIDX
        assert dev.command(Cmd.ENABLE_WQ, 1) == 0
        assert dev.command(Cmd.ENABLE_WQ, 1) & 0xFF == CmdErr.WQ_ENABLED
        assert dev.command(Cmd.REQUEST_INT_HANDLE, 3) == 3 << 8
        with pytest.raises(DsaConfigError):
            dev.configure_wq(1, WqCfg(wq_size=8))
        with pytest.raises(DsaConfigError):
            dev.configure_group(0, [0], [0])
        assert dev.command(Cmd.DISABLE_WQ, 1) == 0
        assert dev.wqcfg(1).wq_state == WqState.DISABLED
        assert dev.command(Cmd.DISABLE_DEVICE) == 0
        assert dev.gensts == DeviceState.DISABLED
        assert dev.command(Cmd.RESET_DEVICE) == 0
        assert dev.wqcfg(0).wq_size == 0
    finally:
        rig.close()


def test_bof_wq_needs_gencap_bof(tmp_path: Path) -> None:
    dev = DsaDevice(None, DsaDeviceConfig(gencap=GenCap(block_on_fault=False)))
    dev.configure_wq(0, WqCfg(wq_size=4, bof=True))
    dev.configure_group(0, [0], [0])
    assert dev.enable_device() == CmdErr.SUCCESS
    assert dev.enable_wq(0) == CmdErr.BOF_EN
    dev.close()


def _block_engines(rig: Rig, wq: int) -> threading.Event:
    """Occupy every engine of ``wq``'s group with a BOF descriptor whose page
    request waits for the returned event."""
    release = threading.Event()
    src, dst = rig.alloc(PAGE_SIZE), rig.alloc(PAGE_SIZE)
    rig.iommu.unmapped.add(src >> PAGE_SHIFT)

    def answer(fault: DmaFault) -> bool:
        release.wait(10)
        rig.iommu.unmapped.discard(int(fault.iova) >> PAGE_SHIFT)
        return True

    rig.device.on_page_request = answer
    d = Descriptor(opcode=Opcode.MEMMOVE, flags=DescFlags.BOF, src_addr=src, dst_addr=dst, xfer_size=PAGE_SIZE)
    for _ in range(2):  # two engines per group
        assert rig.device.submit(wq, d)
    deadline = time.monotonic() + 5
    while rig.device.wq_occupancy(wq) and time.monotonic() < deadline:
        time.sleep(0.001)
    return release


def test_shared_wq_full_asks_for_retry(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DsaDeviceConfig(page_request_timeout=10))
    try:
        release = _block_engines(rig, SHARED_WQ)
        noop = Descriptor(opcode=Opcode.NOOP)
        accepted = sum(rig.device.submit(SHARED_WQ, noop, Portal.LIMITED) for _ in range(20))
        assert accepted == 15  # limited portal obeys the threshold
        assert rig.device.submit(SHARED_WQ, noop)  # unlimited portal: up to wq_size
        assert not rig.device.submit(SHARED_WQ, noop)
        assert rig.device.counters.retries == 6
        release.set()
        rig.settle()
        assert rig.device.submit(SHARED_WQ, noop)
    finally:
        rig.close()


def test_dedicated_wq_overflow_is_dropped_and_counted(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DsaDeviceConfig(page_request_timeout=10))
    try:
        release = _block_engines(rig, DEDICATED_WQ)
        comps = [rig.comp() for _ in range(18)]
        for c in comps:
            assert rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.NOOP, flags=F, completion_addr=c))
        assert rig.device.counters.dropped_full == 2
        release.set()
        rig.settle()
        assert [rig.record(c).code for c in comps] == [DsaStatus.SUCCESS] * 16 + [DsaStatus.NONE] * 2
    finally:
        rig.close()


def test_disabled_wq_refuses_or_drops(rig: Rig) -> None:
    assert rig.device.disable_wq(SHARED_WQ) == CmdErr.SUCCESS
    assert rig.device.disable_wq(DEDICATED_WQ) == CmdErr.SUCCESS
    assert not rig.device.submit(SHARED_WQ, Descriptor(opcode=Opcode.NOOP))
    assert rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.NOOP))
    assert rig.device.counters.dropped_disabled == 1


def test_drain_completes_after_earlier_descriptors(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DsaDeviceConfig(page_request_timeout=10))
    try:
        release = threading.Event()
        src, dst = rig.alloc(PAGE_SIZE), rig.alloc(PAGE_SIZE)
        rig.iommu.unmapped.add(src >> PAGE_SHIFT)

        def answer(fault: DmaFault) -> bool:
            release.wait(10)
            rig.iommu.unmapped.clear()
            return True

        rig.device.on_page_request = answer
        c_slow, c_drain = rig.comp(), rig.comp()
        rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.MEMMOVE, flags=F | DescFlags.BOF,
                                                   completion_addr=c_slow, src_addr=src, dst_addr=dst,
                                                   xfer_size=PAGE_SIZE))
        rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.DRAIN, flags=F, completion_addr=c_drain))
        time.sleep(0.1)  # the second engine has picked the drain by now
        assert rig.record(c_drain).code == DsaStatus.NONE
        release.set()
        assert rig.wait(c_drain).code == DsaStatus.SUCCESS
        assert rig.record(c_slow).code == DsaStatus.SUCCESS
    finally:
        rig.close()


def test_rci_interrupt_follows_record(rig: Rig) -> None:
    seen: list[tuple[int, int]] = []
    comp = rig.comp()
    rig.device.on_interrupt = lambda h, epoch: seen.append((h, rig.record(comp).code))
    rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.NOOP, flags=F | DescFlags.RCI,
                                               completion_addr=comp, int_handle=2))
    rig.settle()
    assert seen == [(2, DsaStatus.SUCCESS)]


def test_without_rcr_only_errors_write_a_record(rig: Rig) -> None:
    ok_comp, bad_comp = rig.comp(), rig.comp()
    rig.device.submit(DEDICATED_WQ, Descriptor(opcode=Opcode.NOOP, flags=DescFlags.CRAV, completion_addr=ok_comp))
    rig.device.submit(DEDICATED_WQ, Descriptor(opcode=0x0B, flags=DescFlags.CRAV, completion_addr=bad_comp))
    rig.settle()
    assert rig.record(ok_comp).code == DsaStatus.NONE
    assert rig.record(bad_comp).code == DsaStatus.BAD_OPCODE


def test_counters(rig: Rig) -> None:
    src, dst = rig.alloc(PAGE_SIZE), rig.alloc(PAGE_SIZE)
    rig.run(Descriptor(opcode=Opcode.MEMMOVE, src_addr=src, dst_addr=dst, xfer_size=PAGE_SIZE))
    rig.run(Descriptor(opcode=0x0B))
    snap = rig.device.counters.snapshot()
    assert snap["descriptors"] == {"MEMMOVE": 1, "0xb": 1}
    assert snap["completions"] == {"SUCCESS": 1, "BAD_OPCODE": 1}
    assert snap["bytes"] == PAGE_SIZE and snap["submitted"] == 2


def test_dedicated_wq_uses_wqcfg_pasid(tmp_path: Path) -> None:
    rig = Rig(tmp_path, enable=False)
    seen: list[int | None] = []

    def provider(pasid: int | None):  # type: ignore[no-untyped-def]
        seen.append(pasid)
        return rig.dma

    try:
        dev = rig.device
        dev.bind(provider)
        default_wqs(dev)
        dev.configure_wq(DEDICATED_WQ, WqCfg(wq_size=4, pasid=7, pasid_en=True))
        dev.enable_device()
        dev.enable_wq(DEDICATED_WQ)
        dev.enable_wq(SHARED_WQ)
        rig.run(Descriptor(opcode=Opcode.NOOP, pasid=3), DEDICATED_WQ)
        rig.run(Descriptor(opcode=Opcode.NOOP, pasid=3), SHARED_WQ)
        assert seen == [7, 3]
    finally:
        rig.close()
